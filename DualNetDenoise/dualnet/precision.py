"""Arithmetic precision of network inference on the CPU: fp32, or bf16 with the intensity layers in fp32.

``"auto"`` (the default) runs a DUAL-NET in bf16 where the CPU has AMX bf16 tiles
(:func:`dualnet.device.cpu_has_amx_bf16`) and inference runs on one thread, and in fp32 (ONNX
Runtime where the model ships graphs) everywhere else. In bf16 the layers a network names in
``full_precision_modules()`` (those reading or writing image intensities) stay in fp32: rounding the
intensities to bf16's 8-bit mantissa is as large as the noise of a low-dose CT. Measured on the
Intel Xeon host (AMX), 4 slices of 256^2 per batch (docs/design_sweep.md, session 19): on one
thread 0.75 s against 1.30 s for ONNX Runtime fp32 (1.4x per validation volume), on two threads
0.60 against 0.75 s, which PyTorch's import ate end to end, so two threads keep fp32. Quality: 0.000
dB on the CT validation cases at 25 % dose, within 0.003 dB on the MRI ones at four levels. On CPUs
with AVX-512 BF16 but no AMX bf16 inference was not measured, so "auto" keeps fp32 there.
``$DUALNET_PRECISION`` (``float32`` / ``bfloat16``) decides what "auto" means for a whole process
(the test suite pins ``float32``). CUDA keeps its own autocast (:func:`dualnet.device.autocast_dtype`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Optional

from .errors import InputError

PRECISIONS = ("auto", "float32", "bfloat16")
#: environment variable giving what "auto" means in this process
PRECISION_ENV = "DUALNET_PRECISION"


def check_precision(precision: Optional[str]) -> str:
    """``precision`` lower-cased (None: ``"auto"``).

    Raises:
        InputError: not one of :data:`PRECISIONS`.
    """
    name = (precision or "auto").strip().lower()
    if name not in PRECISIONS:
        raise InputError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return name


def effective(precision: Optional[str]) -> str:
    """``precision`` checked, with ``"auto"`` replaced by ``$DUALNET_PRECISION`` where that is set.

    Raises:
        InputError: either is not one of :data:`PRECISIONS`.
    """
    name = check_precision(precision)
    env = os.environ.get(PRECISION_ENV, "").strip()
    if name == "auto" and env:
        try:
            return check_precision(env)
        except InputError as err:
            raise InputError(f"${PRECISION_ENV}: {err}") from None
    return name


def wants_bf16(precision: Optional[str], threads: Optional[int] = None) -> bool:
    """Whether a CPU pass asked for with ``precision`` runs in bf16 on this host (no PyTorch import):
    ``"bfloat16"`` always, ``"auto"`` (:func:`effective`) where the CPU has AMX bf16 and inference
    runs on one thread (``threads``, None: :func:`dualnet.device.cpu_threads`)."""
    from .device import cpu_has_amx_bf16, cpu_threads

    name = effective(precision)
    return name == "bfloat16" or (name == "auto" and cpu_has_amx_bf16() and cpu_threads(threads) == 1)


def supports_bf16(model: Any) -> bool:
    """Whether ``model`` names its full-precision layers (DUAL-NET); other networks stay in fp32."""
    return callable(getattr(model, "full_precision_modules", None))


def resolve(precision: Optional[str], model: Any, dev: Any, threads: Optional[int] = None) -> str:
    """``"bfloat16"`` or ``"float32"``: what a pass of ``model`` on ``dev`` (``threads``: its CPU
    threads) runs in. bf16 only on the CPU, for a PyTorch DUAL-NET, where :func:`wants_bf16`.

    Raises:
        InputError: ``"bfloat16"`` asked for a network that cannot run in it (an ONNX graph, a
            network without named full-precision layers) or off the CPU.
    """
    name = effective(precision)
    if not wants_bf16(name, threads):
        return "float32"
    able = getattr(dev, "type", str(dev)) == "cpu" and supports_bf16(model)
    if not able and name == "bfloat16":
        raise InputError("precision bfloat16 needs a DUAL-NET in PyTorch on the CPU "
                         "(ONNX graphs, baselines and GPUs run in their own precision)")
    return "bfloat16" if able else "float32"


@contextlib.contextmanager
def cpu_bf16(model: Any) -> Iterator[None]:
    """Inside: CPU bf16 autocast, with ``model.full_precision_modules()`` run in fp32 (their inputs
    cast to fp32, autocast off for their forward)."""
    import torch

    handles = []

    def enter(module: Any, args: tuple) -> tuple:
        ctx = torch.autocast("cpu", enabled=False)
        ctx.__enter__()
        module._dualnet_fp32_ctx = ctx
        return tuple(a.float() if torch.is_tensor(a) else a for a in args)

    def leave(module: Any, args: tuple, out: Any) -> None:
        ctx = module.__dict__.pop("_dualnet_fp32_ctx", None)
        if ctx is not None:
            ctx.__exit__(None, None, None)

    try:
        for module in model.full_precision_modules().values():
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave, always_call=True))  # also when it raises
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    finally:
        for h in handles:
            h.remove()
