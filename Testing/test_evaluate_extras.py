"""Tests of the study's downstream Dice, per-case fine-tuning, ablations, robustness and
uncertainty calibration (dualnet.evaluate / dualnet.report).

Synthetic data (an MRI-like phantom with FreeSurfer-style labels) and the stand-in degrade of
test_evaluate keep these fast; the network methods use the shipped 0.1 M-parameter MRI model.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from dualnet import evaluate, segment
from dualnet.progress import CancelToken
from test_evaluate import synthetic_study

REPO = Path(__file__).resolve().parents[1]
MRI_MODEL = REPO / "DualNetDenoise" / "dualnet" / "weights" / "dualnet_mri.safetensors"
# the report mechanics of ablations: a model that needs no noise model of its (synthetic) input
ABLATION_MODEL = REPO / "DualNetDenoise" / "dualnet" / "weights" / "ablation" / "dualnet_mri_ref.safetensors"


def _read_csv(path: Path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------- Dice
def _phantom_labels() -> np.ndarray:
    z, y, x = np.ogrid[:8, :24, :24]
    r = np.sqrt((z - 4) ** 2 * 4 + (y - 12) ** 2 + (x - 12) ** 2)
    lab = np.zeros((8, 24, 24), np.uint8)
    lab[r < 11] = 3
    lab[r < 8] = 2
    lab[r < 4] = 1
    return lab


def test_dice_against_reference_labels_known_case():
    """A segmenter that reproduces the reference labels on the clean image scores Dice 1; the
    same frozen segmenter on a noisy image scores less, and dice_agree is measured against the
    segmentation of the clean image."""
    lab = _phantom_labels()
    clean = np.select([lab == 1, lab == 2, lab == 3], [300.0, 200.0, 100.0], 0.0).astype(np.float32)
    roi = lab > 0
    seg = segment.fit_segmenter("mri_wm", clean, lab, smooth_sigma=0.0)
    perfect = evaluate.dice_scores(seg, clean, roi, lab)
    assert perfect["dice"] == pytest.approx(1.0) and perfect["dice_WM"] == pytest.approx(1.0)
    assert np.isnan(perfect["dice_agree"])  # no clean prediction given
    noisy = clean + np.random.default_rng(0).normal(0, 60, clean.shape).astype(np.float32)
    ref_pred = seg.predict(clean, roi)
    worse = evaluate.dice_scores(seg, noisy, roi, lab, ref_pred)
    assert 0 < worse["dice"] < 0.95 and worse["dice_agree"] == pytest.approx(worse["dice"])
    # a structure absent from the reference labels is not scored
    no_wm = np.where(lab == 1, 2, lab).astype(np.uint8)
    partial = evaluate.dice_scores(seg, clean, roi, no_wm)
    assert np.isnan(partial["dice_WM"]) and partial["dice"] == pytest.approx(partial["dice_GM"])


# ----------------------------------------------------------------------------- robustness helpers
@pytest.mark.parametrize("modality, noise, level", [
    ("mri", "speckle", 0.05), ("mri", "poisson", 0.05), ("ct", "rician", 0.25), ("us", "gaussian", 4.0),
    ("ct", "speckle", 0.25), ("us", "rician", 4.0)])
def test_mismatched_noise_matches_the_std(modality, noise, level):
    from dualnet.noise import noise_std_map

    rng = np.random.default_rng(1)
    base = {"mri": 0.5, "ct": 40.0, "us": 120.0}[modality]
    clean = (base + rng.uniform(-0.2, 0.2, (6, 40, 40)) * abs(base)).astype(np.float32)
    fg = np.ones(clean.shape, bool)
    noisy, std = evaluate.mismatched_noise(clean, modality, noise, level, 3, fg)
    target = float(np.mean(noise_std_map(clean, modality, level)))
    assert noisy.shape == clean.shape and std.shape == clean.shape
    assert float(std.mean()) == pytest.approx(target, rel=0.05)
    assert float(np.std(noisy - clean)) == pytest.approx(target, rel=0.1)
    with pytest.raises(evaluate.InputError):
        evaluate.mismatched_noise(clean, modality, "laplace", level, 3, fg)


def test_robustness_conditions_and_training_range():
    subset = {"name": "s", "modality": "mri", "levels": [0.05, 0.1]}
    rcfg = {"levels": {"mri": [0.005, 0.2]}, "mismatch": {"mri": ["speckle"], "ct": ["rician"]}}
    conds = evaluate.robustness_conditions(subset, rcfg, (0.01, 0.15))
    assert [(c.kind, c.level, c.in_range) for c in conds] == [
        ("level", 0.05, True), ("level", 0.005, False), ("level", 0.2, False), ("mismatch", 0.05, None)]
    assert conds[-1].noise == "speckle"
    assert evaluate.training_range({"noise_levels": [1.0, 16.0]}, "us") == ((1.0, 16.0), "model card noise_levels")
    assert evaluate.training_range({}, "ct")[0] == (0.1, 0.5)


def test_calibration_summary_detects_scale():
    rng = np.random.default_rng(0)
    std = rng.uniform(0.1, 2.0, 200_000)
    good = evaluate.calibration_summary(std, rng.normal(0, std))
    assert good["calibrated"] and good["spearman"] > 0.3 and len(good["bins"]) == 10
    assert good["median_ratio"] == pytest.approx(1.0, abs=0.05)
    bad = evaluate.calibration_summary(std, rng.normal(0, 5 * std))
    assert not bad["calibrated"] and bad["median_ratio"] == pytest.approx(5.0, rel=0.05)
    flat = evaluate.calibration_summary(np.zeros(100), rng.normal(0, 1, 100))
    assert np.isnan(flat["spearman"]) and not flat["calibrated"]


def test_inference_returns_neb_maps_in_input_units():
    """denoise_array blends the NEB sigma / alpha maps in the same tiling pass; sigma is in input
    units (a x10 input with percentile normalisation gives x10 sigma, the same alpha)."""
    from dualnet import inference, modelfile

    net, card = modelfile.load_model(MRI_MODEL, device="cpu")
    x = np.random.default_rng(0).normal(100.0, 10.0, (3, 24, 24)).astype(np.float32)
    # the shipped model takes the noise model of its input: variance 10^2, then 100^2 for 10 x
    a = inference.denoise_array(x, net, card, device="cpu", noise_coef=(100.0, 0.0, 0.0))
    b = inference.denoise_array(10 * x, net, card, device="cpu", noise_coef=(10000.0, 0.0, 0.0))
    for arr in (a.denoised, a.sigma_map, a.alpha_map):
        assert arr.shape == x.shape and arr.dtype == np.float32 and np.isfinite(arr).all()
    assert 0 <= a.alpha_map.min() <= a.alpha_map.max() <= 1 and a.sigma_map.min() > 0
    np.testing.assert_allclose(b.sigma_map, 10 * a.sigma_map, rtol=1e-3)
    np.testing.assert_allclose(b.alpha_map, a.alpha_map, atol=1e-5)
    np.testing.assert_allclose(b.denoised, 10 * a.denoised, rtol=1e-3, atol=1e-2)


# ----------------------------------------------------------------------------- study runs
CONFIG = """
[study]
name = "synthetic extras"
seeds = [0]
methods = {methods}
focus = ["dualnet", "gaussian"]
{extra}
[[subset]]
name = "phantom"
modality = "mri"
image = "mri/phantom.nii.gz"
labels = {{ kind = "freesurfer", file = "mri/phantom_labels.nii.gz" }}
slabs = {slabs}
levels = [0.05]
lr_factor = 2
"""


@pytest.fixture
def synthetic(tmp_path, monkeypatch):
    tmp, data, write = synthetic_study(tmp_path, monkeypatch, CONFIG)
    return tmp, data, lambda methods, extra="", slabs=1: write(methods, extra=extra, slabs=slabs)


PER_CASE = f"""
[methods.dualnet_ft]
per_case = true
steps = 3
base_model = "{MRI_MODEL.as_posix()}"
overrides = {{ batch_size = 2, patch_size = 16, val_patches = 2, warmup_steps = 1 }}
"""


def test_per_case_finetuning_on_the_noisy_input_only(synthetic, monkeypatch):
    from dualnet.training import trainer

    tmp, data, write = synthetic
    seen = {}
    real = trainer.finetune

    def spy(inputs, base_model_path, out_path, config=None, **kw):
        seen.update(inputs=inputs, base=Path(base_model_path), steps=config.steps, work=Path(out_path).parent,
                    cancel=kw.get("cancel"))
        return real(inputs, base_model_path, out_path, config, **kw)

    monkeypatch.setattr(trainer, "finetune", spy)
    cfg = write('["noisy", "dualnet", "dualnet_ft"]', PER_CASE)
    token, messages = CancelToken(), []
    md = evaluate.run_study(cfg, tmp / "out", data_dir=data, cancel=token,
                            progress=lambda f, m: messages.append(m)).read_text(encoding="utf-8")
    assert "fine-tuned self-supervised on each test case" in md
    assert seen["cancel"] is token  # progress and cancel reach the fine-tuning
    assert any(m.startswith("phantom slab0 dualnet_ft: ") for m in messages)
    rows = {r["method"]: r for r in _read_csv(tmp / "out" / "cases.csv")}
    assert set(rows) == {"noisy", "dualnet", "dualnet_ft"}
    ft = rows["dualnet_ft"]
    assert 0 < float(ft["seconds_finetune"]) <= float(ft["seconds"])  # runtime includes the fine-tuning
    assert np.isfinite(float(ft["psnr_fg"])) and np.isfinite(float(ft["dice"]))
    # fine-tuned on the case's noisy LR input only (never the clean reference), from the base model
    case = evaluate.load_cases(evaluate.load_config(cfg)["subset"][0], data)[0]
    d = evaluate._degrade_case(case, "mri", 0.05, 2, 0)
    (arr, spacing), = seen["inputs"]
    np.testing.assert_array_equal(arr, d.noisy[0])
    assert not np.allclose(arr, d.clean[0]) and tuple(spacing) == tuple(d.spacing_zyx)
    assert seen["base"] == MRI_MODEL and seen["steps"] == 3
    assert not seen["work"].exists()  # the temporary model folder is removed after the case


def test_per_case_inputs_stack_ultrasound_frames():
    frames = [np.zeros((8, 9), np.float32), np.ones((8, 9), np.float32)]
    (arr, sp), = evaluate._finetune_inputs(frames, (0.2, 0.3))
    assert arr.shape == (2, 8, 9) and sp == (1.0, 0.2, 0.3)
    slab = np.zeros((4, 8, 9), np.float32)
    assert evaluate._finetune_inputs([slab], (2.0, 1.0, 1.0))[0][1] == (2.0, 1.0, 1.0)


ABLATIONS = f"""
[methods.dualnet_ref]
kind = "network"
ablation = true
model = {{ mri = "{ABLATION_MODEL.as_posix()}" }}
description = "full model, ablation budget"
[methods.dualnet_noneb]
kind = "network"
ablation = true
model = {{ mri = "{ABLATION_MODEL.as_posix()}" }}
[methods.dualnet_nonl]
kind = "network"
ablation = true
model = {{ mri = "missing/dualnet_mri_nonl.safetensors" }}
[ablations]
metrics = ["psnr_fg", "dice"]   # SSIM needs more than the 5 LR slices of these slabs
pairs = [
  {{ full = "dualnet_ref", ablated = "dualnet_noneb", without = "the NEB" }},
  {{ full = "dualnet_ref", ablated = "dualnet_nonl", without = "non-local attention" }},
]
"""


def test_ablations_section_and_missing_models(synthetic):
    tmp, data, write = synthetic
    cfg = write('["noisy", "gaussian", "dualnet_ref", "dualnet_noneb", "dualnet_nonl"]', ABLATIONS, slabs=3)
    md = evaluate.run_study(cfg, tmp / "out", data_dir=data).read_text(encoding="utf-8")
    assert "## Ablations" in md and "full model, ablation budget" in md
    assert "DUAL-NET without non-local attention (`dualnet_nonl`): unavailable: model file" in md
    assert "dualnet_mri_nonl.safetensors not found" in md
    rows = _read_csv(tmp / "out" / "ablations.csv")
    assert {(r["full"], r["ablated"]) for r in rows} == {("dualnet_ref", "dualnet_noneb")}
    assert {r["metric"] for r in rows} == {"psnr_fg", "dice"} and all(r["n"] == "3" for r in rows)
    # the same weights under two names: zero difference, and the report says it is not significant
    assert all(float(r["mean_diff"]) == 0.0 for r in rows)
    assert "removing the NEB does NOT make the model significantly worse" in md
    # ablation variants stay out of the main statistics families
    stats = _read_csv(tmp / "out" / "stats.csv")
    assert stats and not {r["baseline"] for r in stats} & {"dualnet_ref", "dualnet_noneb"}


def test_calibration_sentence_names_the_direction_only_when_there_is_one():
    """The report's calibration sentence: a median ratio of about 1 is not called an over- or
    underestimate (the study read "overestimates ... by a factor of about 1.00")."""
    from dualnet.report import _calibration_sentence

    def say(ratio, calibrated=False):
        return _calibration_sentence("s", {"spearman": 0.1, "pearson": 0.1, "median_ratio": ratio,
                                           "calibrated": calibrated})

    assert "right on average" in say(0.998) and "estimates" not in say(0.998)
    assert "underestimates the actual RMSE by a factor of about 1.27" in say(1.27)
    assert "overestimates the actual RMSE by a factor of about 2.00" in say(0.5)
    assert "it is calibrated" in say(1.0, calibrated=True)
    assert "cannot be assessed" in say(float("nan"))


def test_the_cache_key_follows_the_card_not_only_the_weights(tmp_path):
    """The study's cache was keyed on the weights (and the card's TTA): a card-only change such as
    ``calibrate_card.py``'s uncertainty scale, or the view entries, reused stale results. A new
    validation record (no change to inference) keeps the key."""
    import json
    import shutil

    from dualnet.evaluate import model_stamp
    from dualnet.modelfile import card_path, default_model_path

    src = default_model_path("us")
    model = tmp_path / src.name
    shutil.copy2(src, model)
    shutil.copy2(card_path(src), card_path(model))
    before = model_stamp(model)
    card = json.loads(card_path(model).read_text(encoding="utf-8"))
    card["validation"] = {"note": "re-run"}
    card_path(model).write_text(json.dumps(card), encoding="utf-8")
    assert model_stamp(model) == before
    card["uncertainty_calibration"] = {**card.get("uncertainty_calibration", {}), "scale": 2.0}
    card_path(model).write_text(json.dumps(card), encoding="utf-8")
    assert model_stamp(model) != before
