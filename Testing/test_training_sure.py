"""SURE self-supervised fine-tuning, log-uniform noise levels and warm starts (dualnet.training).

Real parts: the real T1 crop of ../shared/data, the real noise models of dualnet.noise and the
real trainer; nothing is mocked.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from dualnet import modelfile, noise
from dualnet.errors import InputError
from dualnet.training import data as tdata
from dualnet.training.config import TrainConfig, config_dir
from dualnet.training.losses import sure_mse
from dualnet.training.trainer import finetune, pretrain


def _cfg(**kw) -> TrainConfig:
    base = dict(modality="mri", preset="tiny", dim=2, patch_size=24, batch_size=4, steps=30, lr=2e-3,
                warmup_steps=3, val_every=15, checkpoint_every=15, log_every=5, val_patches=4, num_workers=0,
                elastic_prob=0.0, device="cpu", seed=5, threads=2, lr_factor=1, min_foreground=0.1)
    base.update(kw)
    return TrainConfig(**base).validate()


def test_sure_estimates_the_true_mse_of_a_linear_smoother():
    """For f(y) = a y + (1 - a) blur(y) and heteroscedastic Gaussian noise, SURE ~ MSE to the truth."""
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 260, 260, generator=g), 5, 1)  # smooth truth
    var = 0.002 + 0.02 * x  # signal-dependent variance (Poisson-Gaussian-like)
    y = x + var.sqrt() * torch.randn(x.shape, generator=g)
    kernel = torch.full((1, 1, 3, 3), 1 / 9)

    def f(z: torch.Tensor, a: float) -> torch.Tensor:
        return a * z + (1 - a) * torch.nn.functional.conv2d(z, kernel, padding=1)

    for a in (0.0, 0.5, 1.0):
        true_mse = float((f(y, a) - x).pow(2).mean())
        probe = torch.randn(y.shape, generator=g)
        est = float(sure_mse(f(y, a), f(y + 1e-3 * probe, a), y, var, probe, 1e-3))
        naive = float((f(y, a) - y).pow(2).mean())  # what an identity-favouring loss would see
        assert est == pytest.approx(true_mse, rel=0.1), (a, est, true_mse)
        if a == 1.0:  # identity: the naive fit to the noisy image says 0, SURE says "the noise"
            assert naive == pytest.approx(0.0, abs=1e-12) and est == pytest.approx(float(var.mean()), rel=0.1)


@pytest.mark.parametrize("modality, level", [("mri", 0.05), ("ct", 0.25), ("us", 4.0)])
def test_noise_variance_model_matches_the_simulated_noise(modality, level, mri_crop, ct_volume):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(1)
    # the real scans carry their own noise (the abdominal CT about 24 HU): smooth it away so the
    # simulated noise is the only noise and its std is known
    if modality == "ct":
        clean = ct_volume.array[40:72, 20:100, 20:100].astype(np.float32)
    elif modality == "us":
        clean = (mri_crop / mri_crop.max() * 200 + 20).astype(np.float32)
    else:
        clean = mri_crop
    clean = gaussian_filter(clean, 1.5).astype(np.float32)
    noisy = noise.add_noise(clean, modality, level, rng=rng)
    coef, info = tdata.noise_variance_model(noisy, modality)
    assert info["modality"] == modality and len(coef) == 3
    body = clean > (-500 if modality == "ct" else 0.3 * clean.max())
    s = clean[body]
    predicted = np.sqrt(coef[0] + coef[1] * s + coef[2] * s * s).mean()
    actual = np.sqrt(np.mean((noisy - clean)[body] ** 2))
    assert predicted == pytest.approx(actual, rel=0.35), (predicted, actual)


def test_ct_variance_map_follows_the_poisson_gaussian_line():
    """var(HU) = gain max(HU + 1000, 0) + sigma_e^2: electronic noise only in air (also below -1000 HU,
    where the simulation keeps the clean value), more in tissue."""
    gain, se2 = 1.5, 100.0
    coef = (gain * 1000 + se2, gain, 0.0)
    params = (1000.0, 2000.0)  # hu_window normalisation: x_n = (HU + 1000) / 2000
    var = [float(tdata.variance_map(np.full((9, 9), (hu + params[0]) / params[1], np.float32), coef, params)[4, 4])
           * params[1] ** 2 for hu in (-3024.0, -1024.0, -1000.0, 0.0, 1000.0)]
    np.testing.assert_allclose(var, [se2, se2, se2, gain * 1000 + se2, gain * 2000 + se2], rtol=1e-3)
    # ... and that is the variance of the simulated noise, in air below -1000 HU too
    clean = np.repeat(np.array([-1024.0, -1000.0, 0.0, 1000.0], np.float32), 20000)
    noisy = noise.add_noise(clean, "ct", 0.25, 0)
    g25, s25 = noise.ct_noise_parameters(0.25)
    expect = tdata.variance_at(clean, tdata.variance_coef("ct", gain=g25, electronic_sigma=s25))
    for hu in (-1024.0, -1000.0, 0.0, 1000.0):
        sel = clean == hu
        assert float(np.var(noisy[sel])) == pytest.approx(float(expect[sel][0]), rel=0.05)


def test_loguniform_levels_favour_low_noise(mri_crop):
    cfg = _cfg(levels=[0.002, 0.2], level_sampling="loguniform")
    sampler = tdata.PatchSampler([tdata.make_image(mri_crop, (1, 1, 1), "crop", "mri")], cfg)
    rng = np.random.default_rng(0)
    levels = np.array([float(sampler.sample(rng)["level"]) for _ in range(200)])
    assert levels.min() >= 0.002 and levels.max() <= 0.2
    assert np.median(levels) == pytest.approx(np.sqrt(0.002 * 0.2), rel=0.35)  # geometric middle, not 0.1
    with pytest.raises(InputError, match="loguniform"):
        _cfg(levels=[0.0, 0.2], level_sampling="loguniform")


def test_init_from_copies_weights_and_rejects_other_architectures(tmp_path, mri_crop):
    first = pretrain(_cfg(steps=3), data=[mri_crop], out_dir=tmp_path / "a")
    again = pretrain(_cfg(steps=0, init_from=str(first.model_path)), data=[mri_crop], out_dir=tmp_path / "b")
    m1, _ = modelfile.load_model(first.model_path, "cpu")
    m2, card = modelfile.load_model(again.model_path, "cpu")
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(v1, v2), k
    assert card["initialised_from"]["path"] == str(first.model_path)
    with pytest.raises(InputError, match="does not match"):
        pretrain(_cfg(steps=1, preset="small", init_from=str(first.model_path)), data=[mri_crop],
                 out_dir=tmp_path / "c")


def test_init_partial_transplants_the_shared_weights_into_a_variant(tmp_path, mri_crop):
    """Final-budget ablations: a no-NEB variant starts from the trained full model's shared weights."""
    full = pretrain(_cfg(steps=3, context=3, noise_map=True), data=[mri_crop], out_dir=tmp_path / "a")
    src, _ = modelfile.load_model(full.model_path, "cpu")
    with pytest.raises(InputError, match="does not match"):  # a variant needs the explicit switch
        pretrain(_cfg(steps=0, context=3, noise_map=True, use_neb=False, init_from=str(full.model_path)),
                 data=[mri_crop], out_dir=tmp_path / "x")
    res = pretrain(_cfg(steps=0, context=3, noise_map=True, use_neb=False, init_from=str(full.model_path),
                        init_partial=True), data=[mri_crop], out_dir=tmp_path / "b")
    dst, card = modelfile.load_model(res.model_path, "cpu")
    assert dst.neb is None and src.neb is not None
    have, got = src.state_dict(), dst.state_dict()
    for k, v in got.items():
        if k != "srb.inc.weight":
            assert torch.equal(v, have[k]), k
    # the input conv: slices + noise map come first in both; the NEB's blind estimate and log sigma are gone
    assert got["srb.inc.weight"].shape[1] == 4 and have["srb.inc.weight"].shape[1] == 6
    assert torch.equal(got["srb.inc.weight"], have["srb.inc.weight"][:, :4])
    moved = card["initialised_from"]["transplant"]
    assert moved["partial"] == ["srb.inc.weight"] and moved["new"] == []
    assert any(k.startswith("neb.") for k in moved["dropped"]) and "srb.gates.0.wg.weight" in moved["dropped"]
    with pytest.raises(InputError, match="differ in more than the switches"):
        pretrain(_cfg(steps=0, context=3, noise_map=False, use_neb=False, init_from=str(full.model_path),
                      init_partial=True), data=[mri_crop], out_dir=tmp_path / "c")
    with pytest.raises(InputError, match="init_partial needs init_from"):
        _cfg(init_partial=True)


