"""Self-supervised fine-tuning with the right noise physics (session 27): SURE in the Rician VST
domain for MRI magnitude, the base model's output floor and inference settings kept, a given noise
sigma (from repeated frames), and gain-only fine-tuning.

Real parts: the real T1 crop and the real repeated EPI of ../shared/data, the real Rician noise of
dualnet.noise, the real VST tables of dualnet.vst and the real trainer; nothing is mocked.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dualnet import modelfile, noise, vst
from dualnet.errors import InputError
from dualnet.training.config import TrainConfig, config_dir
from dualnet.training.losses import (rician_sure, rician_vst, rician_vst_inverse, rician_vst_mean, sure_input,
                                     sure_mse)
from dualnet.training.trainer import finetune, pretrain


def _cfg(**kw) -> TrainConfig:
    base = dict(modality="mri", preset="tiny", dim=2, patch_size=24, batch_size=4, steps=6, lr=2e-3,
                warmup_steps=1, val_every=6, checkpoint_every=6, log_every=2, val_patches=2, num_workers=0,
                elastic_prob=0.0, device="cpu", seed=5, threads=2, lr_factor=1, min_foreground=0.1)
    base.update(kw)
    return TrainConfig(**base).validate()


def _ft_cfg(**kw) -> TrainConfig:
    base = dict(steps=4, patch_size=24, batch_size=2, val_every=4, val_patches=2, log_every=2, warmup_steps=1,
                device="cpu", threads=2, base_check=0)  # the whole-scan check: test_finetune_base_check.py
    base.update(kw)
    return TrainConfig.from_toml(config_dir() / "finetune.toml").replace(**base)


def _rician_scene(seed: int = 0):
    """A smooth magnitude image with a zero background, its Rician-noisy copy and sigma (1, 1, H, W)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 200, 200, generator=g), 9, 1, padding=4)
    x = torch.where(torch.arange(200).view(1, 1, 1, 200) < 80, torch.zeros_like(x), x)  # 40 % background
    sigma = 0.08
    y = torch.as_tensor(noise.add_rician(x.numpy(), sigma, rng=np.random.default_rng(seed)), dtype=torch.float32)
    return x, y, sigma


def test_torch_rician_vst_matches_the_numpy_transform_and_inverts():
    y = torch.linspace(0.0, 60.0, 2001).view(1, 1, 1, -1) * 0.05
    sd = torch.tensor(0.05)
    z = rician_vst(y, sd)
    assert np.allclose(z.numpy().ravel(), vst.rician_forward(y.numpy().ravel(), 0.05), atol=1e-4)
    assert torch.allclose(rician_vst_inverse(z, sd), y, atol=1e-4)
    # E[f(M) | nu] through the unbiased inverse of dualnet.vst gives nu back
    nu = torch.linspace(0.0, 2.0, 101).view(1, 1, 1, -1)
    back = vst.rician_inverse(rician_vst_mean(nu, sd).numpy().ravel(), 0.05)
    assert np.allclose(back[nu.numpy().ravel() > 0.2], nu.numpy().ravel()[nu.numpy().ravel() > 0.2], atol=2e-3)
    # the tables are shared (cached): nobody may write into them
    with pytest.raises(ValueError):
        vst.rician_tables()[1][0] = 1.0


def test_rician_sure_prefers_the_clean_magnitude_to_the_noise_floor_which_plain_sure_prefers():
    """Two fixed estimates (no divergence): the truth, and the Rician mean E[M] (the noise floor
    sigma sqrt(pi / 2) over the background). The plain zero-mean SURE is least at E[M], which is how
    fine-tuning lifted the background of magnitude MRI to the floor; the VST-domain SURE is least at
    the truth."""
    x, y, sigma = _rician_scene()
    floor = torch.as_tensor(noise.rician_mean(x.numpy(), sigma), dtype=torch.float32)
    var = torch.full_like(y, sigma ** 2)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    batch = {"noisy": y, "var": var, "probe": probe, "zero": torch.zeros(1)}
    plain = {k: float(sure_mse(e, e, y, var, probe, 1e-3)) for k, e in (("truth", x), ("floor", floor))}
    rician = {k: float(rician_sure(e, e, batch, 1e-3)) for k, e in (("truth", x), ("floor", floor))}
    assert plain["floor"] < plain["truth"], plain
    assert rician["truth"] < rician["floor"], rician


