#!/usr/bin/env python
"""Fit a model card's inference defaults on the validation recorded in it and write them.

    python scripts/validate_models.py MODEL --config ... --levels ... --mc-samples 8 [--tta 4]
    python scripts/calibrate_card.py MODEL [--tta 4] [--no-calibration]

``uncertainty_calibration`` (the MC-dropout scale, :func:`dualnet.calibration.fit_uncertainty_calibration`)
is fitted at the first validated level; ``--tta N`` makes N test-time transforms the model's default
(refused unless the validation ran with N). The card is rewritten atomically; the weights are not
touched, so their hash still holds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "DualNetDenoise"))

from dualnet.calibration import fit_uncertainty_calibration, set_test_time_augmentation  # noqa: E402
from dualnet.errors import DualNetError  # noqa: E402
from dualnet.modelfile import read_card, rewrite_card  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a model file (.safetensors) with its card")
    ap.add_argument("--tta", type=int, choices=(1, 4, 8), default=None,
                    help="make this many test-time transforms the model's default")
    ap.add_argument("--no-calibration", action="store_true", help="leave uncertainty_calibration as it is")
    args = ap.parse_args(argv)
    try:
        card = read_card(args.model)
        if args.tta is not None:
            set_test_time_augmentation(card, args.tta)
        if not args.no_calibration:
            card["uncertainty_calibration"] = fit_uncertainty_calibration(card)
        path = rewrite_card(args.model, card)
    except DualNetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cal = card.get("uncertainty_calibration", {})
    print(f"wrote {path}: test_time_augmentation {card.get('test_time_augmentation', 1)}, "
          f"uncertainty scale {cal.get('scale', 1.0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