def test_init_partial_widens_the_context_and_starts_from_the_same_output(tmp_path, mri_crop):
    """More adjacent slices (context 3 -> 5): the trained model's input weights move to the middle
    slices, the new slices start at zero weight, so the widened model starts from the same output
    and only then learns to use them; narrowing, or widening and switching the NEB at once, is refused."""
    base = pretrain(_cfg(steps=3, context=3, noise_map=True), data=[mri_crop], out_dir=tmp_path / "a")
    res = pretrain(_cfg(steps=0, context=5, noise_map=True, init_from=str(base.model_path), init_partial=True),
                   data=[mri_crop], out_dir=tmp_path / "b")
    src, _ = modelfile.load_model(base.model_path, "cpu")
    dst, card = modelfile.load_model(res.model_path, "cpu")
    moved = card["initialised_from"]["transplant"]
    assert sorted(moved["partial"]) == ["neb.features.stack.0.conv.weight", "srb.inc.weight"]
    assert moved["new"] == [] and moved["dropped"] == [] and card["architecture"]["context"] == 5
    w = dst.state_dict()["srb.inc.weight"]
    assert torch.equal(w[:, [0, 4]], torch.zeros_like(w[:, [0, 4]]))  # the two new slices
    assert torch.equal(w[:, 5:], src.state_dict()["srb.inc.weight"][:, 3:])  # noise map, blind, log sigma
    src.eval(), dst.eval()
    x = torch.from_numpy(np.ascontiguousarray(mri_crop[:5, :32, :32], dtype=np.float32))[None] / float(mri_crop.max())
    nmap = torch.full_like(x[:, :1], 0.03)
    with torch.no_grad():
        a, b = src(torch.cat([x[:, 1:4], nmap], 1)), dst(torch.cat([x, nmap], 1))
    for key in ("out", "sigma", "alpha", "blind"):
        assert torch.equal(a[key], b[key]), key
    with pytest.raises(InputError, match="not narrow"):
        pretrain(_cfg(steps=0, context=1, noise_map=True, init_from=str(base.model_path), init_partial=True),
                 data=[mri_crop], out_dir=tmp_path / "c")
    with pytest.raises(InputError, match="two transplants"):
        pretrain(_cfg(steps=0, context=5, noise_map=True, use_neb=False, init_from=str(base.model_path),
                      init_partial=True), data=[mri_crop], out_dir=tmp_path / "d")


