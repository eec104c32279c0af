"""Guess the imaging modality of a volume: DICOM tag first, then the intensity range.

A re-export of the core's one implementation, :mod:`dualnet.modality`. The panel only proposes
the guess (the user can change it), and says why, so a wrong guess is visible.
"""

from __future__ import annotations

from dualnet.modality import (  # noqa: F401 - the panel's names
    DICOM_MODALITY_MAP,
    DICOM_MODALITY_TAG,
    MODALITIES,
    ModalityChoice,
    choose_modality,
    guess_modality,
    modality_from_dicom,
    modality_from_intensities,
)
