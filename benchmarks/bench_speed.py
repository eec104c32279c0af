#!/usr/bin/env python
"""End-to-end speed benchmark (not a test): ``dualnet denoise`` with the shipped model against
``dualnet denoise --method bm4d`` (``bm3d`` on ultrasound frames), each a fresh process, so process
start, reading, the noise estimate, the network and writing all count. ``dualnet`` is the default
(three orthogonal views on these near-isotropic volumes, SURE guard on); ``dualnet --views 1`` the
fast setting (CT: ``dualnet --views 1 --no-tta``; ultrasound: ``dualnet --no-tta``). The default's arithmetic is the host's
(``--precision auto``: bf16 where the CPU has AMX bf16, with the intensity layers or the card's list in
fp32, else fp32 in ONNX Runtime); ``--fp32`` also times ``--precision float32``.

Volumes (z, y, x), written once to a temporary folder as NIfTI:

- ``mri_cube``  128^3 crop of the ADNI T1 (1 mm) with Rician noise at 5 % of its maximum;
- ``mri_slab``  60 x 256 x 256 slab of the ADNI T1 with Rician noise at 5 %;
- ``ct_slab``   60 x 256 x 256 of the chest CT (2x2 in-plane block average, 2 mm slices) at 25 % dose;
- ``us_frames`` 8 x 256 x 267: the first eight held-out B-mode frames of the ultrasound validation
  split (``us/images``, frames 0170-0179 with gaps; 2x2 block average) with Gamma speckle L = 4,
  denoised frame by frame; its baseline is BM3D per frame (``--method bm3d``), as in the
  validation. The ultrasound model's default includes its card's test-time augmentation
  (``test_time_augmentation``), so that cost is counted; ``dualnet --no-tta`` is the fast setting.

    python benchmarks/bench_speed.py [--repeats 2] [--volumes mri_cube mri_slab ct_slab us_frames] [--tta] [--torch] [--fp32]

Prints one table (wall seconds, best of ``--repeats``; speed-up = baseline / DUAL-NET) and the machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from common import REPO, machine

MODALITY = {"mri_cube": "mri", "mri_slab": "mri", "ct_slab": "ct", "us_frames": "us"}
#: the classical baseline each volume is compared with (BM3D frame by frame on ultrasound)
BASELINE = {"us_frames": "bm3d"}


def data_dir() -> Path:
    env = os.environ.get("DUALNET_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def write_volume(name: str, folder: Path) -> Path:
    """Make the noisy benchmark volume ``name`` and write it as NIfTI; returns its path."""
    import numpy as np

    from dualnet.io import Volume, read_volume, write_volume as write
    from dualnet.noise import add_noise

    if name.startswith("mri"):
        arr = read_volume(data_dir() / "mri" / "adni_mprage_t1.nii.gz").array.astype(np.float32)
        z, y, x = (s // 2 for s in arr.shape)
        arr = arr[z - 64:z + 64, y - 64:y + 64, x - 64:x + 64] if name == "mri_cube" else arr[z - 30:z + 30, :256, :256]
        noisy = add_noise(arr, "mri", 0.05, rng=0)
        spacing = (1.0, 1.0, 1.0)
    elif name == "us_frames":
        files = [f for f in sorted((data_dir() / "us" / "images").glob("*.png"))
                 if f.stem.isdigit() and 170 <= int(f.stem) <= 243][:8]  # the validation split's first 8
        frames = [read_volume(f).array for f in files]
        arr = np.stack([f[:f.shape[0] // 2 * 2, :f.shape[1] // 2 * 2] for f in frames]).astype(np.float32)
        arr = arr.reshape(len(frames), arr.shape[1] // 2, 2, arr.shape[2] // 2, 2).mean(axis=(2, 4))
        noisy = add_noise(arr, "us", 4.0, rng=0)
        spacing = (1.0, 1.0, 1.0)
    else:
        arr = read_volume(data_dir() / "ct" / "chest_ct.nii.gz").array.astype(np.float32)
        z = arr.shape[0] // 2
        arr = arr[z - 30:z + 30].reshape(60, 256, 2, 256, 2).mean(axis=(2, 4))
        noisy = add_noise(arr, "ct", 0.25, rng=0)
        spacing = (1.96, 1.96, 2.0)
    path = folder / f"{name}.nii.gz"
    write(Volume(noisy.astype(np.float32), spacing), path)
    return path


def base(name: str) -> str:
    """The baseline method ``name`` is timed against."""
    return BASELINE.get(name, "bm4d")


def time_command(args: list, repeats: int, env: Optional[dict] = None) -> float:
    """Best wall time in seconds of ``dualnet <args>`` in a fresh Python process (``env``: more
    environment variables)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dualnet", *args, "-q"], check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL, env={**os.environ, **(env or {})})
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", nargs="+", default=list(MODALITY), choices=list(MODALITY))
    ap.add_argument("--repeats", type=int, default=2, help="DUAL-NET runs per volume (best is kept)")
    ap.add_argument("--bm4d-repeats", type=int, default=1, help="runs of the baseline (BM4D / BM3D) per volume")
    ap.add_argument("--tta", action="store_true", help="also time DUAL-NET with x8 test-time augmentation")
    ap.add_argument("--torch", action="store_true",
                    help="also time the default with the network run by PyTorch (DUALNET_BACKEND=torch)")
    ap.add_argument("--fp32", action="store_true",
                    help="also time the default in full precision (--precision float32: ONNX Runtime), "
                         "which is the default where the CPU has no AMX bf16")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.volumes:
            src = write_volume(name, tmp)
            mod = MODALITY[name]
            torch_env = {"DUALNET_BACKEND": "torch"}
            # the fast setting: one view, no test-time augmentation (the US and CT defaults run x4 with one view)
            fast = ["--no-tta"] if mod == "us" else ["--views", "1"] + (["--no-tta"] if mod == "ct" else [])
            runs = [("dualnet", [], args.repeats, None), ("dualnet " + " ".join(fast), fast, args.repeats, None)] \
                + ([("dualnet, PyTorch backend", [], args.repeats, torch_env)] if args.torch else []) \
                + ([("dualnet --precision float32", ["--precision", "float32"], args.repeats, None)]
                   if args.fp32 else []) \
                + ([("dualnet --tta", ["--tta"], args.repeats, None)] if args.tta else []) \
                + [(base(name), ["--method", base(name)], args.bm4d_repeats, None)]
            times = {}
            for label, extra, reps, env in runs:
                out = tmp / f"{name}_{label.replace(' ', '_').replace(',', '')}.nii.gz"
                times[label] = time_command(["denoise", str(src), str(out), "--modality", mod, *extra], reps, env)
                print(f"{name}: {label} {times[label]:.1f} s", flush=True)
            rows.append((name, times))
    print()
    print(f"machine: {machine()}")
    print("| volume (z, y, x) | method | seconds (process start to file written) | baseline / this |")
    print("|---|---|---|---|")
    shapes = {"mri_cube": "MRI 128 x 128 x 128", "mri_slab": "MRI 60 x 256 x 256", "ct_slab": "CT 60 x 256 x 256",
              "us_frames": "US 8 frames of 256 x 267"}
    for name, times in rows:
        for label, sec in times.items():
            ratio = times[base(name)] / sec
            print(f"| {shapes[name]} | {label} | {sec:.1f} | {'' if label == base(name) else f'{ratio:.1f}x'} |")


if __name__ == "__main__":
    main()
