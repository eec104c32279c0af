"""The v4 training recipe: per-sample weighting of the squared error and the removal of the clean
scans' own Rician noise floor (real MRI from ../shared/data, no stand-ins)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dualnet.errors import InputError
from dualnet.metrics import foreground_mask
from dualnet.training import data as tdata
from dualnet.training.config import TrainConfig
from dualnet.training.losses import weighted_mse


def _per_sample_grad_share(weighting: str) -> float:
    """Share of the gradient norm that the low-error sample gets, for two samples whose squared
    errors differ 100x (RMSE 0.1 against 0.01)."""
    clean = torch.zeros(2, 1, 8, 8)
    pred = torch.stack([torch.full((1, 8, 8), 0.1), torch.full((1, 8, 8), 0.01)]).requires_grad_(True)
    weighted_mse(pred, clean, weighting).backward()
    g = pred.grad.flatten(1).norm(dim=1)
    return float(g[1] / g.sum())


def test_weighting_moves_the_gradient_to_the_low_noise_samples():
    pred, clean = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    assert float(weighted_mse(pred, clean, "none")) == pytest.approx(float((pred - clean).pow(2).mean()))
    none, mild, rmse, psnr = (_per_sample_grad_share(w) for w in ("none", "mild", "rmse", "psnr"))
    # per voxel, plain MSE pulls proportionally to the error e (share 0.01 / 0.11), the mean RMSE
    # equally for both samples (d e / d pred is constant), the mean PSNR proportionally to 1 / e
    # (d log e^2 = 2 de / e: share 100 / 110); eps (1e-6 against 1e-4) moves this by about 1 %
    assert none == pytest.approx(0.01 / 0.11, rel=1e-3)
    # "mild" (p = 1/4) pulls proportionally to sqrt(e): share sqrt(0.01) / (sqrt(0.01) + sqrt(0.1))
    assert mild == pytest.approx(0.1 / (0.1 + 0.1 ** 0.5), rel=2e-2)
    assert rmse == pytest.approx(0.5, rel=2e-2)
    assert psnr == pytest.approx(100 / 110, rel=2e-2)


def test_weighting_and_floor_options_are_validated():
    base = dict(modality="mri", preset="tiny", dim=2)
    assert TrainConfig(**base, mse_weighting="rmse", clean_floor="remove").validate().mse_weighting == "rmse"
    assert TrainConfig(**base, mse_weighting="mild").validate().mse_weighting == "mild"
    with pytest.raises(InputError, match="mse_weighting"):
        TrainConfig(**base, mse_weighting="l1").validate()
    with pytest.raises(InputError, match="clean_floor"):
        TrainConfig(**base, clean_floor="zero").validate()


def test_rician_floor_removal_on_a_real_scan(mri_volume):
    """The ADNI T1's air holds the scanner's noise floor: the correction brings it towards the true
    signal 0 while tissue, far above the floor, barely moves."""
    arr = mri_volume.array.astype(np.float32)
    out, sigma0 = tdata.remove_rician_floor(arr)
    assert out.shape == arr.shape and out.dtype == np.float32 and np.all(np.isfinite(out))
    assert 0 < sigma0 < 0.05 * float(np.percentile(arr, 99.5))
    fg = foreground_mask(arr, "mri")
    air = (arr > 0) & (arr < 3 * sigma0)  # noise only (not the zero-filled corners)
    assert air.mean() > 0.05 and np.mean(out[air]) < 0.5 * np.mean(arr[air])
    assert np.all(out <= arr + 1e-3) and np.all(out >= 0)
    rel = np.abs(out[fg] - arr[fg]) / np.maximum(arr[fg], 1e-6)
    assert np.median(rel) < 0.01


def test_clean_floor_applies_to_mri_sources_only(mri_crop):
    cfg = TrainConfig(modality="mri", preset="tiny", dim=2, clean_floor="remove").validate()
    train, _ = tdata.load_split(cfg, data=[mri_crop, mri_crop + 1.0])
    assert all(t.source["rician_floor_sigma"] > 0 for t in train)
    assert np.mean(train[0].array) < np.mean(mri_crop)
    ct = TrainConfig(modality="ct", preset="tiny", dim=2, clean_floor="remove").validate()
    train_ct, _ = tdata.load_split(ct, data=[mri_crop, mri_crop])
    assert "rician_floor_sigma" not in train_ct[0].source and np.array_equal(train_ct[0].array, mri_crop)


def test_confidence_target_and_loss_train_the_alpha_head_only_where_asked():
    """lambda_alpha: alpha learns how close the blind-spot estimate is to the truth in noise stds;
    off by default (the term is absent and alpha gets no gradient from it)."""
    from dualnet.models import build_model
    from dualnet.training.losses import confidence_target, supervised_loss

    clean = torch.zeros(1, 1, 2, 2)
    blind = torch.tensor([[[[0.0, 0.1], [0.2, -0.3]]]])
    t = confidence_target(blind, clean, torch.full_like(clean, 0.1))
    assert torch.allclose(t.flatten(), torch.exp(-0.5 * torch.tensor([0.0, 1.0, 4.0, 9.0])), atol=1e-6)

    net = build_model("tiny", 2, context=1, noise_map=False)
    x = torch.rand(2, 1, 16, 16)
    batch = {"noisy": x, "clean": x * 0.9, "std": torch.full_like(x, 0.05)}
    grads = {}
    for lam in (0.0, 0.5):
        cfg = TrainConfig(modality="mri", preset="tiny", dim=2, lambda_alpha=lam).validate()
        net.zero_grad()
        out = net(x)
        total, terms = supervised_loss(out, batch, cfg)
        assert ("alpha" in terms) == (lam > 0)
        if lam > 0:
            target = confidence_target(out["blind"], batch["clean"], batch["std"])
            expect = lam * torch.nn.functional.binary_cross_entropy(out["alpha"].clamp(1e-6, 1 - 1e-6), target)
            assert terms["alpha"] == pytest.approx(float(expect.detach()), rel=1e-5)
        total.backward()
        grads[lam] = net.neb.alpha_head.weight.grad.abs().sum().item()
    assert grads[0.5] > 10 * grads[0.0]
    # alpha_detach: the term trains the head alone; the NEB features get no gradient from it
    feats = {}
    for detach in (False, True):
        net.neb.detach_alpha_features = detach
        net.zero_grad()
        out = net(x)
        target = confidence_target(out["blind"], batch["clean"], batch["std"])
        torch.nn.functional.binary_cross_entropy(out["alpha"].clamp(1e-6, 1 - 1e-6), target).backward()
        assert net.neb.alpha_head.weight.grad.abs().sum() > 0
        feats[detach] = sum(p.grad.abs().sum().item() for p in net.neb.features.parameters() if p.grad is not None)
    assert feats[False] > 0 and feats[True] == 0
    # ... and the denoising loss does not reach the head through the restoration branch's gates
    head = {}
    for detach in (False, True):
        net.neb.detach_alpha_features = detach
        net.zero_grad()
        out = net(x)
        ((out["out"] - batch["clean"]) ** 2).mean().backward()
        g = net.neb.alpha_head.weight.grad
        head[detach] = 0.0 if g is None else g.abs().sum().item()
    assert head[False] > 0 and head[True] == 0
    net.neb.detach_alpha_features = False
    with pytest.raises(InputError, match="lambda_alpha"):
        TrainConfig(modality="mri", preset="tiny", dim=2, lambda_alpha=-1).validate()
