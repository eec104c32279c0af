"""Image-quality and overlap metrics for comparing denoisers.

Conventions (read before quoting a number):

* Arrays are numpy, indexed (z, y, x) for volumes and (y, x) for 2D images.
* Intensities are in the file's units (MRI arbitrary units, CT Hounsfield units, US 0..255).
* ``data_range`` is REQUIRED for PSNR and SSIM and is never guessed from the test image: a
  denoiser that overshoots must not change the scale it is judged on. Callers state it
  (e.g. the clean reference's max - min for MRI, a fixed HU span for CT, 255 for US).
* ``mask`` (bool array, same shape) restricts the voxels a metric averages over; ``None`` means
  the whole image. Reports must say which one a number used.
* SSIM follows Wang et al. (2004): Gaussian weighting with sigma = 1.5 voxels (window truncated
  at 3.5 sigma, i.e. 11 voxels wide), K1 = 0.01, K2 = 0.03, population (not sample) covariance.
  The local SSIM map is computed with ``skimage.metrics.structural_similarity(full=True)`` in 2D
  or 3D (3D Gaussian window for volumes) and averaged over the voxels at least 5 voxels (the
  window radius) from the border, intersected with ``mask`` when one is given. Without a mask the
  result therefore equals scikit-image's own mean SSIM.
* Dice of two empty masks is defined as 1.0 (both segmentations agree that the structure is
  absent); this choice is tested.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Union

import numpy as np

from .errors import InputError
from .io import Volume

ArrayOrVolume = Union[np.ndarray, Volume]

#: Gaussian SSIM parameters (Wang et al. 2004).
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)  # 5 voxels -> 11-voxel window


def _pair(ref: np.ndarray, test: np.ndarray, mask: Optional[np.ndarray]):
    ref = np.asarray(ref, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    if ref.shape != test.shape:
        raise InputError(f"reference shape {ref.shape} and test shape {test.shape} differ")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != ref.shape:
            raise InputError(f"mask shape {mask.shape} differs from image shape {ref.shape}")
        if not mask.any():
            raise InputError("mask selects no voxels")
    return ref, test, mask


def _check_range(data_range: float) -> float:
    dr = float(data_range)
    if not np.isfinite(dr) or dr <= 0:
        raise InputError(f"data_range must be a positive finite number, got {data_range!r}")
    return dr


def mse(ref: np.ndarray, test: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """Mean squared error over ``mask`` (or every voxel), in squared intensity units."""
    ref, test, mask = _pair(ref, test, mask)
    diff = ref - test
    if mask is not None:
        diff = diff[mask]
    return float(np.mean(diff * diff))


def rmse(ref: np.ndarray, test: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """Root-mean-square error over ``mask`` (or every voxel), in intensity units."""
    return float(np.sqrt(mse(ref, test, mask)))


def psnr(ref: np.ndarray, test: np.ndarray, *, data_range: float, mask: Optional[np.ndarray] = None) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(data_range**2 / MSE)``.

    Args:
        ref: clean reference, (z, y, x) or (y, x).
        test: image under test, same shape.
        data_range: the intensity span the PSNR refers to (required; same units as the images).
        mask: bool array selecting the voxels over which the MSE is taken; None = whole image.

    Returns:
        PSNR in dB; ``inf`` when the images are identical over the mask.
    """
    dr = _check_range(data_range)
    err = mse(ref, test, mask)
    if err == 0.0:
        return float("inf")
    return float(10.0 * np.log10(dr * dr / err))


