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


def test_the_uncertainty_map_follows_the_sure_guards_blend(mri_crop, monkeypatch):
    """The written result is weight * network + (1 - weight) * input when the guard blends; its
    MC-dropout spread is weight times the network's. The map described the unblended output.
    Stubbed: the guard (a fixed weight 0.25; the real one returns it with its estimates)."""
    from dualnet import inference
    from dualnet.modelfile import default_model_path, load_model

    net, card = load_model(default_model_path("mri"), "cpu")
    crop = np.asarray(mri_crop[:8, :32, :32], np.float32)
    kw = dict(device="cpu", modality="mri", mc_samples=2, seed=3, views=1, noise_coef=(900.0, 0.0, 0.0))
    free = inference.denoise_array(crop, net, card, guard=False, **kw)
    monkeypatch.setattr(inference, "_sure_guard", lambda *a, **k: {"weight": 0.25})
    blended = inference.denoise_array(crop, net, card, guard=True, **kw)
    np.testing.assert_allclose(blended.uncertainty, 0.25 * free.uncertainty, rtol=1e-5, atol=1e-6)
