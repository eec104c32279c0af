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

import pytest

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
    with pytest.raises(ModelError, match=r"\[1, 4\]"):
        set_test_time_augmentation(card, 4)
    for level in card["metrics"]["validation_levels"]:
        level["mean"]["dualnet"]["tta"] = 1
    set_test_time_augmentation(card, 1)
    assert "test_time_augmentation" not in card and choose_tta(None, card) == 1


def test_the_script_rewrites_only_the_card_and_refuses_an_unvalidated_default(tmp_path):
    src = default_model_path("us")
    weights = tmp_path / src.name
    shutil.copy(src, weights)
    shutil.copy(card_path(src), card_path(weights))
    card = read_card(weights)
    for level in card["metrics"]["validation_levels"]:  # a raw validation made before tta was recorded
        level["mean"]["dualnet"].pop("tta", None)
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
    """The shipped ultrasound model runs x4 test-time augmentation by default, the MRI and CT models
    none, and each card's validation ran as its model runs by default."""
    for modality, expected in (("us", 4), ("mri", 1), ("ct", 1)):
        card = read_card(default_model_path(modality))
        assert choose_tta(None, card) == expected, modality
        for level in card["metrics"]["validation_levels"]:
            assert int(level["mean"]["dualnet"].get("tta", 1)) == expected, (modality, level["level"])
    us = read_card(default_model_path("us"))
    assert fit_uncertainty_calibration(us) == us["uncertainty_calibration"]  # fitted on what the card holds
