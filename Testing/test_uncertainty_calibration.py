"""The shipped cards' MC-dropout calibration (post-hoc sigma-scaling) is applied at inference and
a bad scale in a card is refused (real shipped model, real MRI crop)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from dualnet.errors import ModelError
from dualnet.inference import denoise_array
from dualnet.modelfile import default_model_path, load_model


def test_mc_std_is_scaled_by_the_card_and_bad_scales_are_refused(mri_crop):
    net, card = load_model(default_model_path("mri"), "cpu")
    scale = card["uncertainty_calibration"]["scale"]
    assert 1.0 < scale < 20.0  # measured: the raw MC std is several times below the error
    img = mri_crop[:7, :48, :48]
    kw = dict(device="cpu", modality="mri", mc_samples=3, seed=1, tile=48)
    shipped = denoise_array(img, net, card, **kw)
    raw_card = copy.deepcopy(card)
    raw_card["uncertainty_calibration"]["scale"] = 1.0
    raw = denoise_array(img, net, raw_card, **kw)
    assert shipped.info["uncertainty_scale"] == scale and raw.info["uncertainty_scale"] == 1.0
    np.testing.assert_allclose(shipped.uncertainty, raw.uncertainty * scale, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(shipped.denoised, raw.denoised)  # the image itself is untouched
    for bad in (0.0, -2.0, float("nan"), "x"):
        raw_card["uncertainty_calibration"]["scale"] = bad
        with pytest.raises(ModelError, match="uncertainty_calibration"):
            denoise_array(img, net, raw_card, **kw)
