"""The whole-scan check after fine-tuning (:mod:`dualnet.training.base_check`): SURE of whole
pipelines, and the base model kept when the fine-tuned one is not estimated better.

Real parts: the real T1 crop of ../shared/data, the real trainer, the real inference path of
``dualnet denoise`` (views, test-time augmentation) and real model files; nothing is mocked. The
estimator itself is checked against the true error on a synthetic scene whose truth is known.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from dualnet import modelfile, noise
from dualnet.api import denoise_volume
from dualnet.io import Volume
from dualnet.training import base_check
from dualnet.training.config import TrainConfig, config_dir
from dualnet.training.trainer import _check_text, finetune, pretrain

SIGMA = 5.0


def _scene(seed: int = 0):
    """A smooth (z, y, x) phantom 100-200 units (every voxel far above 3 sigma) and a noisy copy."""
    rng = np.random.default_rng(seed)
    clean = 100.0 + 100.0 * ndimage.gaussian_filter(rng.random((12, 48, 48)), 3)
    clean = (clean - clean.min()) / np.ptp(clean) * 100.0 + 100.0
    noisy = clean + rng.normal(0.0, SIGMA, clean.shape)
    return clean.astype(np.float32), noisy.astype(np.float32)


def _smoother(s: float) -> base_check.Pipeline:
    return lambda data, scan: ndimage.gaussian_filter(data, s) if s > 0 else data.copy()


def test_whole_pipeline_sure_estimates_the_true_error():
    clean, noisy = _scene()
    scan = base_check.Scan("phantom", noisy, (SIGMA ** 2, 0.0, 0.0), (1.0, 1.0, 1.0))
    runs = {f"s{s}": _smoother(s) for s in (0.0, 0.7, 2.0)}
    res = base_check.scan_sure(scan, "mri", runs, seed=3)
    assert res["voxels"] == noisy.size
    assert res["mse_input"] == pytest.approx(SIGMA ** 2)
    for s in (0.0, 0.7, 2.0):
        true = float(np.mean((_smoother(s)(noisy, scan) - clean) ** 2))
        assert res["mse"][f"s{s}"] == pytest.approx(true, rel=0.06), (s, res["mse"], true)


def test_compare_keeps_the_lower_sure_and_the_base_on_a_tie():
    _, noisy = _scene(1)
    scans = [base_check.Scan(f"scan{i}", noisy[i * 6:(i + 1) * 6], (SIGMA ** 2, 0.0, 0.0)) for i in range(2)]
    better = base_check.compare(scans, {"base": _smoother(0.0), "finetuned": _smoother(0.7)}, "mri")
    assert better["kept"] == "finetuned" and better["mse"]["finetuned"] < better["mse"]["base"]
    assert len(better["scans"]) == 2 and better["voxels"] == noisy.size
    worse = base_check.compare(scans, {"base": _smoother(0.7), "finetuned": _smoother(0.0)}, "mri")
    assert worse["kept"] == "base"
    tie = base_check.compare(scans, {"base": _smoother(0.7), "finetuned": _smoother(0.7)}, "mri")
    assert tie["kept"] == "base"
    # a pipeline that gives NaN (a broken model) is never kept, and the record stays valid JSON
    broken = base_check.compare(scans, {"base": _smoother(0.0), "finetuned": lambda d, s: d * np.nan}, "mri")
    assert broken["kept"] == "base" and broken["mse"]["finetuned"] is None
    json.dumps(broken, allow_nan=False)
    assert "fine-tuned not finite" in _check_text(broken)  # the message the CLI and the panel show
    # an MRI scan with nothing 3 sigma above 0: nothing to check, the base stands
    empty = base_check.compare([base_check.Scan("dark", noisy * 0.0 + 1.0, (SIGMA ** 2, 0.0, 0.0))],
                               {"base": _smoother(0.0), "finetuned": _smoother(0.7)}, "mri")
    assert empty["kept"] == "base" and "voxels" in empty["reason"]


def _cfg(**kw) -> TrainConfig:
    base = dict(modality="mri", preset="tiny", dim=2, patch_size=24, batch_size=4, steps=8, lr=2e-3,
                warmup_steps=1, val_every=8, checkpoint_every=8, log_every=2, val_patches=2, num_workers=0,
                elastic_prob=0.0, device="cpu", seed=5, threads=1, lr_factor=1, min_foreground=0.1,
                nonnegative=True, levels=[0.02, 0.1])
    base.update(kw)
    return TrainConfig(**base).validate()


def _ft_cfg(**kw) -> TrainConfig:
    base = dict(steps=4, patch_size=24, batch_size=2, val_every=4, val_patches=2, log_every=2, warmup_steps=1,
                device="cpu", threads=1, base_check=1)
    base.update(kw)
    return TrainConfig.from_toml(config_dir() / "finetune.toml").replace(**base)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, mri_crop):
    out = tmp_path_factory.mktemp("base")
    return pretrain(_cfg(), data=[mri_crop], out_dir=out).model_path


@pytest.fixture(scope="module")
def noisy_crop(mri_crop):
    """12 slices of the T1 crop with Rician noise at 5 %: the check runs the tiny model 4 times over it."""
    crop = mri_crop[14:26]
    return noise.add_rician(crop, 0.05 * float(crop.max()), rng=np.random.default_rng(0)).astype(np.float32)


def _weights(path):
    return modelfile.load_model(path, "cpu")[0].state_dict()


def test_a_finetuned_model_worse_than_its_base_is_replaced_by_the_base(tmp_path, base_model, noisy_crop):
    """A learning rate that wrecks the network (0.05, the last step exported, not a selected one):
    the whole-scan SURE is far above the base's, so the base's weights are written, with its card's
    calibration, and the card says why."""
    out = tmp_path / "ft.safetensors"
    res = finetune([(noisy_crop, (1.0, 1.0, 1.0))], base_model, out, _ft_cfg(lr=0.05, steps=6, export_best=False))
    card = modelfile.read_card(out)
    check = card["finetune_check"]
    assert res.kept_base and check["kept"] == "base", check
    assert check["mse"]["finetuned"] > check["mse"]["base"]
    base, tuned = _weights(base_model), _weights(out)
    assert all(torch.equal(base[k], tuned[k]) for k in base)
    assert card["finetune_training"]["steps"] == 6 and card["finetuned_from"]["path"] == str(base_model)
    assert card["validation"] == modelfile.read_card(base_model)["validation"]  # the base's numbers, for the base
    assert res.card == card
    # the file is a working model: it denoises as its base does
    vol = Volume(noisy_crop[:8], (1.0, 1.0, 1.0))
    a = denoise_volume(vol, model=str(out), device="cpu", guard=False).volume.array
    b = denoise_volume(vol, model=str(base_model), device="cpu", guard=False).volume.array
    assert np.array_equal(a, b)


def test_a_finetuned_model_better_than_its_base_is_kept_with_the_check_on_its_card(
        tmp_path, mri_crop, noisy_crop):
    """A base far from the data (a model without the output floor, wrecked by a learning rate of 0.05
    and written without the check) is improved by a few SURE steps at 1e-3 on the scan: the
    whole-scan SURE drops, and the fine-tuned model is kept."""
    free = pretrain(_cfg(nonnegative=False), data=[mri_crop], out_dir=tmp_path / "free").model_path
    wrecked = tmp_path / "wrecked.safetensors"
    finetune([(noisy_crop, (1.0, 1.0, 1.0))], free, wrecked,
             _ft_cfg(lr=0.05, steps=6, export_best=False, base_check=0))
    out = tmp_path / "ft.safetensors"
    res = finetune([(noisy_crop, (1.0, 1.0, 1.0))], wrecked, out, _ft_cfg(steps=12, lr=1e-3, val_every=4))
    check = json.loads(modelfile.card_path(out).read_text())["finetune_check"]
    assert not res.kept_base and check["kept"] == "finetuned", check
    assert check["mse"]["finetuned"] < check["mse"]["base"]
    base, tuned = _weights(wrecked), _weights(out)
    assert any(not torch.equal(base[k], tuned[k]) for k in base)


def test_a_cancel_during_the_check_leaves_the_output_as_it_was(tmp_path, base_model, noisy_crop):
    """The fine-tuned model was written to --out before the whole-scan check: cancelling during the
    check left an unchecked model there (possibly worse than its base, over an earlier good one)."""
    from dualnet.errors import CancelledError
    from dualnet.progress import CancelToken

    out = tmp_path / "ft.safetensors"
    out.write_bytes(b"an earlier model")
    token = CancelToken()

    def progress(fraction, message):
        if "checking against the base" in message:
            token.cancel()

    with pytest.raises(CancelledError):
        finetune([(noisy_crop, (1.0, 1.0, 1.0))], base_model, out, _ft_cfg(steps=2), progress=progress,
                 cancel=token)
    assert out.read_bytes() == b"an earlier model" and not modelfile.card_path(out).exists()
    assert (tmp_path / "ft_run" / "ft.unchecked.safetensors").is_file()  # the run's export stays in its folder


def test_a_base_with_another_normalisation_is_refused(tmp_path, base_model, noisy_crop):
    """Fine-tuning normalises patches with the modality's recipe and wrote that on the card: a base
    normalised otherwise (e.g. z-score) was trained on other intensities, silently."""
    from dualnet.errors import InputError

    net, card = modelfile.load_model(base_model, "cpu")
    other = modelfile.save_model(tmp_path / "zscore.safetensors", net, {**card, "normalisation": {"method": "zscore"}})
    with pytest.raises(InputError, match="normalisation .*zscore"):
        finetune([(noisy_crop, (1.0, 1.0, 1.0))], other, tmp_path / "ft.safetensors", _ft_cfg(steps=1))
    assert not (tmp_path / "ft.safetensors").exists()


def test_no_check_when_switched_off_and_a_bad_count_is_refused(tmp_path, base_model, noisy_crop):
    out = tmp_path / "ft.safetensors"
    res = finetune([(noisy_crop, (1.0, 1.0, 1.0))], base_model, out, _ft_cfg(base_check=0))
    assert "finetune_check" not in modelfile.read_card(out) and not res.kept_base
    with pytest.raises(Exception, match="base_check"):
        _ft_cfg(base_check=-1).validate()


def test_the_cli_reports_the_check_on_progress_lines_the_training_panel_reads(tmp_path, base_model, noisy_crop, capfd):
    """``dualnet finetune --progress-json --base-check 1``: the check's lines parse with the panel's
    own parser (DualNetDenoiseLib.process) and its status text (DualNetDenoiseLib.training), and the
    last one names the model kept, as the card does."""
    from DualNetDenoiseLib import training
    from DualNetDenoiseLib.process import parse_progress_line
    from dualnet.cli import main
    from dualnet.io import write_volume

    scan = tmp_path / "scan.nii.gz"
    write_volume(Volume(noisy_crop, (1.0, 1.0, 1.0)), scan)
    out = tmp_path / "ft.safetensors"
    code = main(["finetune", str(scan), "--model", str(base_model), "--out", str(out), "--steps", "2",
                 "--base-check", "1", "--progress-json"])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    events = [e for e in map(parse_progress_line, captured.out.splitlines()) if e and e.get("event") == "check"]
    assert len(events) >= 5  # each model's two passes, then the verdict
    kept = modelfile.read_card(out)["finetune_check"]["kept"]
    verdict = training.progress_text(events[-1])
    assert verdict.startswith("kept the base model" if kept == "base" else "kept the fine-tuned model"), verdict
    assert "SURE per voxel" in verdict
