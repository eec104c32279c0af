#!/usr/bin/env python
"""Inference benchmark (not a test): seconds and peak RSS per method, volume and mode.

Each measurement runs in a fresh child process; its peak RSS (VmHWM, reset after the input
volume is built, so it includes the input but not its synthesis) is its own. The 'import' row
gives the baseline RSS of a child that only imported torch and the core.
Networks are randomly initialised (speed and memory do not depend on the weights).

Examples::

    python benchmarks/bench_inference.py                       # everything on CPU
    python benchmarks/bench_inference.py --volumes cube --presets tiny --no-bm4d   # quick
    python benchmarks/bench_inference.py --volumes big --modes 2d  # 512x512x300 peak memory

Volumes (z, y, x): ``cube`` 128^3 crop of the ADNI T1, ``adni`` the whole 170x256x256 ADNI
T1 (/work/shared/data/mri/adni_mprage_t1.nii.gz or $DUALNET_SHARED_DATA), ``big`` a
300x512x512 volume (the ADNI T1 tiled), all with 5 % Rician noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DualNetDenoise"))

CARD = {"modality": "mri", "normalisation": {"method": "percentile", "p_low": 0.5, "p_high": 99.5}}


def data_dir() -> Path:
    env = os.environ.get("DUALNET_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def make_volume(name: str):
    """(z, y, x) float32 noisy volume and the noise sigma in its units."""
    import numpy as np

    from dualnet.io import read_volume

    arr = read_volume(data_dir() / "mri" / "adni_mprage_t1.nii.gz").array.astype(np.float32)
    if name == "cube":
        z, y, x = (s // 2 for s in arr.shape)
        arr = arr[z - 64:z + 64, y - 64:y + 64, x - 64:x + 64]
    elif name == "big":
        arr = np.tile(arr, (2, 2, 2))[:300, :512, :512]
    elif name != "adni":
        raise SystemExit(f"unknown volume {name}")
    rng = np.random.default_rng(0)
    sigma = 0.05 * float(arr.max())
    noisy = np.sqrt((arr + sigma * rng.standard_normal(arr.shape, dtype=np.float32)) ** 2
                    + (sigma * rng.standard_normal(arr.shape, dtype=np.float32)) ** 2)
    return np.ascontiguousarray(noisy, dtype=np.float32), sigma


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so set-up costs are not counted."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    """Peak resident memory in MiB since the last :func:`reset_peak_rss` (else process start)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def run_one(job: dict) -> dict:
    """Child: one measurement, returns a result dict."""
    import torch  # noqa: F401

    import dualnet.inference  # noqa: F401

    if job["method"] == "import":
        return {"seconds": 0.0, "peak_rss_mib": peak_rss_mib()}
    vol, sigma = make_volume(job["volume"])
    import gc

    gc.collect()
    reset_peak_rss()  # peak counts the input volume and everything after, not its synthesis
    t0 = time.perf_counter()
    extra = {}
    if job["method"] == "bm4d":
        try:
            from dualnet.baselines import denoise  # written by another engineer

            denoise(vol, "bm4d", "mri", sigma=sigma)
            extra["via"] = "dualnet.baselines"
        except ImportError:
            import bm4d

            bm4d.bm4d(vol, sigma)
            extra["via"] = "bm4d.bm4d (Gaussian, no VST)"
    else:
        import torch

        from dualnet.inference import denoise_array
        from dualnet.models import build_model

        from dualnet.errors import CancelledError
        from dualnet.progress import CancelToken

        torch.manual_seed(0)
        model = build_model(job["preset"], 2 if job["mode"] == "2d" else 3)
        token, seen = CancelToken(), []
        limit = job.get("max_batches")

        def progress(fraction: float, message: str) -> None:
            if message.startswith("denoising: batch"):
                seen.append(fraction)
                if limit and len(seen) >= limit:
                    token.cancel()

        try:
            res = denoise_array(vol, model, CARD, device=job["device"], tile=job.get("tile"),
                                progress=progress, cancel=token)
            extra.update(tile=res.info["tile"], batch=res.info["batch"], amp=res.info["amp"],
                         threads=res.info["threads"], precision=res.info.get("precision"),
                         backend=res.info.get("backend"))
        except CancelledError:  # partial run: peak RSS of the tiling phase, time extrapolated
            elapsed = time.perf_counter() - t0
            extra.update(partial=f"{len(seen)} batches, {100 * seen[-1] / 0.99:.1f} %",
                         extrapolated_s=round(elapsed / (seen[-1] / 0.99), 1))
        if job["device"] == "cuda":
            extra["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib(), **extra}


def machine_info() -> str:
    import torch

    from common import cpu_model
    from dualnet.device import cpu_count

    cpu = cpu_model()

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"CPU: {cpu}; usable cores: {cpu_count()}; torch {torch.__version__}; "
            f"python {platform.python_version()}; GPU: {gpu}; "
            f"DUALNET_NUM_THREADS={os.environ.get('DUALNET_NUM_THREADS', '(unset)')}")