def test_init_partial_adds_residual_dense_blocks_that_start_as_the_identity(tmp_path, mri_crop):
    """More residual dense blocks at the low-resolution scales (``blocks``): the trained model's blocks
    keep their places, each added block's fusion starts at zero, so the deeper model starts from the
    same output; training then moves the added blocks. Removing blocks is refused."""
    from dualnet.presets import scale_blocks

    base = pretrain(_cfg(steps=3, context=3, noise_map=True), data=[mri_crop], out_dir=tmp_path / "a")
    res = pretrain(_cfg(steps=0, context=3, noise_map=True, blocks=[1, 2, 3], init_from=str(base.model_path),
                        init_partial=True), data=[mri_crop], out_dir=tmp_path / "b")
    src, _ = modelfile.load_model(base.model_path, "cpu")
    dst, card = modelfile.load_model(res.model_path, "cpu")
    assert card["architecture"]["blocks"] == [1, 2, 3] and "blocks" not in src.config
    assert [len(b) for b in dst.srb.enc] + [len(dst.srb.bottleneck)] == [1, 2, 3]
    moved = card["initialised_from"]["transplant"]
    added = {re.match(r"srb\.(?:(?:enc|dec)\.\d+|bottleneck)\.\d+", k).group(0) for k in moved["new"]}
    assert added == {"srb.enc.1.1", "srb.dec.1.1", "srb.bottleneck.1", "srb.bottleneck.2"}
    assert moved["dropped"] == [] and moved["partial"] == []
    got = dst.state_dict()
    assert all(torch.count_nonzero(got[k]) == 0 for k in moved["new"] if ".fuse." in k)
    src.eval(), dst.eval()
    x = torch.from_numpy(np.ascontiguousarray(mri_crop[:3, :32, :32], dtype=np.float32))[None] / float(mri_crop.max())
    inp = torch.cat([x, torch.full_like(x[:, :1], 0.03)], 1)
    with torch.no_grad():
        a, b = src(inp), dst(inp)
    for key in ("out", "sigma", "alpha", "blind"):
        assert torch.equal(a[key], b[key]), key
    trained = pretrain(_cfg(steps=4, context=3, noise_map=True, blocks=[1, 2, 3], init_from=str(base.model_path),
                            init_partial=True), data=[mri_crop], out_dir=tmp_path / "c")
    deeper, _ = modelfile.load_model(trained.model_path, "cpu")
    assert torch.count_nonzero(deeper.state_dict()["srb.bottleneck.2.fuse.weight"]) > 0  # the added block learns
    again = pretrain(_cfg(steps=0, context=3, noise_map=True, blocks=[1, 2, 3], init_from=str(trained.model_path)),
                     data=[mri_crop], out_dir=tmp_path / "e")
    grown = modelfile.read_card(again.model_path)["initialised_from"]  # a continuation of a continuation
    first = modelfile.read_card(base.model_path)["training"]
    assert grown["lineage"] == [first] and grown["training"] == modelfile.read_card(trained.model_path)["training"]
    with pytest.raises(InputError, match="not remove"):
        pretrain(_cfg(steps=0, context=3, noise_map=True, blocks=[1, 1, 3], init_from=str(res.model_path),
                      init_partial=True), data=[mri_crop], out_dir=tmp_path / "d")
    with pytest.raises(ValueError, match="one per scale|3 of them"):
        scale_blocks([1, 2], levels=2)
    for bad in ([1, 0, 2], [1, 2], [1, 2, 3, 4], [True, 1, 1]):  # the tiny preset has 3 scales
        with pytest.raises(InputError, match="blocks needs|blocks must be a list of whole numbers"):
            _cfg(blocks=bad)