@pytest.mark.parametrize("a", [0.0, 0.5, 1.0])
def test_rician_sure_estimates_the_vst_domain_error_of_a_smoother(a):
    """f(y) = a y + (1 - a) blur(y) on Rician data: the SURE of :func:`rician_sure`, with the probe
    step :func:`sure_input` takes, matches the error it stands for, mean((E[f(M)|f(y)] - E[f(M)|x])^2)
    sigma^2, to 15 %."""
    x, y, sigma = _rician_scene(3)
    kernel = torch.full((1, 1, 5, 5), 1 / 25)

    def f(z: torch.Tensor) -> torch.Tensor:
        return a * z + (1 - a) * torch.nn.functional.conv2d(z, kernel, padding=2)

    cfg = _cfg()
    sd = torch.tensor(sigma)
    ests = []
    for seed in range(4):
        batch = {"noisy": y, "var": torch.full_like(y, sigma ** 2), "zero": torch.zeros(1),
                 "probe": torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))}
        ests.append(float(rician_sure(f(y), f(sure_input(batch, cfg)), batch, cfg.sure_eps)))
    true = float((rician_vst_mean(f(y), sd) - rician_vst_mean(x, sd)).pow(2).mean()) * sigma ** 2
    assert np.mean(ests) == pytest.approx(true, rel=0.15), (a, ests, true)


@pytest.fixture(scope="module")
def floored_base(tmp_path_factory, mri_crop):
    """A tiny MRI model trained with the output floor at 0, its card given the inference entries
    of a shipped card (views, their smoothing, test-time augmentation)."""
    out = tmp_path_factory.mktemp("base")
    res = pretrain(_cfg(nonnegative=True, levels=[0.02, 0.1]), data=[mri_crop], out_dir=out)
    card = json.loads(modelfile.card_path(res.model_path).read_text())
    card.update(orthogonal_views=True, test_time_augmentation=2,
                view_smoothing={"strength": 3.0, "method": "test", "chosen_on": "test"})
    modelfile.rewrite_card(res.model_path, card)
    return res.model_path


def test_finetuned_model_keeps_the_base_floor_and_inference_settings(tmp_path, floored_base, mri_crop):
    noisy = noise.add_rician(mri_crop, 0.05 * float(mri_crop.max()), rng=np.random.default_rng(0)).astype(np.float32)
    out = tmp_path / "ft.safetensors"
    finetune([(noisy, (1.0, 1.0, 1.0))], floored_base, out, _ft_cfg())
    card = modelfile.read_card(out)
    base = modelfile.read_card(floored_base)
    assert card["output_floor"] == 0.0 and card["config"]["nonnegative"] is True
    for key in ("orthogonal_views", "test_time_augmentation", "view_smoothing"):
        assert card[key] == base[key], key
    assert "uncertainty_calibration" not in card  # fitted to the base's errors, not the fine-tuned model's


def test_a_given_sigma_is_the_noise_model_in_each_modality_and_a_bad_one_is_refused(
        tmp_path, floored_base, mri_crop, ct_volume):
    """MRI: the given Rician sigma is the noise model. CT: the given sigma is the noise std at water
    (HU); each scan's own fit keeps how the noise grows with the signal. A sigma that is not a
    positive number is refused before anything is written."""
    noisy = noise.add_rician(mri_crop, 30.0, rng=np.random.default_rng(0)).astype(np.float32)
    out = tmp_path / "ft.safetensors"
    finetune([(noisy, (1.0, 1.0, 1.0))], floored_base, out, _ft_cfg(), sigma=30.0)
    models = modelfile.read_card(out)["finetune_noise_models"]
    assert models[0]["method"] == "given" and models[0]["sigma"] == 30.0
    for bad in (0.0, -2.0, float("nan")):
        with pytest.raises(InputError, match="sigma"):
            finetune([(noisy, (1.0, 1.0, 1.0))], floored_base, tmp_path / "bad.safetensors", _ft_cfg(), sigma=bad)
    clean_ct = ct_volume.array[40:60, 20:100, 20:100].astype(np.float32)
    ct = pretrain(_cfg(modality="ct", steps=1, val_every=1, checkpoint_every=1), data=[clean_ct],
                  out_dir=tmp_path / "ct")
    noisy_ct = noise.add_noise(clean_ct, "ct", 0.25, rng=np.random.default_rng(1)).astype(np.float32)
    estimated = modelfile.read_card(finetune([(noisy_ct, (1.0, 1.0, 1.0))], ct.model_path,
                                             tmp_path / "ct_auto.safetensors", _ft_cfg()).model_path)
    given = modelfile.read_card(finetune([(noisy_ct, (1.0, 1.0, 1.0))], ct.model_path,
                                         tmp_path / "ct_ft.safetensors", _ft_cfg(), sigma=10.0).model_path)
    est, giv = estimated["finetune_noise_models"][0], given["finetune_noise_models"][0]
    assert giv["sigma"] == 10.0 and giv["method"].startswith("given std at water") and giv["estimated_sigma"] > 15
    assert giv["gain"] * 1000.0 + giv["electronic_sigma"] ** 2 == pytest.approx(100.0)  # variance at 0 HU
    assert giv["gain"] / giv["electronic_sigma"] ** 2 == pytest.approx(est["gain"] / est["electronic_sigma"] ** 2)
    assert not (tmp_path / "bad.safetensors").exists()


