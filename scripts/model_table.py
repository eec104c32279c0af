"""Print the shipped models' validation numbers (from their cards) as a Markdown table.

    python scripts/model_table.py            # the README's "Shipped models" table
"""

from __future__ import annotations

import json
from pathlib import Path

WEIGHTS = Path(__file__).resolve().parents[1] / "DualNetDenoise" / "dualnet" / "weights"
SETTING = {"mri": "Rician {:.0%} of max", "ct": "{:.0%} dose", "us": "speckle L = {:g}"}


def _budget(training: dict) -> tuple:
    """(steps, minutes) of one training run from its card's ``training`` entry."""
    minutes = float(training.get("seconds", training.get("training_seconds", 0)) or 0) / 60
    return training.get("steps", "?"), minutes


def main() -> None:
    print("| model | preset, params | trained | held-out data (cases) | setting | noisy PSNR / SSIM | "
          "DUAL-NET PSNR / SSIM (s) | BM4D PSNR / SSIM (s) | DUAL-NET - BM4D |")
    print("|---|---|---|---|---|---|---|---|---|")
    for card_path in sorted(WEIGHTS.glob("dualnet_*.json")):
        card = json.loads(card_path.read_text(encoding="utf-8"))
        v = card.get("metrics", {}).get("validation")
        if not v:
            continue
        t = card.get("training", {})
        arch = card.get("architecture", {})
        m = v["mean"]
        s = v["setting"]
        steps, minutes = _budget(t)
        init = card.get("initialised_from") or {}
        if init:  # continued training: count the run it started from too
            s0, m0 = _budget(init.get("training", {}))
            steps, minutes = f"{s0} + {steps}", f"{m0:.0f} + {minutes:.0f}"
        else:
            minutes = f"{minutes:.0f}"
        print(f"| `{card_path.stem}` | {arch.get('preset')} {arch.get('dim')}D, {card.get('parameters', '?')} | "
              f"{steps} steps, {minutes} min CPU | {', '.join(s['data'])} ({s['cases']}) | "
              f"{SETTING[s['modality']].format(s['level'])}, LR x{s['lr_factor']} | "
              f"{m['noisy']['psnr']:.2f} / {m['noisy']['ssim']:.3f} | "
              f"{m['dualnet']['psnr']:.2f} / {m['dualnet']['ssim']:.3f} ({m['dualnet']['seconds']:.1f}) | "
              f"{m['bm4d']['psnr']:.2f} / {m['bm4d']['ssim']:.3f} ({m['bm4d']['seconds']:.1f}) | "
              f"{v['psnr_gain_vs_baseline_db']:+.2f} dB |")


if __name__ == "__main__":
    main()
