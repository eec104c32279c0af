"""Denoising quality, time and memory on a real low-resolution MRI: the numbers to beat.

The ADNI T1 MPRAGE (``../shared/data/mri/adni_mprage_t1.nii.gz``, 1 mm) is blurred and
downsampled to 2 mm by ``dualnet.degrade`` and given Rician noise at 3, 5, 7 and 9 % of its
maximum. Each method denoises the noisy 2 mm volume in a fresh process; PSNR and SSIM are
measured against the clean 2 mm volume with the clean volume's data range (max - min), on the
head foreground mask (``metrics.foreground_mask``) and on the whole volume. Seconds are wall
time of the ``denoise_volume`` call; peak memory is the process's peak RSS (which includes
~0.1 GB of data and libraries) and its increase during the call.

    python benchmarks/bench_denoise.py [--methods bm4d,bm3d,nlm,dualnet] [--levels 0.03,0.05,0.07,0.09]

This is a benchmark, not a test: it prints a Markdown table and records the machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import REPO, machine, peak_rss_mib, run_isolated

DEFAULT_DATA = REPO.parent / "shared" / "data" / "mri" / "adni_mprage_t1.nii.gz"


def job(data: str, method: str, level: float, seed: int, threads: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from dualnet.api import denoise_volume
    from dualnet.degrade import degrade_volume
    from dualnet.io import read_volume
    from dualnet.metrics import foreground_mask, psnr, ssim

    clean = read_volume(data)
    clean.array = clean.array.astype(np.float32)
    noisy, clean_lr = degrade_volume(clean, "mri", level, lr_factor=2, seed=seed)
    ref = clean_lr.array
    rng = float(ref.max() - ref.min())
    mask = foreground_mask(ref, "mri")
    base = peak_rss_mib()
    if method == "noisy":
        out, seconds = noisy.array, 0.0
    else:
        start = time.perf_counter()
        out = denoise_volume(noisy, method=method, modality="mri").volume.array
        seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    return {
        "method": method, "level": level, "shape_zyx": list(ref.shape),
        "psnr_fg": psnr(ref, out, data_range=rng, mask=mask), "ssim_fg": ssim(ref, out, data_range=rng, mask=mask),
        "psnr_all": psnr(ref, out, data_range=rng), "ssim_all": ssim(ref, out, data_range=rng),
        "seconds": seconds, "peak_mib": peak, "delta_mib": peak - base,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--methods", default="noisy,bm4d,bm3d,nlm")
    ap.add_argument("--levels", default="0.03,0.05,0.07,0.09")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    ap.add_argument("--json", help="also write all rows to this JSON file")
    args = ap.parse_args()
    import os

    threads = args.threads or os.cpu_count()
    rows = []
    print(f"machine: {machine()}\n")
    print("| noise (% of max) | method | PSNR fg (dB) | SSIM fg | PSNR whole (dB) | SSIM whole | seconds | peak RSS (MiB) | +RSS during call (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for level in [float(x) for x in args.levels.split(",")]:
        for method in args.methods.split(","):
            r = run_isolated(job, args.data, method, level, args.seed, threads)
            rows.append(r)
            print(f"| {level:.0%} | {method} | {r['psnr_fg']:.2f} | {r['ssim_fg']:.4f} | {r['psnr_all']:.2f} | "
                  f"{r['ssim_all']:.4f} | {r['seconds']:.1f} | {r['peak_mib']:.0f} | {r['delta_mib']:.0f} |", flush=True)
    if rows:
        print(f"\nvolume (z, y, x) = {tuple(rows[0]['shape_zyx'])} at 2 mm; data range = clean max - min; "
              "fg = Otsu head mask of the clean volume")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
