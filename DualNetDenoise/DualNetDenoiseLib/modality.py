"""Guess the imaging modality of a volume: DICOM tag first, then the intensity range.

Pure functions on strings and numpy arrays; the panel only proposes the guess (the user can
change it), and says why, so a wrong guess is visible.
"""

from __future__ import annotations

from typing import Mapping, Optional, Tuple

import numpy as np

#: DICOM (0008,0060) Modality values and the dualnet modality they map to.
DICOM_MODALITY_MAP = {"MR": "mri", "CT": "ct", "US": "us", "IVUS": "us"}
MODALITIES = ("mri", "ct", "us")
DICOM_MODALITY_TAG = "0008|0060"


def modality_from_dicom(value: Optional[str]) -> Optional[str]:
    """The dualnet modality for a DICOM Modality (0008,0060) value, or None when unknown."""
    if not value:
        return None
    return DICOM_MODALITY_MAP.get(str(value).strip().upper())


def modality_from_intensities(array: np.ndarray, max_samples: int = 200_000) -> Tuple[str, str]:
    """Guess the modality from the voxel values alone.

    Rules (in order): values reaching about -1000 (air in Hounsfield units) mean CT; an 8-bit
    range (integers within 0..255) on a 2D image or a thin stack means ultrasound B-mode;
    anything else is taken as MRI (arbitrary positive units).

    Returns:
        ``(modality, reason)`` with a one-line reason for the panel.
    """
    arr = np.asarray(array)
    flat = arr.ravel()
    if flat.size > max_samples:
        flat = flat[:: max(1, flat.size // max_samples)]
    flat = flat[np.isfinite(flat)] if np.issubdtype(flat.dtype, np.floating) else flat
    if flat.size == 0:
        return "mri", "no finite voxels; defaulting to MRI"
    lo, hi = float(np.min(flat)), float(np.max(flat))
    p01 = float(np.percentile(flat, 1))
    if lo <= -500 and p01 >= -1200 and lo >= -3100:
        return "ct", f"intensities reach {lo:.0f} (air in Hounsfield units)"
    integral = np.issubdtype(flat.dtype, np.integer) or bool(np.all(np.mod(flat[:10000], 1) == 0))
    thin = arr.ndim == 2 or (arr.ndim == 3 and min(arr.shape) <= 3)
    if integral and lo >= 0 and hi <= 255 and (thin or arr.dtype == np.uint8):
        return "us", "8-bit intensities on a 2D image (B-mode ultrasound)"
    return "mri", f"non-negative intensities {lo:.0f}..{hi:.0f} without air at -1000 (MRI)"


def guess_modality(
    array: Optional[np.ndarray] = None,
    dicom_modality: Optional[str] = None,
    metadata: Optional[Mapping[str, str]] = None,
) -> Tuple[str, str]:
    """Guess ``"mri"``, ``"ct"`` or ``"us"`` with a one-line reason.

    Args:
        array: voxel values, any axis order.
        dicom_modality: the DICOM (0008,0060) value when the volume came from DICOM.
        metadata: tags read with the volume (``dualnet.io.Volume.metadata``), searched for
            ``0008|0060`` when ``dicom_modality`` is not given.
    """
    tag = dicom_modality or (metadata or {}).get(DICOM_MODALITY_TAG)
    mod = modality_from_dicom(tag)
    if mod is not None:
        return mod, f"DICOM Modality (0008,0060) = {str(tag).strip()}"
    if array is None:
        return "mri", "no DICOM Modality and no voxels; defaulting to MRI"
    return modality_from_intensities(array)
