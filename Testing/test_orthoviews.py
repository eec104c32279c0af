"""Orthogonal views (``dualnet.orthoviews``): a 2.5D model run along z, y and x, averaged.

Real seams: the real tiled inference with a probe model whose output shows the orientation it was
run in, the shipped MRI model on a real T1 crop degraded by the project's Rician model, the real
``dualnet`` command line and the Slicer CLI module through its XML.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import uniform_filter1d

from cli_helpers import run_dualnet
from dualnet.degrade import degrade
from dualnet.errors import InputError
from dualnet.inference import denoise_array
from dualnet.modelfile import default_model_path, load_model
from dualnet.orthoviews import MAX_ANISOTROPY, choose_views, parse_views

ALL_AXES = {"config": {"slice_axes": [0, 1, 2]}}


def test_three_views_only_where_the_model_and_the_voxels_allow_them():
    iso = (32, 40, 48)
    assert choose_views(None, iso, 2, ALL_AXES) == 3
    assert choose_views(None, iso, 2, ALL_AXES, (2.0, 2.0, 2.0)) == 3
    assert choose_views(None, iso, 2, ALL_AXES, (2.0 * MAX_ANISOTROPY * 1.01, 2.0, 2.0)) == 1  # thick slices
    assert choose_views(None, iso, 2, {"config": {"slice_axes": [0]}}) == 1  # trained on axial slices only
    assert choose_views(None, iso, 2, {"config": {"slice_axes": [0]}, "orthogonal_views": True}) == 3  # checked
    assert choose_views(None, iso, 2, {**ALL_AXES, "orthogonal_views": False}) == 1
    assert choose_views(None, iso, 2, None) == 1
    assert choose_views(None, iso, 3, ALL_AXES) == 1  # a 3D model
    assert choose_views(None, (8, 40, 48), 2, ALL_AXES) == 1  # too thin for slices along y and x
    assert choose_views(None, (12, 40, 48), 2, ALL_AXES) == 3
    assert choose_views(None, (40, 48), 2, ALL_AXES) == 1  # a 2D image
    assert choose_views(3, iso, 2, {"config": {"slice_axes": [0]}}) == 3  # asked for: run anyway
    assert choose_views(1, iso, 2, ALL_AXES) == 1
    with pytest.raises(InputError, match="views must be 1 or 3"):
        choose_views(2, iso, 2, ALL_AXES)
    assert parse_views(" Auto ") is None and parse_views("1") == 1 and parse_views(3) == 3
    with pytest.raises(InputError, match="must be auto or one of 1, 3"):
        parse_views("2")
    with pytest.raises(InputError, match="3D"):
        choose_views(3, (40, 48), 2, ALL_AXES)


class BlurLastAxis(torch.nn.Module):
    """Box blur (3 voxels, edges repeated) along the last in-plane axis of each slice: run along
    z and y it blurs the volume's x axis, run along x it blurs y."""

    def __init__(self) -> None:
        super().__init__()
        self.config = {"kind": "probe", "dim": 2, "context": 1, "noise_map": False}
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        pad = torch.nn.functional.pad(x, (1, 1, 0, 0), mode="replicate")
        out = (pad[..., :-2] + pad[..., 1:-1] + pad[..., 2:]) / 3 + 0 * self.w
        return {"out": out, "sigma": None, "alpha": None, "blind": None}


def test_each_view_is_turned_back_before_the_mean():
    vol = np.random.default_rng(0).normal(100.0, 10.0, (20, 24, 28)).astype(np.float32)
    card = {**ALL_AXES, "normalisation": {"method": "zscore"}}
    seen = []
    res = denoise_array(vol, BlurLastAxis(), card, device="cpu", guard=False, modality="mri",
                        progress=lambda f, msg: seen.append((f, msg)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0  # one bar over the three views
    assert any(msg.startswith("view 3/3 (slices along x)") for _, msg in seen)
    blur = lambda axis: uniform_filter1d(vol.astype(np.float64), 3, axis=axis, mode="nearest")
    expected = (2 * blur(2) + blur(1)) / 3  # views z and y blur x; view x blurs y
    assert res.info["views"] == 3 and res.info["passes"] == 3
    np.testing.assert_allclose(res.denoised, expected, rtol=0, atol=1e-3)
    one = denoise_array(vol, BlurLastAxis(), card, device="cpu", guard=False, modality="mri", views=1)
    assert one.info["views"] == 1
    np.testing.assert_allclose(one.denoised, blur(2), rtol=0, atol=1e-3)


@pytest.fixture(scope="module")
def t1_rician(mri_crop):
    """The real T1 crop at 2 mm with Rician noise at 5 % of its maximum (the validation setting)."""
    d = degrade(mri_crop, "mri", 0.05, lr_factor=2, spacing_zyx=(1.0, 1.0, 1.0), rng=7)
    return d.noisy_lr.astype(np.float32), d.clean_lr.astype(np.float32), d.spacing_lr_zyx


def test_shipped_mri_model_three_views_beat_one(t1_rician, one_thread):
    noisy, clean, spacing = t1_rician
    net, card = load_model(default_model_path("mri"), "cpu")
    mse = {}
    for views in (1, None):
        res = denoise_array(noisy, net, card, device="cpu", modality="mri", spacing_zyx=spacing, views=views,
                            mc_samples=2)
        mse[res.info["views"]] = float(np.mean((res.denoised.astype(np.float64) - clean) ** 2))
        assert res.uncertainty is not None and res.uncertainty.shape == noisy.shape
        assert res.sigma_map.shape == noisy.shape and np.isfinite(res.denoised).all()
        if views is None:  # the guard ran in every view
            assert len(res.info["guard"]["views"]) == 3 and 0.0 <= res.info["guard"]["weight"] <= 1.0
    assert set(mse) == {1, 3}
    assert mse[3] < mse[1], mse


def test_cli_views_option(tmp_path, t1_rician, capfd, one_thread):
    import json

    from dualnet.io import Volume, write_volume

    noisy, _, spacing = t1_rician
    src = tmp_path / "in.nrrd"
    write_volume(Volume(noisy, tuple(reversed(spacing))), src)
    info = {}
    for views in ("1", "auto"):
        code, _, err = run_dualnet(["denoise", str(src), str(tmp_path / f"out_{views}.nrrd"), "--modality", "mri",
                                    "--views", views, "--info-json", str(tmp_path / f"{views}.json")], capfd)
        assert code == 0, err
        info[views] = json.loads((tmp_path / f"{views}.json").read_text())
    assert info["1"]["inference_views"] == 1 and info["auto"]["inference_views"] == 3
    code, _, err = run_dualnet(["denoise", str(src), str(tmp_path / "o.nrrd"), "--views", "2"], capfd)
    assert code == 2 and "--views" in err
    code, _, err = run_dualnet(["denoise", str(src), str(tmp_path / "o.nrrd"), "--method", "gaussian",
                                "--views", "3"], capfd)
    assert code == 2 and "--views applies to the network only" in err, err