def test_new_lr_factor_gives_the_transplanted_new_parameters_their_own_learning_rate(tmp_path, mri_crop):
    """``new_lr_factor``: the parameters a transplant added (``blocks``) train at that multiple of
    ``lr``, the copied ones at ``lr``; weights decay, biases do not; each trainable parameter is in one
    group. Without ``init_partial`` there are no new parameters, so the option is refused."""
    from dualnet.models.dualnet import transplant_weights
    from dualnet.training.trainer import build_network, param_groups

    base = pretrain(_cfg(steps=2, context=3, noise_map=True), data=[mri_crop], out_dir=tmp_path / "a")
    cfg = _cfg(context=3, noise_map=True, blocks=[1, 2, 3], init_from=str(base.model_path), init_partial=True,
               new_lr_factor=10)
    model = build_network(cfg)
    src, _ = modelfile.load_model(base.model_path, "cpu")
    new = set(transplant_weights(src, model)["new"])
    groups = param_groups(model, cfg, new)
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(names.values())  # each parameter once
    for g in groups:
        is_new = {names[id(p)] in new for p in g["params"]}
        assert len(is_new) == 1 and g["lr"] == pytest.approx(cfg.lr * (10 if is_new.pop() else 1))
        assert {p.ndim > 1 for p in g["params"]} == {g["weight_decay"] > 0}
    assert len(groups) == 4 and new
    plain = param_groups(model, _cfg())  # no transplant: the two groups the trainer always had
    assert [g["lr"] for g in plain] == [_cfg().lr] * 2 and [g["weight_decay"] > 0 for g in plain] == [True, False]
    res = pretrain(cfg.replace(steps=2), data=[mri_crop], out_dir=tmp_path / "b")  # and it trains
    assert res.model_path.is_file()
    with pytest.raises(InputError, match="needs init_partial"):
        _cfg(new_lr_factor=5)
    for bad in (0, -1, float("nan"), True, "5"):
        with pytest.raises(InputError, match="new_lr_factor must be"):
            _cfg(init_from=str(base.model_path), init_partial=True, new_lr_factor=bad)


