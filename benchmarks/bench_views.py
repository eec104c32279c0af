"""Orthogonal views against one view and against x8 test-time augmentation, on the validation volumes.

For each 3D validation case of a model's config (degraded as ``scripts/validate_models.py`` does:
2 mm, the modality's noise at its target level) prints whole-image / foreground PSNR (CT: and the
[-160, 240] HU window) of the shipped network run along z (one view, the old default), along y
only, along x only, along z with x8 flips / rotations, and along all three averaged
(:mod:`dualnet.orthoviews`), with the seconds of each. The SURE guard is on, as by default.

    python benchmarks/bench_views.py [--modality mri|ct] [--threads 1] [--no-tta]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DualNetDenoise"))
sys.path.insert(0, str(REPO / "scripts"))

from dualnet.degrade import degrade  # noqa: E402
from dualnet.inference import denoise_array  # noqa: E402
from dualnet.modelfile import default_model_path, load_model  # noqa: E402
from dualnet.noise import DEFAULT_LEVELS  # noqa: E402
from dualnet.training.config import load_config  # noqa: E402
from validate_models import scores, validation_images  # noqa: E402


def along(axis: int, run):
    """``run`` on the volume seen along ``axis`` (one view), turned back."""
    def f(x: np.ndarray) -> np.ndarray:
        return np.moveaxis(run(np.ascontiguousarray(np.moveaxis(x, axis, 0))), 0, axis)
    return f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modality", default="mri", choices=["mri", "ct"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: as inference chooses)")
    ap.add_argument("--no-tta", action="store_true", help="leave out the x8 TTA column (8x the time)")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    if args.threads:
        os.environ["DUALNET_NUM_THREADS"] = str(args.threads)
    m = args.modality
    cfg = load_config(REPO / f"DualNetDenoise/dualnet/configs/pretrain_{m}.toml")
    net, card = load_model(default_model_path(m), "cpu")
    level = DEFAULT_LEVELS[m]

    def run(x: np.ndarray, **kw) -> np.ndarray:
        return denoise_array(x, net, card, device="cpu", modality=m, **kw).denoised

    variants = {"z (one view)": lambda x: run(x, views=1),
                "y only": along(1, lambda x: run(x, views=1)),
                "x only": along(2, lambda x: run(x, views=1))}
    if not args.no_tta:
        variants["z, x8 TTA"] = lambda x: run(x, views=1, tta=True)
    variants["three views"] = lambda x: run(x, views=3)
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}; "
          f"model {default_model_path(m).name}; level {level}")
    keys = ("psnr", "psnr_fg") + (("psnr_win",) if m == "ct" else ())
    print("| case | " + " | ".join(variants) + " |")
    print("|---|" + "---|" * len(variants))
    for k, (arr, spacing, name) in enumerate(validation_images(cfg, args.data_dir or str(REPO.parent / "shared" / "data"), 8)):
        if arr.ndim != 3 or min(arr.shape) < 32:
            continue  # 2D slices have one view
        d = degrade(arr, m, level, lr_factor=cfg.lr_factor, spacing_zyx=spacing, rng=1000 + k)
        noisy, ref = d.noisy_lr.astype(np.float32), d.clean_lr.astype(np.float32)
        cells = []
        for f in variants.values():
            t = time.perf_counter()
            out = f(noisy)
            sec = time.perf_counter() - t
            s = scores(ref, out, m)
            cells.append(" / ".join(f"{s[key]:.2f}" for key in keys) + f" ({sec:.1f} s)")
        print(f"| {Path(name).name} | " + " | ".join(cells) + " |", flush=True)
    print("cells: whole / foreground PSNR" + (" / window PSNR" if m == "ct" else "") + " in dB (seconds)")


if __name__ == "__main__":
    main()