def ssim(ref: np.ndarray, test: np.ndarray, *, data_range: float, mask: Optional[np.ndarray] = None) -> float:
    """Mean structural similarity (Wang et al. 2004) in 2D or 3D (by ``ref.ndim``).

    Gaussian window sigma 1.5 voxels (11 voxels wide), K1 = 0.01, K2 = 0.03, population
    covariance. The SSIM map is averaged over the interior (5 voxels from each border, where
    the window lies fully inside the image) intersected with ``mask``.

    Args:
        ref: clean reference, (z, y, x) or (y, x); every axis must be >= 11 voxels.
        test: image under test, same shape.
        data_range: intensity span (required, same units as the images).
        mask: bool array selecting voxels; None = whole (interior) image.

    Returns:
        Mean SSIM, dimensionless, at most 1.
    """
    from skimage.metrics import structural_similarity

    dr = _check_range(data_range)
    ref, test, mask = _pair(ref, test, mask)
    if ref.ndim not in (2, 3):
        raise InputError(f"SSIM needs a 2D or 3D image, got shape {ref.shape}")
    win = 2 * SSIM_RADIUS + 1
    if min(ref.shape) < win:
        raise InputError(f"SSIM needs every axis >= {win} voxels (Gaussian window), got shape {ref.shape}")
    _, smap = structural_similarity(
        ref,
        test,
        data_range=dr,
        gaussian_weights=True,
        sigma=SSIM_SIGMA,
        use_sample_covariance=False,
        full=True,
    )
    inner = np.zeros(ref.shape, dtype=bool)
    inner[tuple(slice(SSIM_RADIUS, n - SSIM_RADIUS) for n in ref.shape)] = True
    sel = inner if mask is None else (inner & mask)
    if not sel.any():
        raise InputError("mask selects no voxels away from the image border (SSIM window radius 5)")
    return float(smap[sel].mean())


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected component of a boolean mask (the mask itself if it has <= 1)."""
    from scipy import ndimage

    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def _fill_holes_slices(mask: np.ndarray) -> np.ndarray:
    """Fill holes in every (y, x) slice (for 3D) or the image (2D)."""
    from scipy import ndimage

    if mask.ndim == 2:
        return ndimage.binary_fill_holes(mask)
    return np.stack([ndimage.binary_fill_holes(s) for s in mask])


def foreground_mask(ref: np.ndarray, modality: str) -> np.ndarray:
    """Bool mask of the imaged object in a clean reference image.

    * ``"mri"``: Otsu threshold, holes filled (3D and per slice), largest connected component.
    * ``"ct"``: body = HU > -500, holes filled per axial (y, x) slice (lungs, bowel gas),
      largest connected component.
    * ``"us"``: image region = intensity > 5 (of 0..255; the black frame outside the sector is
      0), holes filled, largest connected component.

    Args:
        ref: clean image, (z, y, x) or (y, x), in the modality's units.
        modality: ``"mri"``, ``"ct"`` or ``"us"``.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    x = np.asarray(ref, dtype=np.float64)
    m = modality.lower()
    if m == "mri":
        if np.ptp(x) == 0:
            return np.ones(x.shape, dtype=bool)
        fg = x > threshold_otsu(x)
        fg = ndimage.binary_fill_holes(fg)
        fg = _fill_holes_slices(fg)
    elif m == "ct":
        fg = _fill_holes_slices(x > -500.0)
    elif m == "us":
        fg = ndimage.binary_fill_holes(x > 5.0)
    else:
        raise InputError(f"unknown modality {modality!r}; use 'mri', 'ct' or 'us'")
    fg = largest_component(fg)
    if not fg.any():
        return np.ones(x.shape, dtype=bool)
    return fg


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap 2|A∩B| / (|A| + |B|) of two binary masks (non-zero = inside).

    Two empty masks give 1.0 (agreement that the structure is absent).
    """
    a = np.asarray(a) != 0
    b = np.asarray(b) != 0
    if a.shape != b.shape:
        raise InputError(f"mask shapes differ: {a.shape} vs {b.shape}")
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return float(2.0 * np.logical_and(a, b).sum() / total)


def _check_geometry(a: Volume, b: Volume, atol: float = 1e-4) -> None:
    if a.array.shape != b.array.shape:
        raise InputError(f"label maps differ in shape: {a.array.shape} vs {b.array.shape} (z, y, x)")
    if not np.allclose(a.spacing, b.spacing, atol=atol):
        raise InputError(f"label maps differ in spacing: {a.spacing} vs {b.spacing} mm (x, y, z)")
    if not np.allclose(a.origin, b.origin, atol=atol * 10):
        raise InputError(f"label maps differ in origin: {a.origin} vs {b.origin} mm (x, y, z, LPS)")
    if not np.allclose(a.direction, b.direction, atol=atol):
        raise InputError(f"label maps differ in direction: {a.direction} vs {b.direction}")


def dice_per_label(
    a: ArrayOrVolume, b: ArrayOrVolume, labels: Optional[Iterable[int]] = None
) -> Dict[int, float]:
    """Dice per integer label of two label maps.

    Args:
        a, b: label arrays ((z, y, x) or (y, x)) or :class:`~dualnet.io.Volume` objects. When both
            are Volumes their geometry (shape, spacing, origin, direction) must agree, otherwise
            :class:`InputError` names the mismatch. Mixing an array with a Volume compares shapes.
        labels: labels to score; default = every non-zero label present in either map.

    Returns:
        ``{label: dice}``; a label absent from both maps scores 1.0.
    """
    if isinstance(a, Volume) and isinstance(b, Volume):
        _check_geometry(a, b)
    aa = np.asarray(a.array if isinstance(a, Volume) else a)
    bb = np.asarray(b.array if isinstance(b, Volume) else b)
    if aa.shape != bb.shape:
        raise InputError(f"label maps differ in shape: {aa.shape} vs {bb.shape}")
    if np.issubdtype(aa.dtype, np.floating) or np.issubdtype(bb.dtype, np.floating):
        if not (np.all(aa == np.round(aa)) and np.all(bb == np.round(bb))):
            raise InputError("label maps must hold integer labels (got non-integer values)")
    aa = aa.astype(np.int64)
    bb = bb.astype(np.int64)
    if labels is None:
        labels = sorted((set(np.unique(aa).tolist()) | set(np.unique(bb).tolist())) - {0})
    return {int(l): dice(aa == l, bb == l) for l in labels}
