"""A model card's inference defaults, fitted on the validation recorded in it
(``metrics.validation_levels``, written by ``scripts/validate_models.py``):

- ``uncertainty_calibration``: post-hoc sigma scaling of the MC-dropout std (Laves et al. 2020),
  one scale that makes the std's RMS over the foreground match the RMS error at the target level
  (the first validation level);
- ``test_time_augmentation``: the number of test-time transforms ``dualnet denoise`` averages by
  default where one view runs (:data:`dualnet.inference.TTA_CHOICES`; none with three views,
  :func:`dualnet.inference.choose_tta`), accepted only when the validation in the card was run so,
  so the card's numbers describe the default.

Cards are plain dicts here; reading and writing them is the caller's.
"""

from __future__ import annotations

from typing import Any, Dict, List

from .errors import ModelError
from .inference import choose_tta


def _levels(card: Dict[str, Any]) -> List[Dict[str, Any]]:
    levels = ((card.get("metrics") or {}).get("validation_levels")) or []
    if not levels:
        raise ModelError("model card has no metrics.validation_levels: run scripts/validate_models.py first")
    return levels


def _network(level: Dict[str, Any]) -> Dict[str, Any]:
    return (level.get("mean") or {}).get("dualnet") or {}


def _tta_mismatch(net: Dict[str, Any], card: Dict[str, Any]) -> str:
    """How the test-time transforms a validated level ran differ from the card's default for each
    kind of case (one view, three views; :func:`dualnet.inference.choose_tta`); "" where they agree.
    Validations recorded before the per-views record (``tta_by_views``) give their mean ``tta``."""
    by_views = net.get("tta_by_views")
    if not by_views:
        ran, default = int(net.get("tta", 1)), choose_tta(None, card)
        return "" if ran == default else f"ran {ran} test-time transforms, the card's default is {default}"
    default = {v: choose_tta(None, card, int(v)) for v in by_views}
    wrong = [v for v, ran in by_views.items() if list(ran) != [default[v]]]
    return "" if not wrong else "ran " + ", ".join(
        f"{by_views[v]} test-time transforms with {v} view(s) (the card's default: {default[v]})" for v in wrong)


def fit_uncertainty_calibration(card: Dict[str, Any]) -> Dict[str, Any]:
    """The card's ``uncertainty_calibration`` entry fitted on its validation: ``scale`` = the
    inverse of the raw (unscaled) MC-std-to-error ratio over the foreground at the target level,
    with the raw and calibrated ratios at every validated level.

    The ratios in the card were measured with the scale the card had then (``mc_scale``), which is
    divided out first. A validation that did not record it counts as unscaled only while the card
    has no calibration yet; after one it is ambiguous and refused.

    Raises:
        ModelError: no validation with MC-dropout (``--mc-samples``) in the card, a validation
        without ``mc_scale`` in a calibrated card, a validation that did not run the card's default
        test-time augmentation, or a ratio or scale that is not a positive finite number.
    """
    default_tta = choose_tta(None, card)
    raw: Dict[str, float] = {}
    for level in _levels(card):
        net, where = _network(level), f"level {level.get('level')!r}"
        if "mc_std_ratio_fg" not in net:
            raise ModelError(f"model card: no MC-dropout ratio at {where}: validate with --mc-samples first")
        if "mc_scale" not in net and "uncertainty_calibration" in card:
            raise ModelError(f"model card: the validation at {where} did not record the calibration it ran with "
                             "(mc_scale): validate again with --mc-samples")
        mismatch = _tta_mismatch(net, card)
        if mismatch:
            raise ModelError(f"model card: the validation at {where} {mismatch}: validate as the model runs")
        used = float(net.get("mc_scale", 1.0))
        ratio = float(net["mc_std_ratio_fg"]) / used if used > 0 else float("nan")
        if not 0.0 < ratio < float("inf"):
            raise ModelError(f"model card: MC-dropout ratio {ratio!r} at {where} is not a positive number")
        raw[f"{float(level['level']):g}"] = ratio
    target = next(iter(raw))
    scale = 1.0 / raw[target]
    validation = (card.get("metrics") or {}).get("validation") or {}
    passes = (validation.get("setting") or {}).get("mc_samples")
    return {
        "scale": round(scale, 3),
        "method": "post-hoc sigma-scaling (Laves et al. 2020): the MC-dropout std"
                  + (f" ({passes} passes)" if passes else "")
                  + " is multiplied by scale so that its RMS over the foreground matches the RMS error",
        "fitted_on": f"the validation cases at the target level {target} (metrics.validation), as `dualnet "
                     f"denoise` runs by default (test-time transforms: {default_tta}"
                     + (" where one view runs, 1 with three views)" if default_tta > 1 else ")"),
        "raw_std_to_error_ratio_fg": {k: round(v, 4) for k, v in raw.items()},
        "calibrated_std_to_error_ratio_fg": {k: round(v * scale, 3) for k, v in raw.items()},
    }


def set_test_time_augmentation(card: Dict[str, Any], n: int) -> None:
    """Make ``n`` transforms the card's default test-time augmentation (1 removes the entry).

    Raises:
        InputError: ``n`` is not one of :data:`dualnet.inference.TTA_CHOICES`.
        ModelError: the validation in the card did not run as that default would at every level
            (``n`` transforms where one view runs, none with three).
    """
    n = choose_tta(int(n), None)
    trial = {**card, "test_time_augmentation": n}
    wrong = [m for m in (_tta_mismatch(_network(level), trial) for level in _levels(card)) if m]
    if wrong:
        raise ModelError(f"model card: its validation {wrong[0]} for a default of {n}: validate with --tta {n} "
                         f"first (where a case runs three views: with the card's test_time_augmentation at {n}, "
                         "without --tta)")
    if n == 1:
        card.pop("test_time_augmentation", None)
    else:
        card["test_time_augmentation"] = n
