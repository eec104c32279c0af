#!/usr/bin/env python
"""Diagnostic (not a test): is the noise map a noise-map model is given at inference calibrated?

On the validation cases of a training config, degraded as ``scripts/validate_models.py`` does
(same seeds), the noise variance polynomial is estimated from each noisy input as ``dualnet
denoise`` estimates it, then scaled by ``s^2`` (the noise std by ``s``) for each ``--scales`` value,
and the network's mean whole-image and foreground PSNR is printed per scale. An optimum away from 1
says the estimate (or the network's reading of it) is biased; a flat curve says nothing is to be
gained there. Views and guard as ``dualnet denoise`` runs them; no TTA.

    python scripts/probe_noise_map_scale.py --config DualNetDenoise/dualnet/configs/pretrain_us.toml \\
        [--model PATH] [--level 4] [--scales 0.85 0.93 1 1.08 1.17]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DualNetDenoise"))
sys.path.insert(0, str(REPO / "scripts"))

from dualnet.inference import denoise_array  # noqa: E402
from dualnet.metrics import foreground_mask, psnr  # noqa: E402
from dualnet.modelfile import default_model_path, load_model  # noqa: E402
from dualnet.noise import DEFAULT_LEVELS  # noqa: E402
from dualnet.training.config import load_config  # noqa: E402
from dualnet.training.data import noise_variance_model  # noqa: E402
from validate_models import degraded_cases, validation_images  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="the training config whose val sources are used")
    ap.add_argument("--model", default=None, help="model file (default: the shipped model of the config's modality)")
    ap.add_argument("--level", type=float, default=None, help="noise level (default: the issue's target)")
    ap.add_argument("--scales", type=float, nargs="+", default=[0.85, 0.93, 1.0, 1.08, 1.17])
    ap.add_argument("--max-cases", type=int, default=8)
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    args = ap.parse_args()
    cfg = load_config(args.config)
    modality = cfg.modality
    level = DEFAULT_LEVELS[modality] if args.level is None else args.level
    net, card = load_model(args.model or default_model_path(modality), "cpu")
    whole = {s: [] for s in args.scales}
    fg_scores = {s: [] for s in args.scales}
    for d, name in degraded_cases(validation_images(cfg, args.data_dir, args.max_cases), modality, level,
                                  cfg.lr_factor):
        noisy, ref = d.noisy_lr.astype(np.float32), d.clean_lr.astype(np.float32)
        coef, _ = noise_variance_model(noisy, modality)
        fg = foreground_mask(ref, modality)
        span = float(ref.max() - ref.min())
        for s in args.scales:
            out = denoise_array(noisy, net, card, device="cpu", modality=modality, tta=1,
                                spacing_zyx=d.spacing_lr_zyx, noise_coef=tuple(c * s * s for c in coef)).denoised
            whole[s].append(psnr(ref, out, data_range=span))
            fg_scores[s].append(psnr(ref, out, data_range=span, mask=fg))
        print(f"{Path(name).name}: noise variance polynomial {tuple(round(c, 6) for c in coef)}", flush=True)
    print(f"\n{modality} at level {level:g}, {len(whole[args.scales[0]])} cases")
    print("| noise map x | PSNR (dB) | PSNR foreground (dB) |")
    print("|---|---|---|")
    for s in args.scales:
        print(f"| {s:g} | {np.mean(whole[s]):.3f} | {np.mean(fg_scores[s]):.3f} |")


if __name__ == "__main__":
    main()
