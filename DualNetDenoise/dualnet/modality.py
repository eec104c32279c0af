"""Choose the imaging modality (the noise model) of a volume: DICOM tag first, then the intensities.

Pure functions on strings and numpy arrays. The one implementation behind ``--modality auto`` of
the ``dualnet`` command and the batch script, ``modality="auto"`` of
:func:`dualnet.api.denoise_volume` and the guess the Slicer panel proposes. Every choice comes with
a one-line reason, so a wrong guess is visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from .errors import InputError

#: The noise models: Rician MRI, Poisson-Gaussian low-dose CT (HU), ultrasound speckle.
MODALITIES = ("mri", "ct", "us")
#: ``auto``: from the DICOM Modality tag, else from the intensities (:func:`choose_modality`).
AUTO = "auto"
MODALITY_CHOICES = (AUTO,) + MODALITIES
#: DICOM (0008,0060) Modality values and the dualnet modality they map to.
DICOM_MODALITY_MAP = {"MR": "mri", "CT": "ct", "US": "us", "IVUS": "us"}
DICOM_MODALITY_TAG = "0008|0060"
ALIASES = {"mr": "mri", "ultrasound": "us", "u/s": "us"}

#: Below this (HU) a CT holds no tissue or air: a value that fills part of the image down here is
#: the padding outside the scan field (-1500, -2048, -3024 on GE, Toshiba, Siemens scanners) ...
PADDING_BELOW_HU = -1100.0
#: ... when at least this fraction of the voxels hold it.
PADDING_MIN_SHARE = 0.001


@dataclass(frozen=True)
class ModalityChoice:
    """A chosen modality and why.

    Attributes:
        modality: ``"mri"``, ``"ct"`` or ``"us"``.
        reason: one line for messages and provenance, e.g. ``"DICOM Modality (0008,0060) = CT"``.
        source: ``"requested"`` (given by the caller), ``"dicom"`` (the Modality tag) or
            ``"intensities"`` (the voxel values).
    """

    modality: str
    reason: str
    source: str

    def info(self) -> Dict[str, str]:
        """Provenance keys: ``modality``, ``modality_reason``, ``modality_source``."""
        return {"modality": self.modality, "modality_reason": self.reason, "modality_source": self.source}


def check_modality(modality: str) -> str:
    """``modality`` as one of :data:`MODALITIES` (``"MR"``, ``"ultrasound"`` accepted).

    Raises:
        InputError: unknown modality (``"auto"`` too: resolve it with :func:`choose_modality`).
    """
    m = str(modality).strip().lower()
    m = ALIASES.get(m, m)
    if m not in MODALITIES:
        raise InputError(f"unknown modality {modality!r}; choose one of {', '.join(MODALITIES)}")
    return m


def modality_from_dicom(value: Optional[str]) -> Optional[str]:
    """The dualnet modality for a DICOM Modality (0008,0060) value, or None when unknown."""
    if not value:
        return None
    return DICOM_MODALITY_MAP.get(str(value).strip().upper())


def _sample(array: np.ndarray, max_samples: int) -> np.ndarray:
    """Every k-th finite value of ``array`` (at most about ``max_samples``)."""
    flat = np.asarray(array).ravel()
    if flat.size > max_samples:
        flat = flat[:: max(1, flat.size // max_samples)]
    return flat[np.isfinite(flat)] if np.issubdtype(flat.dtype, np.floating) else flat


def _range(arr: np.ndarray, flat: np.ndarray) -> Tuple[float, float]:
    """(min, max) of the whole array when finite, else of the finite sample."""
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if np.isfinite(lo) and np.isfinite(hi):
        return lo, hi
    return float(np.min(flat)), float(np.max(flat))


def modality_from_intensities(array: np.ndarray, max_samples: int = 200_000) -> Tuple[str, str]:
    """Guess the modality from the voxel values alone.

    Rules, in order: values reaching about -1000 (air in Hounsfield units; a constant padding
    below -1100 outside the scan field is set aside) mean CT; integers within 0..255 on a 2D image
    or a stack of at most 3 slices mean ultrasound B-mode; anything else is taken as MRI
    (arbitrary units; an 8-bit 3D volume too).

    Args:
        array: voxel values, any shape and axis order.
        max_samples: values looked at (a regular subsample of large volumes).

    Returns:
        ``(modality, reason)`` with a one-line reason.
    """
    arr = np.asarray(array)
    flat = _sample(arr, max_samples)
    if flat.size == 0:
        return "mri", "no finite voxels; taken as MRI"
    lo, hi = _range(arr, flat)
    inside, pad = flat, None
    if flat.min() < PADDING_BELOW_HU and np.count_nonzero(flat == flat.min()) >= PADDING_MIN_SHARE * flat.size:
        pad, inside = float(flat.min()), flat[flat != flat.min()]
    if inside.size:
        lo_in = float(np.min(inside))
        if -3100 <= lo_in <= -500 and float(np.percentile(inside, 1)) >= -1200:
            where = f"; {pad:.0f} outside the scan field" if pad is not None else ""
            return "ct", f"intensities reach {lo_in:.0f}, air in Hounsfield units{where}"
    integral = np.issubdtype(flat.dtype, np.integer) or bool(np.all(np.mod(flat[:10000], 1) == 0))
    thin = arr.ndim == 2 or (arr.ndim == 3 and min(arr.shape) <= 3)
    if integral and lo >= 0 and hi <= 255 and thin:
        return "us", "8-bit intensities on a 2D image (B-mode ultrasound)"
    if lo >= 0:
        return "mri", f"non-negative intensities {lo:.4g}..{hi:.4g}, no air at -1000 HU, not an 8-bit 2D image"
    return "mri", f"intensities {lo:.4g}..{hi:.4g} without air at -1000 HU, not an 8-bit 2D image"


def _guess(array: Optional[np.ndarray], dicom_modality: Optional[str],
           metadata: Optional[Mapping[str, str]]) -> ModalityChoice:
    tag = dicom_modality or (metadata or {}).get(DICOM_MODALITY_TAG)
    mod = modality_from_dicom(tag)
    if mod is not None:
        return ModalityChoice(mod, f"DICOM Modality (0008,0060) = {str(tag).strip()}", "dicom")
    if array is None:
        return ModalityChoice("mri", "no DICOM Modality and no voxels; taken as MRI", "intensities")
    return ModalityChoice(*modality_from_intensities(array), "intensities")


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

    Returns:
        ``(modality, reason)``; an unknown DICOM value (``"PT"``) leaves the choice to the intensities.
    """
    choice = _guess(array, dicom_modality, metadata)
    return choice.modality, choice.reason


