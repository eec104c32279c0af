#!/usr/bin/env python
"""Diagnostic (not a test): where DUAL-NET's whole-image error on the CT validation slices lies,
outside the body or in it, against BM4D's (the project's baseline, same input).

For each 2D clinical slice of the CT config's validation split, degraded as
``scripts/validate_models.py`` does (same seeds), at ``--dose``: the background fraction, the clean
air's mean and lowest HU, the noisy input's and the network's mean error outside the body mask
(``metrics.foreground_mask``), the mean squared error outside and inside the body for the network
and for ``--baseline``, and the network's whole-image PSNR as is and with its mean background error
taken out (a per-slice oracle: an upper bound on what removing an offset is worth).

    python scripts/probe_ct_background.py [--dose 0.25] [--model PATH] [--baseline bm4d|none]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DualNetDenoise"))
sys.path.insert(0, str(REPO / "scripts"))

from dualnet import baselines  # noqa: E402
from dualnet.inference import denoise_array  # noqa: E402
from dualnet.metrics import foreground_mask, psnr  # noqa: E402
from dualnet.modelfile import load_model  # noqa: E402
from dualnet.training.config import TrainConfig  # noqa: E402
from validate_models import degraded_cases, validation_images  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dose", type=float, default=0.25)
    ap.add_argument("--model", default=str(REPO / "DualNetDenoise/dualnet/weights/dualnet_ct.safetensors"))
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--baseline", default="bm4d", help="classical method to compare with, or none")
    args = ap.parse_args()
    cfg = TrainConfig.from_toml(REPO / "DualNetDenoise/dualnet/configs/pretrain_ct.toml")
    net, card = load_model(args.model, "cpu")
    base = None if args.baseline == "none" else args.baseline
    b_cols = f" | {base} MSE outside / inside (HU^2)" if base else ""
    print("| slice | outside the body | clean air mean / lowest HU | noisy mean error there (HU) | DUAL-NET's (HU) "
          f"| DUAL-NET MSE outside / inside (HU^2){b_cols} | whole-image PSNR as is / offset taken out |")
    print("|---|---|---|---|---|---|" + ("---|" if base else "") + "---|")
    for d, name in degraded_cases(validation_images(cfg, args.data_dir, 5), "ct", args.dose, 2):
        ref, noisy = d.clean_lr.astype(np.float32), d.noisy_lr.astype(np.float32)
        if ref.ndim != 2:
            continue  # the 3D volume has almost no air
        out = denoise_array(noisy, net, card, device="cpu", modality="ct").denoised
        bg = ~foreground_mask(ref, "ct")
        err = out - ref
        fixed = out.copy()
        fixed[bg] -= err[bg].mean()
        rng = float(ref.max() - ref.min())
        b_err = None if base is None else baselines.denoise(noisy, base, "ct") - ref
        print(f"| {Path(name).name} | {bg.mean():.0%} | {ref[bg].mean():.0f} / {ref[bg].min():.0f} "
              f"| {(noisy - ref)[bg].mean():+.1f} | {err[bg].mean():+.1f} | {_mse_split(err, bg)} "
              + ("" if b_err is None else f"| {_mse_split(b_err, bg)} ")
              + f"| {psnr(ref, out, data_range=rng):.2f} / {psnr(ref, fixed, data_range=rng):.2f} |", flush=True)


def _mse_split(err: np.ndarray, bg: np.ndarray) -> str:
    return f"{float(np.mean(err[bg] ** 2)):.1f} / {float(np.mean(err[~bg] ** 2)):.1f}"


if __name__ == "__main__":
    main()
