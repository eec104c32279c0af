"""Helpers shared by the benchmarks: machine description and per-job isolation for peak memory."""

from __future__ import annotations

import os
import platform
import resource
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DualNetDenoise"))


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    """One line naming CPU model, cores, memory, Python, numpy and torch versions."""
    cpu = cpu_model()
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import numpy

    try:
        import torch

        tv = torch.__version__
    except ImportError:
        tv = "absent"
    from dualnet.device import cpu_has_amx_bf16

    amx = "AMX bf16" if cpu_has_amx_bf16() else "no AMX bf16"
    return (f"{cpu} ({amx}), {os.cpu_count()} cores, {mem_gib:.0f} GiB, Python {platform.python_version()}, "
            f"numpy {numpy.__version__}, torch {tv}, {platform.system()} {platform.release()}")


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_isolated(fn, *args):
    """Run ``fn(*args)`` in a fresh process so its peak memory is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()
