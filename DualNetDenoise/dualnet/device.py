"""Compute-device selection and memory queries for inference (torch imported lazily).

``resolve_device("auto")`` picks CUDA, then Apple MPS, then CPU. Memory figures are in bytes.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional

from .errors import InputError

DEVICES = ("auto", "cpu", "cuda", "mps")


def cpu_count() -> int:
    """CPU cores this process may use (affinity-aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cpu_threads(threads: Optional[int] = None) -> int:
    """The CPU thread count inference uses: ``threads``, else ``$DUALNET_NUM_THREADS`` if set, else
    every usable core. On a machine shared with other busy processes one thread can be much faster
    than many (oversubscription); set the environment variable then."""
    if threads is None:
        env = os.environ.get("DUALNET_NUM_THREADS", "").strip()
        threads = int(env) if env.isdigit() and int(env) > 0 else cpu_count()
    return max(1, int(threads))


class HostCPU:
    """The CPU as a device where PyTorch is not imported (ONNX graphs): ``type`` / ``index`` as a
    ``torch.device`` has them."""

    type = "cpu"
    index = None

    def __repr__(self) -> str:
        return "device(type='cpu')"


def cpu_without_torch(name: Optional[str] = "auto") -> bool:
    """Whether ``device = name`` means the CPU without importing PyTorch to find out: ``"cpu"``, or
    ``"auto"`` while PyTorch is not imported yet and the installed build has no GPU support (CUDA,
    ROCm; read from ``torch/version.py``) and this is not macOS (MPS)."""
    import sys

    name = (name or "auto").strip().lower()
    if name == "cpu":
        return True
    if name != "auto" or "torch" in sys.modules or sys.platform == "darwin":
        return False
    import importlib.util
    import re
    from pathlib import Path

    try:
        spec = importlib.util.find_spec("torch")
        text = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text()  # type: ignore[union-attr]
    except (ImportError, OSError, TypeError, IndexError, AttributeError, ValueError):
        return False
    gpu = [re.search(rf"^{k}\s*(?::[^=\n]*)?=\s*(.+)$", text, re.M) for k in ("cuda", "hip")]
    return all(m is not None and m.group(1).strip() == "None" for m in gpu)


def configure_cpu_threads(threads: Optional[int] = None) -> int:
    """Set torch's intra-op thread count to :func:`cpu_threads` and return it."""
    import torch

    threads = cpu_threads(threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str = "auto") -> "Any":
    """``torch.device`` for ``"auto" | "cpu" | "cuda" | "cuda:N" | "mps"``.

    ``auto`` prefers CUDA, then MPS, then CPU. Asking for a device that is not available
    raises :class:`InputError` with a one-line message.
    """
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"device {name!r} requested but CUDA is not available")
        return torch.device(name)
    if name == "mps":
        if not mps_available():
            raise InputError("device 'mps' requested but Apple MPS is not available")
        return torch.device("mps")
    raise InputError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")


def available_memory(device: "Any") -> int:
    """Free memory in bytes usable on ``device`` (CUDA: free VRAM; else free system RAM)."""
    if getattr(device, "type", str(device)) == "cpu":
        return system_available_memory()
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return system_available_memory()


def system_available_memory() -> int:
    """Available system RAM in bytes (psutil if installed, else sysconf / /proc/meminfo)."""
    try:
        import psutil  # type: ignore

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 * 1024 ** 3  # unknown: assume 4 GiB


@functools.lru_cache(maxsize=None)  # asked once per training step; the CPU does not change
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset:
    """The first ``flags`` line of ``cpuinfo`` as a set; empty where it cannot be read (not Linux)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[-1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 in hardware (the ``avx512_bf16`` or ``amx_bf16`` flag of
    ``cpuinfo``): there bf16 autocast speeds training up (measured 1.3-1.7x per step); on AVX2-only
    CPUs it is emulated and about 9x slower. False where the flags cannot be read (not Linux)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags(cpuinfo))


def cpu_has_amx_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has AMX bf16 tiles (``amx_bf16``): there bf16 inference was measured faster
    than ONNX Runtime in fp32 (:mod:`dualnet.precision`)."""
    return "amx_bf16" in cpu_flags(cpuinfo)


def autocast_dtype(device: "Any") -> Optional["Any"]:
    """bf16 on CUDA GPUs that support it, else fp16 on CUDA; None (full fp32) elsewhere."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def describe(device: "Any") -> str:
    """Human-readable device name, e.g. ``"cuda (NVIDIA H200)"`` or ``"cpu (16 threads)"``."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return device.type
