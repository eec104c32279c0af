"""A card's inference defaults fitted on the validation recorded in it (dualnet.calibration) and
written by scripts/calibrate_card.py: the MC-dropout scale, the default test-time augmentation
(refused unless the card's validation ran with it), the real shipped ultrasound weights and card
copied to a temporary folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dualnet.calibration import fit_uncertainty_calibration, set_test_time_augmentation
from dualnet.errors import InputError, ModelError
from dualnet.inference import choose_tta
from dualnet.modelfile import card_path, default_model_path, load_model, read_card

ROOT = Path(__file__).resolve().parents[1]


def _card(ratios, scale=1.0, tta=1):
    levels = [{"level": lev, "mean": {"dualnet": {"mc_std_ratio_fg": r, "mc_scale": scale, "tta": tta}}}
              for lev, r in ratios]
    return {"metrics": {"validation": {"setting": {"mc_samples": 8}}, "validation_levels": levels}}


def test_the_scale_matches_the_error_at_the_target_level_and_divides_out_the_old_one():
    cal = fit_uncertainty_calibration(_card([(4.0, 0.2), (2.0, 0.25)]))
    assert cal["scale"] == pytest.approx(5.0)
    assert cal["raw_std_to_error_ratio_fg"] == {"4": 0.2, "2": 0.25}
    assert cal["calibrated_std_to_error_ratio_fg"] == {"4": 1.0, "2": 1.25}
    assert "8 passes" in cal["method"]
    # validated with that scale already in the card: the same fit, not the scale squared
    again = fit_uncertainty_calibration(_card([(4.0, 1.0), (2.0, 1.25)], scale=5.0))
    assert again["scale"] == pytest.approx(5.0) and again["raw_std_to_error_ratio_fg"]["2"] == pytest.approx(0.25)


def test_a_calibrated_card_validated_without_recording_its_scale_is_refused():
    """A card validated with its scale applied before validate_models recorded it (the CT cards up to
    v8): fitting on it would take the calibrated ratio (about 1) for the raw one."""
    card = read_card(default_model_path("ct"))
    scale = card["uncertainty_calibration"]["scale"]
    for level in card["metrics"]["validation_levels"]:  # as measured with the scale, not recorded
        net = level["mean"]["dualnet"]
        net["mc_std_ratio_fg"] = net["mc_std_ratio_fg"] / net.pop("mc_scale", 1.0) * scale
    with pytest.raises(ModelError, match="mc_scale"):
        fit_uncertainty_calibration(card)
    for level in card["metrics"]["validation_levels"]:  # as validate_models now records it
        level["mean"]["dualnet"]["mc_scale"] = scale
    assert fit_uncertainty_calibration(card)["scale"] == pytest.approx(scale, rel=2e-3)


def test_a_card_without_mc_validation_is_refused():
    with pytest.raises(ModelError, match="validate_models"):
        fit_uncertainty_calibration({"metrics": {}})
    card = _card([(0.05, 0.2)])
    del card["metrics"]["validation_levels"][0]["mean"]["dualnet"]["mc_std_ratio_fg"]
    with pytest.raises(ModelError, match="--mc-samples"):
        fit_uncertainty_calibration(card)
    for bad in (_card([(0.05, 0.0)]), _card([(0.05, 0.2)], scale=0.0)):
        with pytest.raises(ModelError, match="not a positive number"):
            fit_uncertainty_calibration(bad)
    validated_x1 = _card([(4.0, 0.2)])
    validated_x1["test_time_augmentation"] = 4  # a default the validation did not run
    with pytest.raises(ModelError, match="validate as the model runs"):
        fit_uncertainty_calibration(validated_x1)


def test_the_default_tta_must_be_the_one_the_card_was_validated_with():
    card = _card([(4.0, 0.2), (2.0, 0.3)], tta=4)
    with pytest.raises(ModelError, match="--tta 8"):
        set_test_time_augmentation(card, 8)
    with pytest.raises(InputError, match="tta must be one of"):
        set_test_time_augmentation(card, 3)
    set_test_time_augmentation(card, 4)
    assert choose_tta(None, card) == 4
    card["metrics"]["validation_levels"][1]["mean"]["dualnet"]["tta"] = 1  # one level validated without it
    with pytest.raises(ModelError, match="ran 1 test-time transforms, the card's default is 4"):
        set_test_time_augmentation(card, 4)
    for level in card["metrics"]["validation_levels"]:
        level["mean"]["dualnet"]["tta"] = 1
    set_test_time_augmentation(card, 1)
    assert "test_time_augmentation" not in card and choose_tta(None, card) == 1


def test_the_default_tta_is_for_one_view_runs_and_checked_per_kind_of_case(mri_crop, one_thread):
    """A card's default transforms apply where one view runs; three views run without them (an
    explicit count applies to every view). A validation records what each kind of case ran, and
    the default must match it for both kinds."""
    from dualnet.inference import denoise_array
    from dualnet.models import build_model

    card = {"modality": "mri", "normalisation": {"method": "zscore"}, "orthogonal_views": True,
            "test_time_augmentation": 4}
    assert [choose_tta(None, card, v) for v in (1, 3)] == [4, 1]
    assert [choose_tta(8, card, v) for v in (1, 3)] == [8, 8] and choose_tta(False, card, 3) == 1
    torch.manual_seed(0)
    net = build_model("tiny", 2, context=3, use_nonlocal=False)
    vol = mri_crop[:16, :16, :16].astype(np.float32)
    three = denoise_array(vol, net, card, device="cpu", modality="mri", guard=False)
    one = denoise_array(vol[0], net, card, device="cpu", modality="mri", guard=False)
    assert (three.info["views"], three.info["tta"], one.info["views"], one.info["tta"]) == (3, 1, 1, 4)

    validated = _card([(4.0, 0.2), (2.0, 0.3)])
    for level in validated["metrics"]["validation_levels"]:  # as validate_models records a mixed set
        level["mean"]["dualnet"].update(tta=3.4, tta_by_views={"1": [4], "3": [1]})
    with pytest.raises(ModelError, match=r"ran \[4\] test-time transforms with 1 view"):
        fit_uncertainty_calibration(validated)  # the card's default (none) is not what ran
    set_test_time_augmentation(validated, 4)
    assert fit_uncertainty_calibration(validated)["scale"] == 5.0  # 1 / the ratio at the first level
    explicit = _card([(4.0, 0.2)])  # validated with --tta 4 everywhere: three views ran it too
    explicit["metrics"]["validation_levels"][0]["mean"]["dualnet"].update(tta=4, tta_by_views={"1": [4], "3": [4]})
    with pytest.raises(ModelError, match=r"ran \[4\] test-time transforms with 3 view\(s\) \(the card's default: 1\)"):
        set_test_time_augmentation(explicit, 4)


def test_the_script_rewrites_only_the_card_and_refuses_an_unvalidated_default(tmp_path):
    src = default_model_path("us")
    weights = tmp_path / src.name
    shutil.copy(src, weights)
    shutil.copy(card_path(src), card_path(weights))
    card = read_card(weights)
    for level in card["metrics"]["validation_levels"]:  # a raw validation made before tta was recorded
        level["mean"]["dualnet"].pop("tta", None)
        level["mean"]["dualnet"].pop("tta_by_views", None)
        level["mean"]["dualnet"]["mc_scale"] = 1.0
    card_path(weights).write_text(json.dumps(card))
    before = card_path(weights).read_bytes()
    script = [sys.executable, str(ROOT / "scripts" / "calibrate_card.py"), str(weights)]
    refused = subprocess.run(script + ["--tta", "8"], capture_output=True, text=True)
    assert refused.returncode == 2 and "validate with --tta 8" in refused.stderr
    assert card_path(weights).read_bytes() == before  # nothing written
    for level in card["metrics"]["validation_levels"]:
        level["mean"]["dualnet"]["tta"] = 8
    card_path(weights).write_text(json.dumps(card))
    done = subprocess.run(script + ["--tta", "8"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    net, written = load_model(weights, "cpu")  # the weights' hash still holds
    assert choose_tta(None, written) == 8
    card["test_time_augmentation"] = 8
    expected = fit_uncertainty_calibration(card)
    assert written["uncertainty_calibration"] == expected


def test_the_shipped_defaults_are_the_validated_ones():
    """Where one view runs, the shipped ultrasound and CT models run x4 test-time augmentation by
    default and the MRI model none; with three views none does; and each card's validation ran as its
    model runs by default (the CT validation holds both kinds of case)."""
    from dualnet.calibration import _tta_mismatch

    for modality, expected in (("us", 4), ("mri", 1), ("ct", 4)):
        card = read_card(default_model_path(modality))
        assert (choose_tta(None, card), choose_tta(None, card, 3)) == (expected, 1), modality
        for level in card["metrics"]["validation_levels"]:
            assert _tta_mismatch(level["mean"]["dualnet"], card) == "", (modality, level["level"])
    ct = read_card(default_model_path("ct"))
    assert all(lev["mean"]["dualnet"]["tta_by_views"] == {"1": [4], "3": [1]}
               for lev in ct["metrics"]["validation_levels"])
    us = read_card(default_model_path("us"))
    assert fit_uncertainty_calibration(us) == us["uncertainty_calibration"]  # fitted on what the card holds


@pytest.mark.parametrize("names", [["bm4d"], ["noisy"], ["a", "a"]])
def test_validate_models_refuses_labels_that_would_merge_rows(names, tmp_path):
    """A model labelled like the baseline or the input (or two alike) would share their row of the
    table and of the JSON: refused before any case runs (the real config and the shipped model)."""
    model = str(default_model_path("mri"))
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "validate_models.py"), *[model] * len(names),
                          "--names", *names, "--config",
                          str(ROOT / "DualNetDenoise" / "dualnet" / "configs" / "pretrain_mri.toml"),
                          "--data-dir", str(tmp_path / "absent"), "--no-write"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "--names must be distinct" in res.stderr


def test_best_sigma_baseline_keeps_the_best_of_its_sigma_multiples(mri_crop):
    """`validate_models.py --baseline-sigma-scales`: the oracle row is the scale with the highest
    whole-image PSNR, and its scores are that run's (real NLM on a real MRI crop with Rician noise)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from validate_models import best_sigma_run, scores

    from dualnet.api import denoise_volume
    from dualnet.estimate import estimate_noise
    from dualnet.io import Volume
    from dualnet.noise import add_noise

    ref = mri_crop[14:26].astype(np.float32)
    noisy = Volume(add_noise(ref, "mri", 0.05, 3).astype(np.float32), (1.0, 1.0, 1.0))
    scales = (0.5, 1.0, 2.0)
    best = best_sigma_run(noisy, ref, "nlm", "mri", scales)
    sigma = estimate_noise(noisy.array, "mri").sigma
    each = {k: scores(ref, denoise_volume(noisy, method="nlm", modality="mri", sigma=k * sigma).volume.array, "mri")
            for k in scales}
    top = max(scales, key=lambda k: each[k]["psnr"])
    assert best["sigma_scale"] == top and best["psnr"] == pytest.approx(each[top]["psnr"], abs=1e-9)
    assert len({round(v["psnr"], 3) for v in each.values()}) == 3  # the scales really differ
    # the baseline as validate_models runs it (its own estimate) is the multiple 1, reused, not rerun
    plain = scores(ref, denoise_volume(noisy, method="nlm", modality="mri").volume.array, "mri")
    assert plain["psnr"] == pytest.approx(each[1.0]["psnr"], abs=1e-9)
    reused = best_sigma_run(noisy, ref, "nlm", "mri", scales, at_estimate={**plain, "seconds": 0.0})
    assert {k: reused[k] for k in ("psnr", "sigma_scale")} == {k: best[k] for k in ("psnr", "sigma_scale")}


def test_untouched_validation_images_are_the_complement_of_the_scored_ones(shared_data):
    """`validate_models.py --untouched` scores the validation images the evenly spaced selection
    (what every card and candidate choice used) leaves out: none of them twice, none missing."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from validate_models import load_config, validation_images

    cfg = load_config(ROOT / "DualNetDenoise" / "dualnet" / "configs" / "pretrain_us.toml")
    scored = [im[2] for im in validation_images(cfg, str(shared_data), 8)]
    untouched = [im[2] for im in validation_images(cfg, str(shared_data), 8, untouched=True)]
    everything = [im[2] for im in validation_images(cfg, str(shared_data), 10 ** 6)]
    assert len(scored) == 8 and not set(scored) & set(untouched)
    assert sorted(scored + untouched) == sorted(everything) and len(untouched) > 50
