"""Smoothing of the three-view mean where the views disagree (``dualnet.view_smoothing``).

Real seams: the real tiled inference along z, y and x with a probe model whose views differ in a
known way, the shipped MRI model and card on a real T1 crop degraded by the project's Rician model.
The reference for the filter is a direct, slow evaluation of its formula (every offset and every
patch voxel summed one by one), independent of the module's separable sums and paired offsets.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.ndimage import uniform_filter, uniform_filter1d

from dualnet.degrade import degrade
from dualnet.errors import ModelError
from dualnet.inference import InferenceResult, denoise_array
from dualnet.modelfile import default_model_path, load_model
from dualnet.orthoviews import denoise_views
from dualnet import view_smoothing
from dualnet.view_smoothing import card_strength, smooth_views
from test_orthoviews import ALL_AXES, BlurLastAxis


def direct(mean: np.ndarray, spread: np.ndarray, strength: float) -> np.ndarray:
    """The formula of the module docstring, term by term, in float64 (edges repeated)."""
    m = np.pad(mean.astype(np.float64), 3, mode="edge")
    t2 = strength ** 2 * uniform_filter(spread.astype(np.float64), 5, mode="nearest")
    shape = mean.shape

    def at(o):
        return m[tuple(slice(3 + k, 3 + k + n) for k, n in zip(o, shape))]

    steps = list(itertools.product((-1, 0, 1), repeat=3))
    num, den = np.zeros(shape), np.zeros(shape)
    for o in steps:
        d = sum((at(u) - at(tuple(a + b for a, b in zip(u, o)))) ** 2 for u in steps) / 27
        with np.errstate(divide="ignore", invalid="ignore"):
            w = np.where(d == 0, 1.0, np.exp(-d / t2))
        num += w * at(o)
        den += w
    return num / den


def test_matches_the_formula_term_by_term():
    rng = np.random.default_rng(0)
    mean = (rng.normal(0, 1, (9, 10, 11)) + np.linspace(0, 5, 11)).astype(np.float32)
    spread = rng.uniform(0.05, 0.5, mean.shape).astype(np.float32)
    out = smooth_views(mean, spread, 3.0, threads=1)
    assert out.dtype == np.float32 and out.shape == mean.shape
    np.testing.assert_allclose(out, direct(mean, spread, 3.0), rtol=0, atol=2e-5)


def test_pieces_along_z_give_the_one_piece_result(monkeypatch):
    rng = np.random.default_rng(1)
    mean = rng.normal(100, 10, (70, 12, 13)).astype(np.float32)
    spread = rng.uniform(1, 50, mean.shape).astype(np.float32)
    monkeypatch.setattr(view_smoothing, "PIECE", 10 ** 6)
    whole = smooth_views(mean, spread, 2.0, threads=1)
    monkeypatch.undo()
    assert view_smoothing.PIECE < 70  # so both calls below cut the volume: 3 pieces, one after another
    np.testing.assert_array_equal(smooth_views(mean, spread, 2.0, threads=1), whole)
    np.testing.assert_array_equal(smooth_views(mean, spread, 2.0, threads=3), whole)  # at once


def test_views_that_agree_leave_the_mean_alone():
    mean = np.random.default_rng(2).normal(0, 1, (8, 9, 10)).astype(np.float32)
    np.testing.assert_array_equal(smooth_views(mean, np.zeros_like(mean), 3.0), mean)


def test_smooths_where_the_views_disagree_and_keeps_an_edge():
    rng = np.random.default_rng(3)
    clean = np.full((16, 16, 16), 100.0, np.float32)
    clean[:, :, 8:] = 150.0  # a step 50 high; the residual error is 1
    mean = clean + rng.normal(0, 1, clean.shape).astype(np.float32)
    out = smooth_views(mean, np.ones_like(mean), 3.0)
    inner = (slice(2, -2), slice(2, -2))
    flat = out[inner + (slice(1, 6),)] - clean[inner + (slice(1, 6),)]
    assert flat.std() < 0.6 * (mean - clean)[inner + (slice(1, 6),)].std()  # the error is averaged down
    # the step stays sharp: the voxels beside it move by a small part of its height
    assert np.abs(out[inner + (slice(7, 9),)] - clean[inner + (slice(7, 9),)]).max() < 5.0


def test_bad_arguments_and_card_entries():
    a = np.zeros((4, 5, 6), np.float32)
    with pytest.raises(ValueError, match="one shape"):
        smooth_views(a, a[:, :, :5], 3.0)
    with pytest.raises(ValueError, match="3D"):
        smooth_views(a[0], a[0], 3.0)
    with pytest.raises(ValueError, match="positive"):
        smooth_views(a, a, 0.0)
    assert card_strength(None) is None and card_strength({"orthogonal_views": True}) is None
    assert card_strength({"view_smoothing": {"strength": 3}}) == 3.0
    for bad in ({"strength": "3"}, {"strength": True}, {"strength": -1.0}, {"strength": 0}, {"strength": 1e9},
                {"strength": float("nan")}, {}, 3.0):
        with pytest.raises(ModelError, match="view_smoothing.strength"):
            card_strength({"view_smoothing": bad})


def test_spread_of_large_intensities_loses_no_precision():
    """The views' variance about their mean, for values near 1e4 where E[v^2] - E[v]^2 in float32
    would cancel away (an ulp of 1e8 is 8)."""
    rng = np.random.default_rng(4)
    base = rng.normal(1e4, 10, (6, 7, 8))
    views = [base + rng.normal(0, 0.5, base.shape) for _ in range(3)]

    def run(view, a, progress):  # the a-th volume, seen along axis a as the real views are
        return InferenceResult(denoised=np.ascontiguousarray(np.moveaxis(views[a], a, 0)).astype(np.float32),
                               uncertainty=None, sigma_map=None, alpha_map=None, info={})

    res = denoise_views(base.astype(np.float32), run, spread=True)
    views32 = np.stack([v.astype(np.float32) for v in views]).astype(np.float64)
    np.testing.assert_allclose(res["denoised"], views32.mean(0), rtol=0, atol=2e-3)
    np.testing.assert_allclose(res["spread"], views32.var(0), rtol=1e-3, atol=1e-3)
    assert "spread" not in denoise_views(base.astype(np.float32), run)


def test_three_view_inference_applies_the_cards_smoothing():
    vol = np.random.default_rng(5).normal(100.0, 10.0, (20, 24, 28)).astype(np.float32)
    card = {**ALL_AXES, "normalisation": {"method": "zscore"}, "view_smoothing": {"strength": 2.0}}
    res = denoise_array(vol, BlurLastAxis(), card, device="cpu", guard=False, modality="mri")
    blur = lambda axis: uniform_filter1d(vol.astype(np.float64), 3, axis=axis, mode="nearest")
    views = np.stack([blur(2), blur(2), blur(1)])  # views z and y blur x; view x blurs y
    expected = smooth_views(views.mean(0).astype(np.float32), views.var(0).astype(np.float32), 2.0)
    assert res.info["views"] == 3 and res.info["view_smoothing"]["strength"] == 2.0
    np.testing.assert_allclose(res.denoised, expected, rtol=0, atol=2e-3)
    one = denoise_array(vol, BlurLastAxis(), card, device="cpu", guard=False, modality="mri", views=1)
    assert "view_smoothing" not in one.info  # one view: nothing to compare, nothing smoothed
    with pytest.raises(ModelError, match="view_smoothing"):
        denoise_array(vol, BlurLastAxis(), {**card, "view_smoothing": {"strength": "x"}}, device="cpu",
                      guard=False, modality="mri")


def test_shipped_mri_card_smooths_and_it_lowers_the_error(mri_crop, one_thread):
    d = degrade(mri_crop, "mri", 0.05, lr_factor=2, spacing_zyx=(1.0, 1.0, 1.0), rng=11)
    noisy, clean = d.noisy_lr.astype(np.float32), d.clean_lr.astype(np.float64)
    net, card = load_model(default_model_path("mri"), "cpu")
    assert card_strength(card) is not None
    plain = {k: v for k, v in card.items() if k != "view_smoothing"}
    mse = {}
    for name, c in (("smoothed", card), ("plain", plain)):
        res = denoise_array(noisy, net, c, device="cpu", modality="mri", spacing_zyx=d.spacing_lr_zyx)
        assert res.info["views"] == 3 and np.isfinite(res.denoised).all()
        mse[name] = float(np.mean((res.denoised - clean) ** 2))
    assert mse["smoothed"] < mse["plain"], mse
