"""The v3 design: 2.5D input (adjacent slices as channels) and the physics noise-std map.

Real seams only: the real model, the real patch sampler on the real T1 crop, the real tiled
inference and the real ``dualnet denoise`` API with the noise model estimated from the input.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dualnet.errors import ModelError
from dualnet.models import build_from_config, build_model
from dualnet.training import data as tdata
from dualnet.training.config import TrainConfig, config_dir


def _cfg(**kw) -> TrainConfig:
    base = dict(modality="mri", preset="tiny", dim=2, patch_size=24, batch_size=3, steps=6, lr=2e-3,
                warmup_steps=1, val_every=6, checkpoint_every=6, log_every=1, val_patches=3,
                elastic_prob=0.0, device="cpu", seed=5, threads=2, lr_factor=2, min_foreground=0.1,
                context=5, noise_map=True, noise_map_jitter=0.0, slice_axes=[0], lambda_mse=1.0,
                lambda_l1=0.0, lambda_ssim=0.0, lambda_edge=0.0, dropout_mode="channel")
    base.update(kw)
    return TrainConfig(**base).validate()


class CentreModel(torch.nn.Module):
    """Returns input channel ``index``: shows which slice the tiling feeds where."""

    def __init__(self, index: int, context: int, noise_map: bool) -> None:
        super().__init__()
        self.index = index
        self.config = {"kind": "probe", "dim": 2, "context": context, "noise_map": noise_map}
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return {"out": x[:, self.index:self.index + 1] + 0 * self.w, "sigma": None, "alpha": None, "blind": None}


def test_model_centre_output_and_channel_check():
    m = build_model("tiny", 2, context=5, noise_map=True, dropout_mode="channel").eval()
    assert m.input_channels == 6 and m.config["context"] == 5 and m.config["noise_map"]
    x = torch.rand(2, 6, 20, 28)
    x[:, 5] = 0.05
    out = m(x)
    assert out["out"].shape == (2, 1, 20, 28) and out["blind"].shape == (2, 1, 20, 28)
    # the NEB refines the physics map within the documented bound
    ratio = (out["sigma"] / x[:, 5:6]).detach()
    assert float(ratio.min()) >= 0.5 - 1e-4 and float(ratio.max()) <= 2.0 + 1e-4
    with pytest.raises(ValueError, match="6 input channels"):
        m(torch.rand(2, 1, 20, 28))
    with pytest.raises(ValueError, match="odd"):
        build_model("tiny", 2, context=4)
    # old cards (no context / noise_map / dropout_mode keys) build the old single-channel network
    old = build_from_config({"kind": "dualnet", "preset": "tiny", "dim": 2})
    assert old.input_channels == 1 and isinstance(old.srb.drop, torch.nn.Dropout)
    assert isinstance(m.srb.drop, torch.nn.Dropout2d)


def test_sampler_context_slices_and_physics_map(mri_crop):
    cfg = _cfg()
    img = tdata.make_image(mri_crop, (1.0, 1.0, 1.0), "crop", "mri")
    b = tdata.PatchSampler([img], cfg).batch(2)
    assert b["context"].shape == (3, 5, 24, 24) and b["nmap"].shape == b["noisy"].shape == (3, 1, 24, 24)
    assert np.array_equal(b["context"][:, 2:3], b["noisy"])  # the middle slice is the target's slice
    assert not np.allclose(b["context"][:, 1:2], b["noisy"])  # neighbours are other slices (other noise)
    # MRI: the map is the Rician sigma of the simulated noise (constant per patch), no jitter here
    per_patch = b["nmap"].reshape(3, -1)
    assert np.allclose(per_patch.min(1), per_patch.max(1), rtol=1e-5)
    std_bg = b["std"].reshape(3, -1).min(1)  # Rician std in air ~ 0.655 sigma, inside tissue -> sigma
    assert np.all(per_patch[:, 0] >= std_bg)
    # the input the network gets: slices then the map; the SURE / masking centre replaces the middle slice
    bt = {k: torch.as_tensor(v) for k, v in b.items()}
    x = tdata.network_input(bt, bt["noisy"] + 1.0)
    assert x.shape == (3, 6, 24, 24)
    assert torch.equal(x[:, 2:3], bt["noisy"] + 1.0) and torch.equal(x[:, :2], bt["context"][:, :2])
    assert torch.equal(x[:, 5:], bt["nmap"])


def test_slice_axes_skip_anisotropic_planes(mri_crop):
    """``slice_max_anisotropy``: a thick-slice volume is cut only along its slice axis, an isotropic
    one along every axis of ``slice_axes``; without the limit every axis is used for both."""
    thick = tdata.make_image(mri_crop, (5.0, 1.0, 1.0), "thick", "mri")
    iso = tdata.make_image(mri_crop, (1.0, 1.0, 1.0), "iso", "mri")

    def axes_used(img, limit):
        sampler = tdata.PatchSampler([img], _cfg(slice_axes=[0, 1, 2], slice_max_anisotropy=limit))
        used = set()
        for step in range(40):
            sampler._crop(np.random.default_rng(step))
            used.add(sampler._slab_axis)
        return used

    assert axes_used(thick, 1.5) == {0}
    assert axes_used(iso, 1.5) == {0, 1, 2}
    assert axes_used(thick, 0.0) == {0, 1, 2}
    assert tdata._plane_anisotropy([5.0, 1.0, 2.0], 0) == 2.0 and tdata._plane_anisotropy([5.0, 1.0, 2.0], 2) == 5.0
    with pytest.raises(Exception, match="slice_max_anisotropy"):
        _cfg(slice_max_anisotropy=0.5)


def test_gamma_contrast_changes_tissue_contrast_not_range(mri_crop):
    """``gamma_jitter``: the clean crop's contrast changes by a power law that keeps 0, the peak and
    the order of the intensities; the sampler draws different contrasts; CT (calibrated HU) refuses it."""
    peak = float(np.max(mri_crop))
    outs = [tdata.gamma_contrast(mri_crop, peak, 0.5, np.random.default_rng(s)) for s in range(6)]
    for out in outs:
        assert out.dtype == np.float32 and out.shape == mri_crop.shape
        assert np.isclose(out.max(), peak, rtol=1e-5) and out.min() >= 0
        flat, src = out.ravel(), mri_crop.ravel()
        order = np.argsort(src, kind="stable")
        assert np.all(np.diff(flat[order]) >= -1e-3 * peak)  # monotone
    mid = float(np.median(mri_crop[mri_crop > 0.1 * peak]))
    moved = [float(np.median(o[mri_crop > 0.1 * peak])) for o in outs]
    assert max(moved) - min(moved) > 0.05 * mid  # the mid-grey tissue really moves
    assert all(peak * (mid / peak) ** 1.5 - 1e-3 <= m <= peak * (mid / peak) ** (1 / 1.5) + 1e-3 for m in moved)
    img = tdata.make_image(mri_crop, (1.0, 1.0, 1.0), "t1", "mri")
    plain = tdata.PatchSampler([img], _cfg()).batch(3)
    jittered = tdata.PatchSampler([img], _cfg(gamma_jitter=0.5)).batch(3)
    assert not np.allclose(plain["clean"], jittered["clean"])
    with pytest.raises(Exception, match="gamma_jitter"):
        _cfg(modality="ct", gamma_jitter=0.2)


def test_sampler_2d_images_repeat_context_and_speckle_map(us_image):
    cfg = _cfg(modality="us", levels=[4.0, 4.0])
    img = tdata.make_image(np.asarray(us_image.array, np.float32), (1.0, 1.0), "us", "us")
    b = tdata.PatchSampler([img], cfg).batch(1)
    assert np.array_equal(b["context"], np.repeat(b["noisy"], 5, axis=1))
    # speckle: std = smoothed intensity / sqrt(L)
    expect = np.sqrt(tdata.variance_map(b["noisy"][0, 0], (0.0, 0.0, 0.25), img.params))
    assert np.allclose(b["nmap"][0, 0], expect, rtol=1e-5)
    # single-slice volumes are 2D images
    assert tdata.make_image(np.ones((1, 8, 9), np.float32), (5.0, 1.0, 2.0), "s", "ct").array.shape == (8, 9)


def test_tiling_feeds_adjacent_slices_with_edge_repeat():
    from dualnet.inference import denoise_array

    vol = np.arange(6, dtype=np.float32)[:, None, None] * np.ones((6, 20, 24), np.float32)
    card = {"normalisation": {"method": "fixed", "low": 0.0, "high": 1.0}}
    for index, shift in ((0, -2), (1, -1), (2, 0), (4, 2)):
        res = denoise_array(vol, CentreModel(index, 5, False), card, device="cpu", tile=(12, 16))
        expect = np.clip(np.arange(6) + shift, 0, 5).astype(np.float32)
        assert np.allclose(res.denoised[:, 5, 5], expect), (index, res.denoised[:, 5, 5])
    # the noise-map channel: sqrt(c0) for a signal-independent model, in normalised units
    res = denoise_array(vol, CentreModel(5, 5, True), {"normalisation": {"method": "fixed", "low": 0.0, "high": 2.0}},
                        device="cpu", noise_coef=(0.09, 0.0, 0.0))
    assert np.allclose(res.denoised, 0.3, atol=1e-5)  # sqrt(0.09) / 2 = 0.15 normalised, x2 back
    with pytest.raises(ModelError, match="noise model"):  # no coefficients and no modality to estimate them
        denoise_array(vol, CentreModel(5, 5, True), card, device="cpu")


def test_train_then_denoise_with_estimated_noise_model(tmp_path, mri_crop):
    from dualnet.api import denoise_volume
    from dualnet.io import Volume
    from dualnet.noise import add_noise
    from dualnet.training.trainer import finetune, pretrain

    res = pretrain(_cfg(), data=[(mri_crop, (1.0, 1.0, 1.0))], out_dir=tmp_path / "run")
    from dualnet import modelfile

    net, card = modelfile.load_model(res.model_path, "cpu")
    assert card["architecture"]["context"] == 5 and card["architecture"]["noise_map"] is True
    noisy = add_noise(mri_crop, "mri", 0.05, rng=0).astype(np.float32)
    out = denoise_volume(Volume(noisy, (1.0, 1.0, 1.0)), method="dualnet", modality="mri",
                         model=res.model_path, device="cpu")
    assert out.volume.array.shape == noisy.shape and np.isfinite(out.volume.array).all()
    nm = out.info["inference_noise_model"]
    sigma_true = 0.05 * float(np.abs(mri_crop).max())
    assert 0.5 < nm["sigma"] / sigma_true < 2.0, nm
    # SURE fine-tuning of a 2.5D noise-map model on the noisy scan alone
    ft_cfg = TrainConfig.from_toml(config_dir() / "finetune.toml").replace(steps=3, patch_size=24, batch_size=2, val_every=3, val_patches=2,
        log_every=1, device="cpu", threads=2, warmup_steps=1, base_check=0)
    ft = finetune([(noisy, (1.0, 1.0, 1.0))], res.model_path, tmp_path / "ft.safetensors", ft_cfg)
    _, ft_card = modelfile.load_model(ft.model_path, "cpu")
    assert ft_card["architecture"] == card["architecture"] and ft_card["stage"] == "finetune"


def test_ct_fill_values_pass_through_and_are_air_for_the_network():
    """Scanner fill values (-3024 HU outside the field of view) never reach the network (it was
    trained on air there, as degrade() raises them to -1024 HU) and come out unchanged."""
    from dualnet.degrade import degrade
    from dualnet.inference import denoise_array

    seen = []

    class Recorder(CentreModel):
        def forward(self, x):
            seen.append(float(x.min()))
            return super().forward(x)

    vol = np.full((3, 24, 24), 40.0, np.float32)
    vol[:, :, :4] = -3024.0
    card = {"modality": "ct", "normalisation": {"method": "hu_window", "hu_low": -1000.0, "hu_high": 1000.0}}
    res = denoise_array(vol, Recorder(0, 1, False), card, device="cpu")
    assert np.all(res.denoised[:, :, :4] == -3024.0) and np.allclose(res.denoised[:, :, 4:], 40.0, atol=1e-3)
    assert min(seen) >= (-1024.0 + 1000.0) / 2000.0 - 1e-6
    d = degrade(vol, "ct", 0.25, lr_factor=1, rng=0)
    assert float(d.clean_lr.min()) == -1024.0  # the reference is air, as the simulated scan is


def test_ct_output_floor_is_the_scanners_air_and_leaves_fill_values(tmp_path, ct_volume):
    """A CT card floors the network's output at -1024 HU (no reference voxel lies below it);
    fill values below -1100 HU still come out unchanged. The trainer writes that floor."""
    from dualnet import modelfile
    from dualnet.inference import denoise_array
    from dualnet.training.trainer import pretrain

    vol = np.full((3, 24, 24), 40.0, np.float32)
    vol[:, :, :4] = -3024.0  # fill
    vol[:, :, 4:8] = -1050.0  # noisy air below the scanner's floor
    card = {"modality": "ct", "normalisation": {"method": "hu_window", "hu_low": -1000.0, "hu_high": 1000.0},
            "output_floor": -1024.0}
    res = denoise_array(vol, CentreModel(0, 1, False), card, device="cpu")
    assert np.all(res.denoised[:, :, :4] == -3024.0)
    np.testing.assert_allclose(res.denoised[:, :, 4:8], -1024.0, atol=1e-3)
    np.testing.assert_allclose(res.denoised[:, :, 8:], 40.0, atol=1e-3)
    crop = ct_volume.array[40:48, 20:68, 20:68].astype(np.float32)
    cfg = TrainConfig(modality="ct", preset="tiny", dim=2, steps=1, patch_size=32, batch_size=2, val_patches=2,
                      threads=1, lambda_l1=0.0, lambda_ssim=0.0, lambda_edge=0.0, lambda_mse=1.0).validate()
    out = pretrain(cfg, data=[crop, crop[::-1].copy()], out_dir=tmp_path / "run")
    assert modelfile.load_model(out.model_path, "cpu")[1]["output_floor"] == -1024.0
