"""Print the shipped models' validation numbers (from their cards) as Markdown tables.

    python scripts/model_table.py            # the README's "Shipped models" tables

The numbers are those ``scripts/validate_models.py`` wrote into each card (held-out cases, BM4D /
BM3D in the same run). The first table is the target setting; the second every level validated.
"""

from __future__ import annotations

import json
from pathlib import Path

WEIGHTS = Path(__file__).resolve().parents[1] / "DualNetDenoise" / "dualnet" / "weights"
SETTING = {"mri": "Rician {:.1%} of max", "ct": "{:.0%} dose", "us": "speckle L = {:g}"}


def _budget(training: dict) -> tuple:
    """(steps, minutes) of one training run from its card's ``training`` entry."""
    minutes = float(training.get("seconds", training.get("training_seconds", 0)) or 0) / 60
    return training.get("steps", "?"), minutes


def lineage_runs(card: dict) -> list:
    """``[(steps, minutes), ...]`` of every training run behind a model, oldest first: the runs
    its ``initialised_from`` lineage records, then its own."""
    init = card.get("initialised_from") or {}
    earlier = [*init.get("lineage", []), init.get("training", {})] if init else []
    return [_budget(t) for t in earlier] + [_budget(card.get("training", {}))]


def _design(arch: dict, card: dict) -> str:
    ctx = int(arch.get("context", 1))
    parts = [f"{arch.get('preset')} {'2.5D x' + str(ctx) if ctx > 1 else str(arch.get('dim')) + 'D'}"]
    if arch.get("blocks"):
        parts.append(f"blocks {list(arch['blocks'])}")
    if arch.get("noise_map"):
        parts.append("noise map")
    if arch.get("confidence_head", "gate") != "gate":
        parts.append(f"{arch['confidence_head']} confidence head")
    if int(card.get("test_time_augmentation", 1)) > 1:
        where = " where one view runs" if card.get("orthogonal_views") else ""  # three views run without it
        parts.append(f"x{card['test_time_augmentation']} test-time augmentation{where}")
    smoothing = card.get("view_smoothing")
    if isinstance(smoothing, dict):
        parts.append(f"three-view mean smoothed where the views disagree (strength {smoothing.get('strength')})")
    return ", ".join(parts)


def _data(paths: list) -> str:
    """Validation sources, files of one folder collapsed to ``folder/ (n files)``."""
    groups: dict = {}
    for p in paths:
        groups.setdefault(str(Path(p).parent) if p.endswith((".nii.gz", ".png", ".nrrd", ".mha")) else p, []).append(p)
    return ", ".join(", ".join(v) if len(v) <= 2 else f"{k}/ ({len(v)} files)" for k, v in groups.items())


def _setting(modality: str, level: float) -> str:
    text = SETTING[modality].format(level)
    return text.replace(".0%", "%")


def _vs_best(mean: dict, base: str) -> str:
    """DUAL-NET minus the baseline at its best sigma per case (``validate_models.py
    --baseline-sigma-scales``; an oracle of the whole-image PSNR: the foreground figure is at that same
    sigma, not at the foreground's own best), whole / foreground; "not run" where the card has none."""
    best = mean.get(f"{base}_best_sigma")
    if best is None:
        return "not run"
    d = mean["dualnet"]
    return f"{d['psnr'] - best['psnr']:+.2f} / {d['psnr_fg'] - best['psnr_fg']:+.2f}"


def _cards():
    for card_path in sorted(WEIGHTS.glob("dualnet_*.json")):
        card = json.loads(card_path.read_text(encoding="utf-8"))
        if card.get("metrics", {}).get("validation"):
            yield card_path, card


def main() -> None:
    print("| model | design, params | trained | held-out data (cases) | setting | noisy PSNR / SSIM | "
          "DUAL-NET PSNR / SSIM (s) | BM4D (BM3D for 2D ultrasound) PSNR / SSIM (s) | DUAL-NET - BM4D, whole / "
          "foreground | DUAL-NET - BM4D at its whole-image-best sigma, whole / foreground |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for card_path, card in _cards():
        v = card["metrics"]["validation"]
        m, s = v["mean"], v["setting"]
        base = "bm4d" if "bm4d" in m else next(k for k in m if k not in ("noisy", "dualnet"))
        runs = lineage_runs(card)  # continued training: the runs it started from count too
        steps = " + ".join(str(s0) for s0, _ in runs)
        minutes = " + ".join(f"{m0:.0f}" for _, m0 in runs)
        d, b = m["dualnet"], m[base]
        print(f"| `{card_path.stem}` | {_design(card.get('architecture', {}), card)}, {card.get('parameters', '?')} | "
              f"{steps} steps, {minutes} min CPU | {_data(s['data'])} ({s['cases']}) | "
              f"{_setting(s['modality'], s['level'])}, LR x{s['lr_factor']} | "
              f"{m['noisy']['psnr']:.2f} / {m['noisy']['ssim']:.3f} | "
              f"{d['psnr']:.2f} / {d['ssim']:.3f} ({d['seconds']:.1f}) | "
              f"{b['psnr']:.2f} / {b['ssim']:.3f} ({b['seconds']:.1f}) | "
              f"{d['psnr'] - b['psnr']:+.2f} / {d['psnr_fg'] - b['psnr_fg']:+.2f} dB | {_vs_best(m, base)} |")
    print()
    print("| model | level | noisy PSNR | DUAL-NET PSNR / SSIM | BM4D (BM3D for 2D ultrasound) PSNR / SSIM | "
          "DUAL-NET - BM4D whole / fg (dB) | DUAL-NET - BM4D at its whole-image-best sigma, whole / fg (dB) | "
          "CT window [-160, 240] HU: DUAL-NET / BM4D PSNR |")
    print("|---|---|---|---|---|---|---|---|")
    for card_path, card in _cards():
        modality = card["metrics"]["validation"]["setting"]["modality"]
        for lev in card["metrics"].get("validation_levels", []):
            m = lev["mean"]
            base = "bm4d" if "bm4d" in m else next(k for k in m if k not in ("noisy", "dualnet"))
            d, b = m["dualnet"], m[base]
            win = (f"{d['psnr_win']:.2f} / {b['psnr_win']:.2f}" if "psnr_win" in d else "")
            print(f"| `{card_path.stem}` | {_setting(modality, lev['level'])} | {m['noisy']['psnr']:.2f} | "
                  f"{d['psnr']:.2f} / {d['ssim']:.3f} | {b['psnr']:.2f} / {b['ssim']:.3f} | "
                  f"{d['psnr'] - b['psnr']:+.2f} / {d['psnr_fg'] - b['psnr_fg']:+.2f} | {_vs_best(m, base)} | {win} |")


if __name__ == "__main__":
    main()
