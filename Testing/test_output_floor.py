"""Magnitude MRI output floored at physical 0 (``nonnegative`` / card ``output_floor``): in the
training loss, in the trainer's samples, in the card and at inference in every pass (real shipped
model, real MRI from ../shared/data, real training steps; no stand-ins)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from dualnet.errors import InputError, ModelError
from dualnet.inference import denoise_array
from dualnet.modelfile import default_model_path, load_model
from dualnet.noise import add_noise
from dualnet.training import data as tdata
from dualnet.training.config import TrainConfig
from dualnet.training.losses import floor_output, supervised_loss
from dualnet.training.trainer import pretrain


def _cfg(**kw) -> TrainConfig:
    base = dict(modality="mri", preset="tiny", dim=2, lambda_l1=0.0, lambda_ssim=0.0, lambda_edge=0.0,
                lambda_mse=1.0, lambda_neb=0.0, lambda_blind=0.0)
    return TrainConfig(**{**base, **kw}).validate()


def test_option_is_validated():
    assert _cfg(nonnegative=True).nonnegative is True
    with pytest.raises(InputError, match="nonnegative"):
        _cfg(nonnegative="yes")


def test_the_loss_sees_the_floored_output_and_no_gradient_below_it():
    pred = torch.tensor([[-0.3, -0.1], [0.2, 0.5]]).reshape(2, 1, 1, 2).requires_grad_(True)
    zero = torch.tensor([0.0, 0.25])  # one floor per sample (normalised units)
    batch = {"clean": torch.tensor([[0.0, 0.0], [0.25, 0.5]]).reshape(2, 1, 1, 2), "zero": zero}
    floored = floor_output(pred, batch, _cfg(nonnegative=True))
    assert floored.flatten().tolist() == pytest.approx([0.0, 0.0, 0.25, 0.5])
    assert floor_output(pred, batch, _cfg()) is pred  # off by default
    loss, _ = supervised_loss({"out": pred}, batch, _cfg(nonnegative=True))
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-12)  # every voxel at or below its floor is right
    loss.backward()
    assert torch.all(pred.grad == 0)
    loss_off, _ = supervised_loss({"out": pred.detach()}, batch, _cfg())
    assert float(loss_off) > 0


def test_samples_carry_physical_zero_in_normalised_units(mri_volume):
    arr = mri_volume.array.astype(np.float32)
    cfg = _cfg(nonnegative=True, clean_floor="remove", patch_size=32, min_foreground=0.0)
    train, _ = tdata.load_split(cfg, data=[arr[60:100], arr[100:140]])
    sampler = tdata.PatchSampler(train, cfg)
    offset, scale = train[0].params
    s = sampler.sample(np.random.default_rng(0), augment=False, level=0.05)
    assert float(s["zero"]) == pytest.approx(offset / scale, rel=1e-6)
    assert float(s["clean"].min()) >= float(s["zero"]) - 1e-6  # the references never go below 0
    batch = tdata.stack([s, sampler.sample(np.random.default_rng(1), augment=False, level=0.05)])
    assert batch["zero"].shape == (2,)


def test_inference_floors_every_pass_at_the_cards_value(mri_volume):
    """The shipped MRI model without its floor leaves negative values in the air; a card
    ``output_floor`` floors each pass, which for one pass over one tile is the elementwise max."""
    net, card = load_model(default_model_path("mri"), "cpu")
    card = copy.deepcopy(card)
    card.pop("output_floor", None)
    clean = mri_volume.array[80:85, :48, :48].astype(np.float32)  # corner: air and scalp
    noisy = add_noise(clean, "mri", 0.08, rng=0).astype(np.float32)  # sigma 8 % of the crop max
    sigma = 0.08 * float(clean.max())  # known: the crop is too small to estimate it
    kw = dict(device="cpu", modality="mri", tile=48, overlap=0.0, noise_coef=(sigma**2, 0.0, 0.0), guard=False)
    raw = denoise_array(noisy, net, card, **kw)
    assert raw.denoised.min() < 0 and raw.info["output_floor"] is None
    floored_card = {**card, "output_floor": 0.0}
    floored = denoise_array(noisy, net, floored_card, **kw)
    assert floored.info["output_floor"] == 0.0
    np.testing.assert_allclose(floored.denoised, np.maximum(raw.denoised, 0), atol=1e-3)
    tta = denoise_array(noisy, net, floored_card, tta=True, mc_samples=2, **kw)
    assert tta.denoised.min() >= 0
    for bad in (float("nan"), "x", float("inf")):
        with pytest.raises(ModelError, match="output_floor"):
            denoise_array(noisy, net, {**card, "output_floor": bad}, **kw)


def test_training_with_the_floor_writes_it_into_the_card(tmp_path, mri_crop):
    cfg = _cfg(nonnegative=True, steps=2, patch_size=32, batch_size=2, val_patches=2, val_every=1,
               checkpoint_every=1, log_every=1, threads=1)
    res = pretrain(cfg, data=[mri_crop, mri_crop[::-1].copy()], out_dir=tmp_path / "run")
    _, card = load_model(res.model_path, "cpu")
    assert card["output_floor"] == 0.0 and card["config"]["nonnegative"] is True
    res_off = pretrain(_cfg(steps=1, patch_size=32, batch_size=2, val_patches=2, threads=1),
                       data=[mri_crop, mri_crop[::-1].copy()], out_dir=tmp_path / "off")
    assert "output_floor" not in load_model(res_off.model_path, "cpu")[1]