def test_a_separate_confidence_head_trains_alone_and_leaves_the_output_unchanged(tmp_path, mri_crop):
    """confidence_head = "sigma_mlp" on a trained model: train_only keeps every other weight, and the
    denoised output stays bit-identical (the skip gates keep their own map)."""
    base = pretrain(_cfg(steps=3, context=3, noise_map=True), data=[mri_crop], out_dir=tmp_path / "a")
    src, _ = modelfile.load_model(base.model_path, "cpu")
    res = pretrain(_cfg(steps=6, context=3, noise_map=True, init_from=str(base.model_path), init_partial=True,
                        confidence_head="sigma_mlp", train_only=["neb.confidence_head"], lambda_alpha=1.0,
                        alpha_detach=True, lr=1e-2),
                   data=[mri_crop], out_dir=tmp_path / "b")
    dst, card = modelfile.load_model(res.model_path, "cpu")
    assert card["architecture"]["confidence_head"] == "sigma_mlp" and "confidence_head" not in src.config
    have, got = src.state_dict(), dst.state_dict()
    head = [k for k in got if k.startswith("neb.confidence_head")]
    moved = card["initialised_from"]["transplant"]
    assert sorted(moved["new"]) == sorted(head) and moved["dropped"] == [] and head
    for k in have:
        assert torch.equal(got[k], have[k]), k  # frozen
    src.eval(), dst.eval()
    x = torch.from_numpy(np.ascontiguousarray(mri_crop[:3, :32, :32], dtype=np.float32))[None] / float(mri_crop.max())
    with torch.no_grad():
        a, b = src(torch.cat([x, torch.full_like(x[:, :1], 0.02)], 1)), dst(torch.cat([x, torch.full_like(x[:, :1], 0.02)], 1))
        b4 = dst(torch.cat([x, torch.full_like(x[:, :1], 0.08)], 1))
    assert torch.equal(a["out"], b["out"]) and not torch.allclose(a["alpha"], b["alpha"])
    assert not torch.allclose(b["alpha"], b4["alpha"])  # the head reads the noise level
    # the skip gates keep the old model's map (returned as "gate" for DualNet.restore); alpha is the head's
    assert torch.equal(a["gate"], b["gate"]) and torch.equal(a["alpha"], a["gate"])
    with pytest.raises(InputError, match="train_only"):
        pretrain(_cfg(steps=1, train_only=["no_such_layer"]), data=[mri_crop], out_dir=tmp_path / "c")
    with pytest.raises(InputError, match="confidence_head"):
        _cfg(confidence_head="deep")


def test_sure_finetuning_lowers_the_true_error_on_one_noisy_scan(tmp_path, mri_crop):
    """No clean data reaches the fine-tuning; the clean crop only scores the result."""
    from dualnet.inference import denoise_array

    base = pretrain(_cfg(steps=30, levels=[0.02, 0.1]), data=[mri_crop], out_dir=tmp_path / "pre")
    rng = np.random.default_rng(2)
    noisy = noise.add_rician(mri_crop, 0.03 * float(mri_crop.max()), rng=rng).astype(np.float32)
    cfg = TrainConfig.from_toml(config_dir() / "finetune.toml").replace(
        steps=40, patch_size=32, batch_size=4, val_every=20, val_patches=4, log_every=5, warmup_steps=2,
        device="cpu", threads=2, ss_loss="sure", lambda_anchor=0.0, lambda_consistency=0.0, lambda_tv=0.0)
    out = tmp_path / "ft.safetensors"
    res = finetune([(noisy, (1.0, 1.0, 1.0))], base.model_path, out, cfg)

    def rmse(model_path) -> float:
        net, card = modelfile.load_model(model_path, "cpu")
        den = denoise_array(noisy, net, card=card, device="cpu", tta=False).denoised
        return float(np.sqrt(np.mean((den - mri_crop) ** 2)))

    before, after = rmse(base.model_path), rmse(out)
    assert after < before, (before, after)
    _, card = modelfile.load_model(out, "cpu")
    # the whole-scan check (dualnet.training.base_check) agrees with the true error: the fine-tuned model stays
    assert card["finetune_check"]["kept"] == "finetuned" and not res.kept_base, card["finetune_check"]
    models = card["finetune_noise_models"]
    assert models and models[0]["modality"] == "mri" and models[0]["sigma"] > 0
    assert res.val_loss is not None and np.isfinite(res.val_loss)


def test_time_budget_is_a_hard_wall_clock_limit(tmp_path, mri_crop):
    """A run far too long for its budget stops near the budget and still exports its model."""
    import time

    t0 = time.time()
    res = pretrain(_cfg(steps=100000, time_budget_s=4.0, log_every=2, val_every=50, checkpoint_every=50),
                   data=[mri_crop], out_dir=tmp_path / "budget")
    wall = time.time() - t0
    assert res.model_path is not None and res.model_path.exists()
    assert res.steps < 100000 and wall < 60, (res.steps, wall)


