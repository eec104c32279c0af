"""Quality against training time: every kept version of one modality's model, scored on today's
held-out cases against BM4D in the same run.

The issue's quality gate asks for the measured curve where a target is missed. The curve is not
read from old cards, whose validation cases and seeds changed between versions; every version is
scored again here on the validation cases of today's training config at the gate's setting, with
the seeds of ``scripts/validate_models.py``, and BM4D (BM3D for 2D ultrasound frames) once.
Training time is the model's whole lineage (every run it was continued from, one CPU core each),
from the cards. A version that restarted from scratch starts its own lineage.

    python scripts/gate_curve.py ct [--level 0.25] [--json out.json]

Prints one Markdown table, oldest version first. Versions kept in ``weights/history`` as
``dualnet_<modality>_v<N>[a-z].safetensors`` (candidates marked ``not_shipped`` are left out), then
the shipped ``weights/dualnet_<modality>.safetensors``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import sys
from pathlib import Path
from typing import List, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from model_table import lineage_runs  # noqa: E402
from validate_models import run_level, validation_images  # noqa: E402

from dualnet.io import atomic_write_bytes  # noqa: E402
from dualnet.modelfile import read_card  # noqa: E402
from dualnet.noise import DEFAULT_LEVELS  # noqa: E402
from dualnet.training.config import load_config  # noqa: E402

WEIGHTS = REPO / "DualNetDenoise" / "dualnet" / "weights"
CONFIGS = REPO / "DualNetDenoise" / "dualnet" / "configs"


def versions(modality: str) -> List[Tuple[str, Path]]:
    """``[(label, model file), ...]``: the kept versions in version order, then the shipped model."""
    found = []
    for p in (WEIGHTS / "history").glob(f"dualnet_{modality}_v*.safetensors"):
        m = re.fullmatch(rf"dualnet_{modality}_v(\d+)([a-z]?)", p.stem)
        if m:
            found.append(((int(m.group(1)), m.group(2)), f"v{m.group(1)}{m.group(2)}", p))
    shipped = WEIGHTS / f"dualnet_{modality}.safetensors"
    return [(label, p) for _, label, p in sorted(found)] + [("shipped", shipped)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modality", choices=("mri", "ct", "us"))
    ap.add_argument("--config", default=None, help="training config whose val sources are scored "
                                                   "(default: configs/pretrain_<modality>.toml)")
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--level", type=float, default=None, help="noise level (default: the gate's)")
    ap.add_argument("--max-cases", type=int, default=8)
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()

    cfg = load_config(args.config or CONFIGS / f"pretrain_{args.modality}.toml")
    level = float(args.level if args.level is not None else DEFAULT_LEVELS[args.modality])
    baseline = "bm4d"
    models = versions(args.modality)
    images = validation_images(cfg, args.data_dir, args.max_cases)
    res = run_level([str(p) for _, p in models], [label for label, _ in models], images, args.modality,
                    level, int(cfg.lr_factor), baseline)
    mean = res["mean"]
    win = args.modality == "ct"
    psnrs = ("psnr", "psnr_fg") + (("psnr_win",) if win else ())  # whole, foreground, CT window
    rows = []
    for label, path in models:
        card = read_card(path)
        runs = lineage_runs(card)
        s, b = mean[label], mean[baseline]
        rows.append({"version": label, "file": path.name, "parameters": card.get("parameters"),
                     "runs": len(runs), "minutes": round(sum(m for _, m in runs), 1),
                     "steps": sum(int(st) for st, _ in runs if str(st).isdigit()),
                     **{k: s[k] for k in psnrs + ("ssim",)},
                     "minus_bm4d": {k: round(s[k] - b[k], 3) for k in psnrs + ("ssim",)}})
    head = ("| version | parameters | lineage: runs, CPU minutes | PSNR whole / fg" + (" / window" if win else "")
            + " (dB) | SSIM | minus BM4D: whole / fg" + (" / window" if win else "") + " (dB), SSIM |")
    print(f"\n{args.modality}, level {level:g}, {len(images)} held-out cases; BM4D (BM3D on 2D images): "
          + " / ".join(f"{mean[baseline][k]:.2f}" for k in psnrs) + f" dB, SSIM {mean[baseline]['ssim']:.3f}\n")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        d = r["minus_bm4d"]
        print(f"| {r['version']} | {r['parameters']} | {r['runs']}, {r['minutes']:.0f} | "
              + " / ".join(f"{r[k]:.2f}" for k in psnrs) + f" | {r['ssim']:.3f} | "
              + " / ".join(f"{d[k]:+.2f}" for k in psnrs) + f", {d['ssim']:+.3f} |")
    if args.json:
        payload = {"modality": args.modality, "level": level, "cases": len(images), "baseline": mean[baseline],
                   "command": " ".join(["python", "scripts/gate_curve.py"] + sys.argv[1:]),
                   "machine": f"{platform.machine()}, {platform.processor() or 'CPU'}, Python {platform.python_version()}",
                   "date": datetime.date.today().isoformat(), "rows": rows,
                   "per_case": res["per_case"]}
        atomic_write_bytes(Path(args.json), (json.dumps(payload, indent=1) + "\n").encode("utf-8"))


if __name__ == "__main__":
    main()