def gpu_section() -> None:
    """ms per 512x512 slice (2D) and s per 256^3 volume (3D), under autocast."""
    import numpy as np
    import torch

    from dualnet.inference import denoise_array
    from dualnet.models import build_model

    rng = np.random.default_rng(0)
    for preset in ("tiny", "small"):
        m2 = build_model(preset, 2)
        sl = rng.normal(100, 10, (8, 512, 512)).astype(np.float32)
        denoise_array(sl[:1], m2, CARD, device="cuda")  # warm-up
        torch.cuda.synchronize()
        res = denoise_array(sl, m2, CARD, device="cuda", tile=512)
        print(f"GPU {preset:6s} 2D: {1000 * res.info['seconds'] / 8:8.1f} ms per 512x512 slice"
              f" (amp {res.info['amp']})")
        m3 = build_model(preset, 3)
        vol = rng.normal(100, 10, (256, 256, 256)).astype(np.float32)
        res = denoise_array(vol, m3, CARD, device="cuda")
        print(f"GPU {preset:6s} 3D: {res.info['seconds']:8.2f} s per 256^3 volume "
              f"(tile {res.info['tile']}, amp {res.info['amp']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--volumes", nargs="+", default=["cube", "adni", "big"],
                    choices=["cube", "adni", "big"])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"],
                    help="DUAL-NET presets built with default settings (tiling and memory of a preset); the "
                         "shipped models (preset 'cpu', 2.5D context, noise map, ONNX Runtime) are timed end to "
                         "end by benchmarks/bench_speed.py")
    ap.add_argument("--modes", nargs="+", default=["2d", "3d"], choices=["2d", "3d"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tile", type=int, default=None, help="tile side (default: automatic)")
    ap.add_argument("--no-bm4d", action="store_true")
    ap.add_argument("--bm4d-volumes", nargs="+", default=["cube", "adni"],
                    help="BM4D is slow: volumes to run it on")
    ap.add_argument("--gpu", action="store_true", help="also run the GPU section (if CUDA)")
    ap.add_argument("--max-batches", type=int, default=None,
                    help="stop network runs after N tile batches (peak RSS of the tiling phase "
                         "and an extrapolated time; for quick runs on big volumes)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))))
        return

    print(machine_info())
    jobs = [{"method": "import", "volume": "-", "preset": "-", "mode": "-"}]
    for vol in args.volumes:
        for preset in args.presets:
            for mode in args.modes:
                if vol == "big" and not (preset == args.presets[0]):
                    continue  # big volume: peak memory of the first preset only
                jobs.append(dict(method="dualnet", volume=vol, preset=preset, mode=mode,
                                 device=args.device, tile=args.tile,
                                 max_batches=args.max_batches))
        if not args.no_bm4d and vol in args.bm4d_volumes:
            jobs.append(dict(method="bm4d", volume=vol, preset="-", mode="3d"))
    print(f"{'method':8s} {'volume':6s} {'preset':6s} {'mode':4s} {'seconds':>9s} "
          f"{'peak RSS MiB':>12s}  details")
    for job in jobs:
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)],
                              capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{job['method']:8s} {job['volume']:6s} {job['preset']:6s} {job['mode']:4s} "
                  f"FAILED: {err}")
            continue
        res = json.loads(line[0][7:])
        details = {k: v for k, v in res.items() if k not in ("seconds", "peak_rss_mib")}
        print(f"{job['method']:8s} {job['volume']:6s} {job['preset']:6s} {job['mode']:4s} "
              f"{res['seconds']:9.2f} {res['peak_rss_mib']:12.0f}  {details or ''}", flush=True)
    if args.gpu:
        import torch

        if torch.cuda.is_available():
            gpu_section()
        else:
            print("GPU section skipped: CUDA not available")


if __name__ == "__main__":
    main()