def test_finetune_cli_takes_the_noise_from_the_frames_of_a_4d_scan(tmp_path, floored_base, shared_data, capfd):
    """``dualnet finetune EPI --frame 1``: the sigma of the real repeated EPI from its frames (7.3, as
    ``dualnet denoise --frame`` takes it), not the single-scan estimate (2-3x off on this scan)."""
    from dualnet.cli import main

    epi = shared_data / "real_noise" / "epi_5reps.nii.gz"
    out = tmp_path / "epi_ft.safetensors"
    code = main(["finetune", str(epi), "--frame", "1", "--model", str(floored_base), "--out", str(out),
                 "--steps", "2", "--base-check", "0", "--quiet"])
    assert code == 0, capfd.readouterr()
    model = modelfile.read_card(out)["finetune_noise_models"][0]
    assert model["method"] == "given" and 6.5 < model["sigma"] < 8.0, model
    assert "from the differences between" in capfd.readouterr().err
    with pytest.raises(SystemExit) as stop:  # refused by the parser, as `dualnet denoise --sigma -3` is
        main(["finetune", str(epi), "--frame", "1", "--model", str(floored_base), "--out",
              str(tmp_path / "x.safetensors"), "--sigma", "-3", "--quiet"])
    assert stop.value.code != 0 and "--sigma must be positive" in capfd.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_gain_tuning_trains_one_gain_per_filter_and_exports_the_base_format(tmp_path, floored_base, mri_crop):
    """``finetune_params = "gains"``: every convolution's weight changes only by a factor per output
    channel, every other parameter is the base's, and the file loads as the base architecture."""
    noisy = noise.add_rician(mri_crop, 0.05 * float(mri_crop.max()), rng=np.random.default_rng(0)).astype(np.float32)
    out = tmp_path / "gains.safetensors"
    finetune([(noisy, (1.0, 1.0, 1.0))], floored_base, out, _ft_cfg(finetune_params="gains", lr=3e-2, steps=6))
    base, _ = modelfile.load_model(floored_base, "cpu")
    tuned, card = modelfile.load_model(out, "cpu")
    b, t = base.state_dict(), tuned.state_dict()
    assert set(b) == set(t)
    # output channels: axis 0 of a convolution's weight, axis 1 of a transposed one's
    convs = {f"{n}.weight": int(isinstance(m, torch.nn.ConvTranspose2d)) for n, m in base.named_modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))}
    assert convs and 1 in convs.values()
    changed = 0
    for name, w in b.items():
        if name in convs:
            w0, w1 = (w.transpose(0, 1), t[name].transpose(0, 1)) if convs[name] else (w, t[name])
            w0, w1 = w0.flatten(1), w1.flatten(1)
            ratio = w1 / torch.where(w0 == 0, torch.ones_like(w0), w0)
            for row, mask in zip(ratio, w0 != 0):  # one factor per output channel
                if mask.any():
                    assert torch.allclose(row[mask], row[mask][0], rtol=1e-4, atol=1e-6)
            changed += int(not torch.allclose(t[name], w))
        else:
            assert torch.equal(t[name], w), name
    assert changed > 0
    assert card["parameters"] == modelfile.read_card(floored_base)["parameters"]
    with pytest.raises(InputError, match="finetune_params"):
        _ft_cfg(finetune_params="some").validate()
