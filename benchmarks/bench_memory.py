#!/usr/bin/env python
"""Peak memory of network denoising on the CPU (not a test): a 512 x 512 x 300 CT-like volume
through the shipped default model, each run a fresh process.

The volume is the real chest CT (``ct/chest_ct.nii.gz``, 512 x 512 x 141, int16 HU, with its own
scanner noise) mirrored back and forth along z to ``--slices`` slices (no jump at the joins) and
cropped in-plane to ``--size``; it is written once, uncompressed, to a temporary folder.

Runs (``--via``):

- ``cli``: ``python -m dualnet denoise IN OUT --modality ct --device cpu -q`` (what a user runs:
  reading, the noise estimate, the network and writing all count);
- ``api``: a child that reads the volume and calls ``dualnet.api.denoise_volume`` (no writing).

Peak RSS is the child's own (``os.wait4`` rusage ``ru_maxrss``: whole process, libraries and the
input included). ``--core DIR`` (repeatable) runs the ``dualnet`` package found in ``DIR`` instead
of this checkout's, e.g. an older version exported with ``git archive``, for before/after rows.

    python benchmarks/bench_memory.py                     # 512 x 512 x 300, CLI (minutes)
    python benchmarks/bench_memory.py --slices 40 --via cli api   # quick check

Prints a markdown table and the machine line.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, machine

API_CHILD = """
import sys
from dualnet import api
from dualnet.io import read_volume
vol = read_volume(sys.argv[1])
res = api.denoise_volume(vol, method="dualnet", modality=sys.argv[2], device="cpu",
                         model=sys.argv[3] if len(sys.argv) > 3 else None)
print("shape", res.volume.array.shape, "seconds", res.info.get("seconds"))
"""


def data_dir() -> Path:
    env = os.environ.get("DUALNET_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def make_volume(path: Path, slices: int, size: int) -> tuple:
    """Write the CT-like test volume to ``path``; returns its (z, y, x) shape."""
    import numpy as np

    from dualnet.io import read_volume, write_volume

    ct = read_volume(data_dir() / "ct" / "chest_ct.nii.gz")
    arr = ct.array
    n = arr.shape[0]
    period = 2 * n - 2
    idx = np.arange(slices) % period
    idx = np.where(idx < n, idx, period - idx)  # 0..n-1, n-2..1, 0.. (mirrored, no jumps)
    y0 = max(0, (arr.shape[1] - size) // 2)
    x0 = max(0, (arr.shape[2] - size) // 2)
    out = np.ascontiguousarray(arr[idx, y0:y0 + size, x0:x0 + size])
    write_volume(ct.with_array(out), path, compress=False)
    return out.shape


def run_child(cmd: list, core: Path) -> tuple:
    """Run ``cmd`` with ``core`` first on the import path; (peak RSS GiB, wall s, tail of output)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(core)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{out[-3000:]}")
    return usage.ru_maxrss / 2**20, wall, out.strip()[-300:]  # ru_maxrss: KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=300, help="z size (default 300)")
    ap.add_argument("--size", type=int, default=512, help="in-plane size, at most 512 (default 512)")
    ap.add_argument("--modality", default="ct", choices=["ct"], help="the CT-like volume is CT")
    ap.add_argument("--model", default=None, help="model file (default: the shipped default for the modality)")
    ap.add_argument("--via", nargs="+", default=["cli"], choices=["cli", "api"])
    ap.add_argument("--core", action="append", type=Path, default=None,
                    help="folder holding the dualnet package to measure (repeatable; default: this checkout)")
    args = ap.parse_args()
    cores = args.core or [REPO / "DualNetDenoise"]
    sys.path.insert(0, str(cores[-1]))

    from dualnet.modelfile import default_model_path

    model = Path(args.model) if args.model else Path(default_model_path(args.modality))
    rows = []
    with tempfile.TemporaryDirectory(prefix="dualnet_mem_") as tmp:
        src = Path(tmp) / "input.nrrd"
        shape = make_volume(src, args.slices, min(args.size, 512))
        vol_name = " x ".join(str(s) for s in shape[::-1]) + " (x, y, z) CT, int16"
        for core in cores:
            for via in args.via:
                if via == "cli":
                    out = Path(tmp) / f"out_{len(rows)}.nrrd"
                    cmd = [sys.executable, "-m", "dualnet", "denoise", str(src), str(out), "--modality",
                           args.modality, "--device", "cpu", "-q"] + (["--model", str(model)] if args.model else [])
                else:
                    cmd = [sys.executable, "-c", API_CHILD, str(src), args.modality] + \
                          ([str(model)] if args.model else [])
                peak, wall, _ = run_child(cmd, core.resolve())
                label = "this checkout" if core.resolve() == (REPO / "DualNetDenoise").resolve() else str(core)
                rows.append((vol_name, model.name, via, label, peak, wall))
                print(f"# {via} {label}: peak {peak:.2f} GiB, {wall:.0f} s", file=sys.stderr, flush=True)
    print("| volume | model | run | code | peak RSS (GiB) | wall time (s) |")
    print("|---|---|---|---|---|---|")
    for vol_name, mname, via, label, peak, wall in rows:
        print(f"| {vol_name} | {mname} | {via} | {label} | {peak:.2f} | {wall:.0f} |")
    print()
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