def choose_modality(
    requested: Optional[str] = None,
    array: Optional[np.ndarray] = None,
    metadata: Optional[Mapping[str, str]] = None,
) -> ModalityChoice:
    """The modality to denoise with: ``requested``, or the guess when it is None or ``"auto"``.

    A requested modality is always honoured; its reason mentions the guess when the DICOM tag or
    clear CT / ultrasound intensities say otherwise (the MRI fallback is no evidence).

    Args:
        requested: ``None``, ``"auto"``, ``"mri"``, ``"ct"`` or ``"us"`` (aliases of
            :func:`check_modality` accepted).
        array: voxel values (``Volume.array``).
        metadata: ``Volume.metadata`` (DICOM ``0008|0060``).

    Raises:
        InputError: an unknown requested modality.
    """
    if requested is None or str(requested).strip().lower() == AUTO:
        return _guess(array, None, metadata)
    mod = check_modality(requested)
    if array is None and not metadata:
        return ModalityChoice(mod, "requested", "requested")
    guess = _guess(array, None, metadata)
    if guess.modality != mod and (guess.source == "dicom" or guess.modality != "mri"):
        return ModalityChoice(mod, f"requested; the image looks like {guess.modality}: {guess.reason}",
                              "requested")
    return ModalityChoice(mod, "requested", "requested")