def test_cpu_bf16_autocasts_the_training_steps_only_and_trains(tmp_path, mri_crop):
    """``cpu_bf16``: the training steps run under CPU bf16 autocast, validation stays fp32, and a
    short run trains an fp32 model with finite weights. Off by default (9x slower on AVX2-only CPUs)."""
    from dualnet.training.trainer import _autocast

    cfg = _cfg(cpu_bf16=True, context=3, noise_map=True)
    cpu = torch.device("cpu")
    with _autocast(cfg, cpu, training=True):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.nn.functional.conv2d(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 3, 3)).dtype == torch.bfloat16
    with _autocast(cfg, cpu):  # validation
        assert not torch.is_autocast_enabled("cpu")
    with _autocast(_cfg(), cpu, training=True):  # the default
        assert not torch.is_autocast_enabled("cpu")
    res = pretrain(cfg.replace(steps=4), data=[mri_crop], out_dir=tmp_path / "bf16")
    model, _ = modelfile.load_model(res.model_path, "cpu")
    params = list(model.parameters())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params)
    assert res.card["training"]["hardware"]["cpu_bf16"] is True  # the card says how it trained
    for bad in ("yes", 1, None):
        with pytest.raises(InputError, match="cpu_bf16 must be"):
            _cfg(cpu_bf16=bad)


def test_cpu_bf16_trains_a_3d_model_in_channels_last_3d_and_it_denoises_a_volume(tmp_path, mri_crop, monkeypatch):
    """A 3D DUAL-NET under ``cpu_bf16`` trains in the channels-last-3d layout (1.4x faster bf16 steps on
    this host, session 18), exports plain fp32 weights, and the file denoises a (z, y, x) volume."""
    from dualnet.inference import denoise_array
    from dualnet.training import trainer

    params, seen = [], []
    build, autocast = trainer.build_network, trainer._autocast

    def capture(*a, **k):  # the network the trainer builds
        net = build(*a, **k)
        params.extend(p for p in net.parameters() if p.dim() == 5 and p.shape[1] > 1)
        return net

    def spy(cfg, device, training=False):  # the layout each training step sees
        if training:
            seen.append(params[0].is_contiguous(memory_format=torch.channels_last_3d))
        return autocast(cfg, device, training=training)

    monkeypatch.setattr(trainer, "build_network", capture)
    monkeypatch.setattr(trainer, "_autocast", spy)
    cfg = _cfg(cpu_bf16=True, dim=3, patch_size=16, batch_size=2, steps=3, noise_map=True, use_nonlocal=False)
    res = pretrain(cfg, data=[mri_crop], out_dir=tmp_path / "bf16_3d")
    monkeypatch.undo()
    assert seen and all(seen), seen
    model, card = modelfile.load_model(res.model_path, "cpu")
    assert card["dim"] == 3 and all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    noisy = (mri_crop[:16, :24, :24] + np.random.default_rng(0).normal(0, 30, (16, 24, 24))).astype(np.float32)
    out = denoise_array(noisy, model, card, device="cpu", modality="mri").denoised
    assert out.shape == noisy.shape and np.isfinite(out).all()


def test_cpu_bf16_auto_follows_the_cpu_flags(tmp_path, monkeypatch):
    """``cpu_bf16 = "auto"``: on where /proc/cpuinfo lists avx512_bf16 or amx_bf16 (hardware bf16),
    off on AVX2-only CPUs (emulated, about 9x slower) and where the flags cannot be read."""
    from dualnet import device
    from dualnet.training import trainer

    flags = {"amx": "fpu sse2 avx2 avx512f amx_tile amx_bf16", "avx512": "fpu avx2 avx512f avx512_bf16",
             "avx2": "fpu sse2 avx avx2 fma"}
    for name, line in flags.items():
        (tmp_path / name).write_text(f"processor\t: 0\nflags\t\t: {line}\n\nprocessor\t: 1\nflags\t\t: {line}\n")
    assert [device.cpu_has_fast_bf16(str(tmp_path / n)) for n in flags] == [True, True, False]
    assert device.cpu_has_fast_bf16(str(tmp_path / "missing")) is False
    cfg = _cfg(cpu_bf16="auto")
    for fast in (True, False):
        monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda fast=fast: fast)
        assert trainer.cpu_bf16_on(cfg) is fast
        with trainer._autocast(cfg, torch.device("cpu"), training=True):
            assert torch.is_autocast_enabled("cpu") is fast
    assert trainer.cpu_bf16_on(_cfg(cpu_bf16=False)) is False
