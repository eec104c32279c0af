#!/usr/bin/env python
"""Per-slice squared error of MRI models on a thin slab of the skull-stripped VoxelMorph T1 (not a test).

The slab is the middle 32 slices of ``../shared/data/mri/voxelmorph_brain_t1.nii.gz``, degraded as in
validation (x2 with anti-aliasing, Rician 5 %, seed 3), 16 slices after degradation. Each model runs as
``dualnet denoise`` does by default (three views, SURE guard). Prints, per model, the whole-slab PSNR,
the mean output in the background (clean <= 1 % of the maximum) and, per slice (z), the mean squared
error in the background and in the foreground, in millionths of the squared maximum.

    python scripts/probe_mri_slab_background.py [MODEL.safetensors ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from dualnet import modelfile
from dualnet.degrade import degrade
from dualnet.inference import denoise_array
from dualnet.io import read_volume
from dualnet.training.config import default_data_dir

REPO = Path(__file__).resolve().parents[1]
DEFAULT = [REPO / "DualNetDenoise/dualnet/weights/dualnet_mri.safetensors",
           REPO / "DualNetDenoise/dualnet/weights/history/dualnet_mri_ctx9_not_shipped.safetensors"]


def main() -> None:
    vol = read_volume(default_data_dir() / "mri" / "voxelmorph_brain_t1.nii.gz")
    arr = vol.array.astype(np.float32)
    z0 = arr.shape[0] // 2 - 16
    d = degrade(arr[z0:z0 + 32], "mri", 0.05, lr_factor=2, spacing_zyx=vol.spacing_zyx, rng=3)
    clean, noisy = d.clean_lr.astype(np.float32), d.noisy_lr.astype(np.float32)
    top = float(clean.max())
    bg = clean <= 0.01 * top
    print(f"slab (z, y, x) {clean.shape}, background {bg.mean():.0%} of the voxels")
    for path in [Path(p) for p in sys.argv[1:]] or DEFAULT:
        net, card = modelfile.load_model(path, "cpu")
        out = denoise_array(noisy, net, card, modality="mri").denoised
        err = (out - clean) ** 2 / top**2 * 1e6
        psnr = 10 * np.log10(1e6 / err.mean())
        print(f"{path.name}: whole-slab PSNR {psnr:.2f} dB, background mean {out[bg].mean() / top:.2%} of the maximum")
        print("  background MSE per slice:", " ".join(f"{err[z][bg[z]].mean():.1f}" for z in range(len(err))))
        print("  foreground MSE per slice:", " ".join(f"{err[z][~bg[z]].mean():.0f}" for z in range(len(err))))


if __name__ == "__main__":
    main()
