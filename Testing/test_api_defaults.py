"""The Python API as the docs describe it (review, session 35): ``denoise_volume`` chooses the modality
when none is given (it defaulted to MRI physics and the MRI model for a CT volume, with no word), and a
network run records the noise level it used in ``info["sigma"]``, which the batch summary and the
DICOM DerivationDescription read (they were empty for every network run)."""

from __future__ import annotations

import numpy as np

from dualnet.api import denoise_volume


def test_default_modality_is_chosen_and_the_network_records_its_sigma(ct_volume, one_thread):
    crop = ct_volume.with_array(np.ascontiguousarray(ct_volume.array[50:56, 35:99, 0:64]).astype(np.float32))
    res = denoise_volume(crop, method="gaussian")
    assert res.info["modality"] == "ct"
    res = denoise_volume(crop, tta=1, views=1)
    assert res.info["modality"] == "ct" and res.info["sigma_estimated"] is True
    assert res.info["sigma"] == res.info["inference_noise_model"]["sigma"] > 0
