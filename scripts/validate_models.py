"""Measure a model against BM4D on its held-out validation data and record the numbers in its card.

For each model the validation sources of its training config (``split = "val"``, never seen in
training) are degraded with ``dualnet.degrade`` at the issue's target setting (lr_factor 2;
MRI Rician 5 % of max, CT 25 % dose, ultrasound L = 4; fixed seeds). DUAL-NET and BM4D (with its
modality transform; BM3D for 2D ultrasound frames) denoise the same noisy images; PSNR / SSIM are
computed against the clean low-resolution image with data range = clean max - min, on the whole
image and on the foreground mask (``metrics.foreground_mask``). The case (volume, or ultrasound
frame) is the unit. Results go to the card's ``metrics.validation`` together with this command.

    python scripts/validate_models.py DualNetDenoise/dualnet/weights/dualnet_mri.safetensors \
        --config DualNetDenoise/dualnet/configs/pretrain_mri.toml [--max-cases 8] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DualNetDenoise"))

from dualnet.api import denoise_volume  # noqa: E402
from dualnet.degrade import degrade  # noqa: E402
from dualnet.io import Volume, atomic_write_bytes  # noqa: E402
from dualnet.metrics import foreground_mask, psnr, ssim  # noqa: E402
from dualnet.modelfile import card_path, read_card  # noqa: E402
from dualnet.noise import DEFAULT_LEVELS  # noqa: E402
from dualnet.training.config import load_config  # noqa: E402
from dualnet.training.data import read_source, resolve_path  # noqa: E402


def scores(ref: np.ndarray, out: np.ndarray, modality: str) -> dict:
    rng = float(ref.max() - ref.min())
    mask = foreground_mask(ref, modality)
    return {"psnr": psnr(ref, out, data_range=rng), "ssim": ssim(ref, out, data_range=rng),
            "psnr_fg": psnr(ref, out, data_range=rng, mask=mask), "ssim_fg": ssim(ref, out, data_range=rng, mask=mask)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--config", required=True, help="the model's training config (its val sources)")
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--level", type=float, default=None, help="noise level (default: the issue's target)")
    ap.add_argument("--max-cases", type=int, default=8, help="at most this many validation images (evenly spaced)")
    ap.add_argument("--baseline", default="bm4d")
    ap.add_argument("--no-write", action="store_true", help="print only; leave the card unchanged")
    args = ap.parse_args()

    cfg = load_config(args.config)
    modality = cfg.modality
    level = DEFAULT_LEVELS[modality] if args.level is None else args.level
    images = []
    for src in (s for s in cfg.data if s.split == "val"):
        images += read_source(resolve_path(src.path, args.data_dir), frame=src.frame, crop=src.crop, frames=src.frames)
    if len(images) > args.max_cases:
        idx = np.linspace(0, len(images) - 1, args.max_cases).round().astype(int)
        images = [images[i] for i in idx]
    rows = []
    for k, (arr, spacing_zyx, name) in enumerate(images):
        d = degrade(arr, modality, level, lr_factor=cfg.lr_factor, spacing_zyx=spacing_zyx, rng=1000 + k)
        noisy = Volume(d.noisy_lr.astype(np.float32), tuple(reversed(d.spacing_lr_zyx)))
        ref = d.clean_lr.astype(np.float32)
        row = {"case": Path(name).name, "shape_zyx": list(ref.shape), "noisy": scores(ref, noisy.array, modality)}
        for method, kw in (("dualnet", {"model": args.model, "device": "cpu"}), (args.baseline, {})):
            t = time.perf_counter()
            out = denoise_volume(noisy, method=method, modality=modality, **kw).volume.array
            row[method] = scores(ref, out, modality)
            row[method]["seconds"] = time.perf_counter() - t
        rows.append(row)
        print(f"{row['case']}: noisy {row['noisy']['psnr']:.2f} dB | dualnet {row['dualnet']['psnr']:.2f} dB "
              f"({row['dualnet']['seconds']:.1f} s) | {args.baseline} {row[args.baseline]['psnr']:.2f} dB "
              f"({row[args.baseline]['seconds']:.1f} s)", flush=True)

    def mean(method, key):
        return float(np.mean([r[method][key] for r in rows]))

    summary = {m: {k: round(mean(m, k), 4) for k in ("psnr", "ssim", "psnr_fg", "ssim_fg")}
               for m in ("noisy", "dualnet", args.baseline)}
    for m in ("dualnet", args.baseline):
        summary[m]["seconds"] = round(mean(m, "seconds"), 2)
    gain = summary["dualnet"]["psnr"] - summary[args.baseline]["psnr"]
    result = {
        "setting": {"modality": modality, "level": level, "lr_factor": cfg.lr_factor,
                    "data": [s.path for s in cfg.data if s.split == "val"], "cases": len(rows),
                    "data_range": "clean low-resolution max - min", "mask": "whole image and foreground (fg)",
                    "baseline": f"{args.baseline} with the {modality} transform (sigma estimated)"},
        "mean": summary, "psnr_gain_vs_baseline_db": round(gain, 3), "per_case": rows,
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, CPU, {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps({"mean": summary, "psnr_gain_vs_baseline_db": round(gain, 3)}, indent=1))
    if not args.no_write:
        cpath = card_path(args.model)
        card = read_card(cpath)
        card.setdefault("metrics", {})["validation"] = result
        atomic_write_bytes(cpath, (json.dumps(card, indent=2, default=float) + "\n").encode())
        print(f"wrote metrics.validation into {cpath}")


if __name__ == "__main__":
    main()
