"""Arithmetic precision of network inference on the CPU: fp32, or bf16 with the intensity layers in fp32.

``"auto"`` (the default) runs a DUAL-NET in bf16 where the CPU has AMX bf16 tiles
(:func:`dualnet.device.cpu_has_amx_bf16`), at any thread count, and in fp32 (ONNX Runtime where the
model ships graphs) everywhere else. In bf16 the layers a network names in
``full_precision_modules()`` (those reading or writing image intensities) stay in fp32: rounding the
intensities to bf16's 8-bit mantissa is as large as the noise of a low-dose CT. A model card may
name its own list (``bf16_fp32_layers``, :func:`card_fp32_layers`; the MRI card names none: all-bf16
scored -0.005 to +0.021 dB against fp32 on its validation cases at four levels). Measured on the Intel
Xeon host (AMX), 4 slices of 256^2 per batch (docs/design_sweep.md, sessions 19 and 30): on one
thread 0.75 s against 1.30 s for ONNX Runtime fp32; on two threads 0.27-0.30 s (all bf16 0.19-0.22 s)
against 0.38 s, which session 30 measured end to end (`dualnet denoise`, the MRI 60 x 256 x 256 slab:
15.2 s with the four layers in fp32, 12.7 s with none, against 17.3 s for ONNX Runtime), so "auto" no
longer keeps fp32 on two threads. Quality with the four layers in fp32: 0.000 dB on the CT validation
cases at 25 % dose, within 0.003 dB on the MRI ones at four levels.
On CPUs with AVX-512 BF16 but no AMX bf16 inference was not measured, so "auto" keeps fp32 there.
``$DUALNET_PRECISION`` (``float32`` / ``bfloat16``) decides what "auto" means for a whole process
(the test suite pins ``float32``). CUDA keeps its own autocast (:func:`dualnet.device.autocast_dtype`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

from .errors import InputError, ModelError

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


def wants_bf16(precision: Optional[str]) -> bool:
    """Whether a CPU pass asked for with ``precision`` runs in bf16 on this host (no PyTorch import):
    ``"bfloat16"`` always, ``"auto"`` (:func:`effective`) where the CPU has AMX bf16, at any thread
    count (session 30 measured bf16 faster end to end on two threads as well as on one)."""
    from .device import cpu_has_amx_bf16

    name = effective(precision)
    return name == "bfloat16" or (name == "auto" and cpu_has_amx_bf16())


def supports_bf16(model: Any) -> bool:
    """Whether ``model`` names its full-precision layers (DUAL-NET); other networks stay in fp32."""
    return callable(getattr(model, "full_precision_modules", None))


def resolve(precision: Optional[str], model: Any, dev: Any) -> str:
    """``"bfloat16"`` or ``"float32"``: what a pass of ``model`` on ``dev`` runs in. bf16 only on
    the CPU, for a PyTorch DUAL-NET, where :func:`wants_bf16`.

    Raises:
        InputError: ``"bfloat16"`` asked for a network that cannot run in it (an ONNX graph, a
            network without named full-precision layers) or off the CPU. Where it comes from
            ``$DUALNET_PRECISION`` (what "auto" means) such a network runs in fp32.
    """
    name = effective(precision)
    if not wants_bf16(name):
        return "float32"
    able = getattr(dev, "type", str(dev)) == "cpu" and supports_bf16(model)
    if not able and check_precision(precision) == "bfloat16":  # asked for; $DUALNET_PRECISION only sets "auto"
        raise InputError("precision bfloat16 needs a DUAL-NET in PyTorch on the CPU "
                         "(ONNX graphs, baselines and GPUs run in their own precision)")
    return "bfloat16" if able else "float32"


def card_fp32_layers(card: Optional[Mapping[str, Any]]) -> Optional[List[str]]:
    """The card's ``bf16_fp32_layers``: the names of the layers kept in fp32 under CPU bf16 (a list
    of strings, possibly empty), or None where the card has none (the network's own
    ``full_precision_modules()``). ``ModelError`` for a malformed entry (cards are untrusted input)."""
    entry = (card or {}).get("bf16_fp32_layers")
    if entry is None:
        return None
    if not isinstance(entry, list) or not all(isinstance(n, str) and n for n in entry):
        raise ModelError(f"model card: bf16_fp32_layers must be a list of layer names, got {entry!r}")
    return list(entry)


def fp32_modules(model: Any, names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The layers of ``model`` kept in fp32 under CPU bf16: ``names`` (a card's
    :func:`card_fp32_layers`) where given, else ``model.full_precision_modules()``.
    ``ModelError`` for a name the network does not have."""
    if names is None:
        return dict(model.full_precision_modules())
    found = {}
    for name in names:
        try:
            found[name] = model.get_submodule(name)
        except AttributeError:
            raise ModelError(f"model card: bf16_fp32_layers names {name!r}, which this network does not have") from None
    return found


@contextlib.contextmanager
def cpu_bf16(model: Any, fp32_layers: Optional[Sequence[str]] = None) -> Iterator[None]:
    """Inside: CPU bf16 autocast, with the layers of :func:`fp32_modules` (``fp32_layers``, None:
    the network's own list) run in fp32 (their inputs cast to fp32, autocast off for their forward)."""
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
        for module in fp32_modules(model, fp32_layers).values():
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave, always_call=True))  # also when it raises
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    finally:
        for h in handles:
            h.remove()
