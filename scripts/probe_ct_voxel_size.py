#!/usr/bin/env python
"""DUAL-NET against BM4D on the chest CT at growing voxel sizes (not a test; docs/design_sweep.md, session 25).

The chest CT (a training subject of the CT model, so its native row flatters the network) is cropped,
block-averaged by 1x1x1, 1x3x3 and 2x3x3 (``degrade.downsample``), then degraded as in validation
(25 % dose, x2 with anti-aliasing, seed 7). Prints whole / foreground / [-160, 240] HU window PSNR of
the CT model (default: the shipped one) and of BM4D (``api.denoise_volume``), scored by
``validate_models.scores``. Session 25's table used CT v9:

    DUALNET_NUM_THREADS=1 python scripts/probe_ct_voxel_size.py [DualNetDenoise/dualnet/weights/history/dualnet_ct_v9.safetensors]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import validate_models as vm  # noqa: E402
from dualnet.api import denoise_volume  # noqa: E402
from dualnet.degrade import degrade, downsample  # noqa: E402
from dualnet.io import Volume, read_volume  # noqa: E402
from dualnet.training.config import default_data_dir  # noqa: E402


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else None
    v = read_volume(default_data_dir() / "ct" / "chest_ct.nii.gz")
    a, sp = v.array.astype(np.float32), tuple(v.spacing_zyx)
    cases = {"native, z 40:72 crop": (a[40:72, 96:416, 96:416], sp),
             "block-averaged 1x3x3": (downsample(a[40:100], (1, 3, 3))[0], (sp[0], sp[1] * 3, sp[2] * 3)),
             "block-averaged 2x3x3": (downsample(a[20:120], (2, 3, 3))[0], (sp[0] * 2, sp[1] * 3, sp[2] * 3))}
    for name, (arr, spacing) in cases.items():
        d = degrade(arr, "ct", 0.25, lr_factor=2, spacing_zyx=spacing, rng=7)
        ref, noisy = d.clean_lr.astype(np.float32), d.noisy_lr.astype(np.float32)
        line = f"{name:22s} LR {ref.shape} {tuple(round(s, 1) for s in d.spacing_lr_zyx)} mm"
        for method in ("dualnet", "bm4d"):
            t = time.perf_counter()
            out = denoise_volume(Volume(noisy, tuple(reversed(d.spacing_lr_zyx))), method=method, modality="ct",
                                 model=model if method == "dualnet" else None).volume.array
            s = vm.scores(ref, out, "ct")
            line += f" | {method} {s['psnr']:.2f} / {s['psnr_fg']:.2f} / {s['psnr_win']:.2f} dB ({time.perf_counter() - t:.0f} s)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
