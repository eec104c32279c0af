"""Skull-stripped copies of training scans, made from tissue probability maps.

Research pipelines often hand over skull-stripped MRI: everything outside the brain is exactly 0.
A network trained only on whole heads has never seen such a background and leaves part of the
noise floor in it (docs/design_sweep.md, sessions 12 and 25). A data source with ``brain_mask``
(``TrainConfig`` ``[[data]]``) is read with the voxels outside the brain set to exactly 0.

The mask comes from partial-volume maps of the scan (e.g. FSL FAST grey and white matter, values
0..1, on the scan's grid): their sum above ``threshold``, the largest connected component (a
stray blob labelled as tissue is dropped), closed and hole-filled (ventricles and deep CSF stay
inside), then grown by ``margin`` voxels (a rim of sulcal CSF, as skull-stripping tools keep).
Arrays are (z, y, x).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import InputError


def brain_mask_from_maps(maps: Sequence[np.ndarray], *, threshold: float = 0.5, closing: int = 3,
                         margin: int = 1) -> np.ndarray:
    """Boolean brain mask (z, y, x) from tissue probability maps of one scan (same shape each).

    Args:
        maps: probability maps (0..1), e.g. grey and white matter; summed voxel-wise.
        threshold: the summed probability above which a voxel is tissue.
        closing: iterations of the 6-connected binary closing before the holes are filled.
        margin: voxels the filled mask is grown by.
    """
    from scipy import ndimage

    if not maps:
        raise InputError("brain mask: no tissue maps given")
    shape = np.shape(maps[0])
    if len(shape) != 3 or any(np.shape(m) != shape for m in maps):
        raise InputError(f"brain mask: the tissue maps must be 3D and of one shape, got {[np.shape(m) for m in maps]}")
    total = np.sum([np.asarray(m, dtype=np.float32) for m in maps], axis=0)
    if not np.isfinite(total).all():
        raise InputError("brain mask: the tissue maps contain NaN or Inf")
    tissue = total > threshold
    labels, n = ndimage.label(tissue)
    if n == 0:
        raise InputError(f"brain mask: no voxel of the tissue maps is above {threshold}")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = labels == int(np.argmax(sizes))
    if closing > 0:
        # padded, so the closing does not erode the mask where it touches the edge of the volume
        pad = closing + 1
        mask = ndimage.binary_closing(np.pad(mask, pad), ndimage.generate_binary_structure(3, 1),
                                      iterations=closing)[pad:-pad, pad:-pad, pad:-pad]
    mask = ndimage.binary_fill_holes(mask)
    if margin > 0:
        mask = ndimage.binary_dilation(mask, iterations=margin)
    return mask


def strip(arr: np.ndarray, mask: np.ndarray, name: str = "image") -> np.ndarray:
    """``arr`` with the voxels outside ``mask`` set to exactly 0 (float32, a copy)."""
    if np.shape(arr) != np.shape(mask):
        raise InputError(f"{name}: the brain mask's shape {np.shape(mask)} differs from the image's {np.shape(arr)}")
    return np.where(mask, np.asarray(arr, dtype=np.float32), np.float32(0.0))
