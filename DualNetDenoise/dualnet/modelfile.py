"""Model files: weights as ``.safetensors`` plus a JSON model card beside them.

``model.safetensors`` + ``model.json`` (same stem). The card holds everything needed to rebuild
and use the network (architecture, intensity normalisation) plus provenance (training data,
steps, metrics, version) and the SHA-256 of the weights file, checked on every load. Loading
never unpickles arbitrary objects: safetensors, or ``torch.load(weights_only=True)`` for ``.pt``
checkpoints. Every problem raises :class:`dualnet.errors.ModelError` with one line naming the
file.

Card keys (``format_version`` 1)::

    format_version: 1
    architecture: {kind: dualnet|dncnn|n2v, preset, dim, in_channels, sr, use_neb,
                   use_nonlocal, dropout}
    modality: mri|ct|us
    normalisation: {method: percentile, p_low: 0.5, p_high: 99.5}       (per-volume, MRI/US)
                 | {method: hu_window, hu_low: -1000, hu_high: 1000}      (fixed, CT in HU)
                 | {method: fixed, low, high} | {method: zscore}
    training: {data, steps, ...}   version: str   metrics: {...}
    weights: file name   sha256: hex digest of the weights file
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, Tuple, Union

from .errors import InputError, ModelError
from .io import atomic_write_bytes

PathLike = Union[str, os.PathLike]

FORMAT_VERSION = 1
MODALITIES = ("mri", "ct", "us")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")
#: Normalisation methods and the keys each needs (see :func:`dualnet.inference.normalise`).
NORMALISATIONS: Dict[str, Tuple[str, ...]] = {
    "percentile": ("p_low", "p_high"),
    "hu_window": ("hu_low", "hu_high"),
    "fixed": ("low", "high"),
    "zscore": (),
}
#: Normalisation bounds beyond this overflow float32 arithmetic (the output would be NaN / Inf).
_MAX_NORM_VALUE = 1e30
ARCH_KEYS = ("kind", "preset", "dim", "sr", "use_neb", "use_nonlocal", "dropout", "confidence_head")


def card_path(weights_path: PathLike) -> Path:
    """The JSON card beside a weights file (same stem, ``.json``)."""
    return Path(weights_path).with_suffix(".json")


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def validate_normalisation(norm: Any, where: str = "card") -> Dict[str, Any]:
    """Check a card's ``normalisation`` dict; ModelError naming ``where`` if invalid."""
    if not isinstance(norm, dict) or norm.get("method") not in NORMALISATIONS:
        raise ModelError(f"{where}: normalisation must be a dict with method one of "
                         f"{sorted(NORMALISATIONS)}, got {norm!r}")
    for key in NORMALISATIONS[norm["method"]]:
        value = norm.get(key)
        try:  # a JSON integer of hundreds of digits does not fit a float: not a finite number either
            finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        except OverflowError:
            finite = False
        if not finite:
            raise ModelError(f"{where}: normalisation {norm['method']!r} needs a finite number {key!r}, got {value!r}")
    method = norm["method"]
    if method != "zscore":
        lo, hi = (float(norm[k]) for k in NORMALISATIONS[method])
        if not hi > lo:
            raise ModelError(f"{where}: normalisation {method!r} needs low < high, got {lo}, {hi}")
        if max(abs(lo), abs(hi)) > _MAX_NORM_VALUE:
            raise ModelError(f"{where}: normalisation {method!r} values {lo}, {hi} are beyond float32 "
                             f"arithmetic (|value| <= {_MAX_NORM_VALUE:g})")
    if method == "percentile" and not 0.0 <= lo < hi <= 100.0:
        raise ModelError(f"{where}: normalisation percentiles must lie in [0, 100], got p_low {lo}, p_high {hi}")
    return norm


def check_finite_weights(state: Dict[str, Any], where: Union[str, Path]) -> None:
    """ModelError naming ``where`` if any floating-point tensor of ``state`` holds NaN or Inf, or any
    tensor is of a type a network here never has (complex, 8-bit floats: they escaped the check)."""
    import torch

    plain = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    odd = [k for k, v in state.items() if isinstance(v, torch.Tensor)
           and (v.is_complex() or (v.is_floating_point() and v.dtype not in plain))]
    if odd:
        raise ModelError(f"{where}: weights of an unsupported type ({odd[0]}: {state[odd[0]].dtype}); "
                         "the model is unusable")
    bad = [k for k, v in state.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise ModelError(f"{where}: weights hold NaN or Inf ({bad[0]}{more}); the model is unusable")


def safe_torch_load(path: Union[str, Path], what: str = "torch checkpoint") -> Any:
    """``torch.load(weights_only=True)`` on CPU, without torch's warnings; ModelError in one line.

    A file holding Python objects other than tensors and plain containers is refused without
    running them (the message never suggests loading it unsafely).
    """
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling / zip / format errors have many types
        text = str(err).strip()
        if "Weights only load failed" in text:
            reason = next((line.split("error:", 1)[-1].strip() for line in text.splitlines()
                           if "WeightsUnpickler error" in line), "")
            reason = reason.split(". Please")[0].split(" was not an allowed")[0] or "arbitrary Python objects"
            raise ModelError(f"{path}: not a safe weights-only {what}: it holds Python objects that are "
                             f"never run ({reason[:120]})") from None
        msg = text.splitlines()[0] if text else type(err).__name__
        raise ModelError(f"{path}: not a safe weights-only {what} ({msg[:160]})") from None


def check_model_output(path: PathLike, inputs: Iterable[PathLike] = ()) -> Path:
    """Check, before any work, that a model can be saved at ``path``: ``.safetensors``, and
    neither it nor its card is one of ``inputs`` (e.g. the base model and its card) or unwritable."""
    from .io import check_output_path

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelError(f"{path}: model files are saved as .safetensors")
    protected = _protected(inputs)
    check_output_path(path, protected, formats=None)
    check_output_path(card_path(path), protected, outputs=[path], formats=None)
    return path


def _protected(inputs: Iterable[PathLike]) -> list:
    """``inputs`` plus, for model files among them, their cards (and for cards, their weights)."""
    paths = [Path(p) for p in inputs if p is not None]
    out = list(paths)
    out += [card_path(p) for p in paths if p.suffix in WEIGHT_SUFFIXES]
    out += [p.with_suffix(s) for p in paths if p.suffix == ".json" for s in WEIGHT_SUFFIXES]
    return out


def save_model(path: PathLike, model: Any, card: Dict[str, Any], *, inputs: Iterable[PathLike] = ()) -> Path:
    """Write ``model``'s weights to ``path`` (``.safetensors``) and its card beside it.

    ``card`` needs ``modality`` and ``normalisation``; ``training``, ``metrics``, ``version``
    default to empty / ``"0.0.0"``. ``architecture`` is taken from ``model.config`` (a
    different one in ``card`` is an error). Weights with NaN / Inf are refused. Both files are
    written atomically and never over ``inputs`` (a base model: its card is protected too).
    Returns the weights path.
    """
    from safetensors.torch import save as st_save

    path = Path(path)
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
    protected = _protected(inputs)
    check_model_output(path, protected)
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or "kind" not in config:
        raise ModelError(f"{path}: model has no architecture config (build it with dualnet.models)")
    arch = dict(config)
    given = card.get("architecture")
    if given is not None and any(given[k] != arch.get(k) for k in given
                                 if k in ARCH_KEYS + ("in_channels",)):
        raise ModelError(f"{path}: card architecture {given} differs from the model's {arch}")
    modality = card.get("modality")
    if modality not in MODALITIES:
        raise ModelError(f"{path}: card modality must be one of {MODALITIES}, got {modality!r}")
    validate_normalisation(card.get("normalisation"), str(path))

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    check_finite_weights(state, path)
    data = st_save(state, metadata={"format": "pt", "dualnet_kind": arch["kind"]})
    out = dict(card)
    out.pop("onnx", None)  # a graph belongs to the weights it was exported from (scripts/export_onnx.py)
    out.update(format_version=FORMAT_VERSION, architecture=arch,
               training=card.get("training", {}), metrics=card.get("metrics", {}),
               version=str(card.get("version", "0.0.0")), weights=path.name,
               parameters=sum(int(v.numel()) for v in model.parameters()),
               sha256=hashlib.sha256(data).hexdigest())
    try:
        text = json.dumps(out, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ModelError(f"{card_path(path)}: card is not JSON-serialisable ({err})") from None
    atomic_write_bytes(path, data, inputs=protected)
    atomic_write_bytes(card_path(path), (text + "\n").encode("utf-8"), inputs=protected, outputs=[path])
    return path


def rewrite_card(weights: PathLike, card: Dict[str, Any], *, outputs: Iterable[PathLike] = ()) -> Path:
    """Write ``card`` as the card of the existing weights file ``weights`` (validation numbers, inference
    defaults, ONNX entries added by the scripts), atomically and in the indent the card has now, so a
    rewrite changes only what changed. The weights, and so their hash, are untouched; ``outputs``: files
    just written beside it that the card must not replace. Returns the card's path.

    Raises:
        ModelError: the card is not JSON-serialisable or holds a value that is not finite.
    """
    cpath = card_path(weights)
    lines = cpath.read_text(encoding="utf-8").splitlines() if cpath.is_file() else []
    indent = len(lines[1]) - len(lines[1].lstrip(" ")) if len(lines) > 1 and lines[1].startswith(" ") else 2
    try:
        text = json.dumps(card, indent=indent, default=float, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ModelError(f"{cpath}: card is not JSON-serialisable ({err})") from None
    atomic_write_bytes(cpath, (text + "\n").encode("utf-8"), inputs=[weights], outputs=outputs)
    return cpath


def read_card(path: PathLike) -> Dict[str, Any]:
    """Read and check the JSON card of a weights file (or the card itself)."""
    cpath = card_path(path)
    if not cpath.is_file():
        raise ModelError(f"{cpath}: model card missing (expected beside {Path(path).name})")
    try:
        card = json.loads(cpath.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # bad JSON or UTF-8, huge integers, deep nesting
        raise ModelError(f"{cpath}: unreadable model card ({type(err).__name__}: {str(err)[:160]})") from None
    _check_card(card, cpath)
    return card


def _check_card(card: Any, where: Path) -> None:
    if not isinstance(card, dict):
        raise ModelError(f"{where}: model card is not a JSON object")
    version = card.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ModelError(f"{where}: unsupported card format_version {version!r} "
                         f"(this DualNet reads 1..{FORMAT_VERSION})")
    arch = card.get("architecture")
    if not isinstance(arch, dict) or any(k not in arch for k in ("kind", "dim")):
        raise ModelError(f"{where}: card architecture missing or incomplete")
    problem = architecture_problem(arch)
    if problem:
        raise ModelError(f"{where}: invalid architecture in card ({problem})")
    if card.get("modality") not in MODALITIES:
        raise ModelError(f"{where}: card modality must be one of {MODALITIES}")
    validate_normalisation(card.get("normalisation"), str(where))


#: bounds of a card's architecture entries: a card is untrusted, and a network is built from it before
#: its weights are compared (a card asking for 200000 blocks per scale or a 2^31-slice context would
#: take minutes and gigabytes first). Every model made so far is far inside them.
ARCH_LIMITS = {"context": 15, "in_channels": 8, "blocks": 16}
ARCH_KINDS = ("dualnet", "dncnn", "n2v")


def architecture_problem(arch: Dict[str, Any]) -> str:
    """Why a card's ``architecture`` cannot be a network this DualNet builds ("" when it can): its kind,
    preset, dimension, context, channels and blocks per scale checked without PyTorch."""
    from .presets import PRESETS

    def whole(key: str, low: int, high: int, default: int) -> bool:
        v = arch.get(key, default)
        return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high

    if arch.get("kind") not in ARCH_KINDS:
        return f"kind must be one of {ARCH_KINDS}, got {arch.get('kind')!r}"
    if arch.get("dim") not in (2, 3) or isinstance(arch.get("dim"), bool):
        return f"dim must be 2 or 3, got {arch.get('dim')!r}"
    if arch.get("kind") == "dualnet" and arch.get("preset") not in PRESETS:
        return f"unknown preset {arch.get('preset')!r}"
    if not whole("context", 1, ARCH_LIMITS["context"], 1) or arch.get("context", 1) % 2 == 0:
        return f"context must be an odd number of slices 1..{ARCH_LIMITS['context']}, got {arch.get('context')!r}"
    if not whole("in_channels", 1, ARCH_LIMITS["in_channels"], 1):
        return f"in_channels must be 1..{ARCH_LIMITS['in_channels']}, got {arch.get('in_channels')!r}"
    blocks = arch.get("blocks")
    per_scale = [blocks] if isinstance(blocks, int) else blocks if isinstance(blocks, list) else None
    if blocks is not None and (not per_scale or len(per_scale) > 8 or any(
            not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= ARCH_LIMITS["blocks"] for b in per_scale)):
        return f"blocks must be whole numbers 1..{ARCH_LIMITS['blocks']} per scale, got {blocks!r}"
    for key in ("sr", "use_neb", "use_nonlocal", "noise_map"):
        if key in arch and not isinstance(arch[key], bool):
            return f"{key} must be true or false, got {arch[key]!r}"
    return ""


def _build(arch: Dict[str, Any], where: Path) -> Any:
    from .models import build_from_config

    try:
        return build_from_config(arch)
    except (KeyError, ValueError, TypeError, RuntimeError, MemoryError) as err:
        raise ModelError(f"{where}: invalid architecture in card ({str(err)[:160]})") from None


def _load_pt(path: Path) -> Tuple[Dict[str, Any], Dict[str, Any] | None]:
    """State dict (and embedded card, if any) from a .pt checkpoint, weights_only=True."""
    import torch

    obj = safe_torch_load(path)
    embedded = None
    if isinstance(obj, dict):
        if isinstance(obj.get("card"), dict):
            embedded = obj["card"]
        for key in ("state_dict", "model", "model_state"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path}: checkpoint does not contain a state dict of tensors")
    return obj, embedded


def load_model(path: PathLike, device: Any = "cpu") -> Tuple[Any, Dict[str, Any]]:
    """Load a model and its card; returns ``(model in eval mode on device, card)``.

    ``path`` is the ``.safetensors`` (or ``.pt``/``.pth``) weights file or its ``.json`` card.
    Checks: card present and valid, SHA-256 of the weights equals the card's, architecture
    built from the card accepts the weights exactly (``strict=True``). A ``.pt`` checkpoint
    without a card beside it may carry one under the key ``"card"`` (no hash check then).
    """
    path = Path(path)
    if path.suffix == ".json":
        weights = None
        for suffix in WEIGHT_SUFFIXES:
            if path.with_suffix(suffix).is_file():
                weights = path.with_suffix(suffix)
                break
        if weights is None:
            raise ModelError(f"{path}: no weights file beside the card")
        path = weights
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ModelError(f"{path}: not a model file (expected {', '.join(WEIGHT_SUFFIXES)})")
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")

    if path.suffix == ".safetensors":
        card = read_card(path)
        _verify_hash(path, card)
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelError(f"{path}: corrupt safetensors file ({err})") from None
    else:
        state, embedded = _load_pt(path)
        if card_path(path).is_file():
            card = read_card(path)
            _verify_hash(path, card)
        elif embedded is not None:
            card = embedded
            _check_card(card, path)
        else:
            raise ModelError(f"{card_path(path)}: model card missing (expected beside {path.name})")

    check_finite_weights(state, path)
    model = _build(card["architecture"], card_path(path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ModelError(f"{path}: weights do not match the card's architecture ({first})") from None
    try:
        model = model.to(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ModelError(f"{path}: cannot move model to {device} ({err})") from None
    model.eval()
    if path.suffix == ".safetensors":  # the hash-checked graph for the CPU, if the card names one
        from .onnx_backend import attach

        attach(model, path, card)
    return model, card


def load_for_inference(path: PathLike, device: Any = "auto", *, mc: bool = False,
                       precision: str = "auto") -> Tuple[Any, Dict[str, Any]]:
    """A model file's network for denoising, and its card: its checked ONNX graphs alone
    (:class:`dualnet.onnx_backend.GraphNet`, no PyTorch import: a process that only denoises on the
    CPU starts about 1.7 s sooner) where they can run, else :func:`load_model` on the CPU.

    The graphs run where the card names them, ONNX Runtime is importable and not switched off,
    ``device`` means the CPU without asking PyTorch (:func:`dualnet.device.cpu_without_torch`), no
    Monte-Carlo dropout is wanted (``mc``) and a DUAL-NET is not to run in bf16 here
    (``precision``, :func:`dualnet.precision.wants_bf16`). The weights' SHA-256 is checked either way.
    """
    from .device import cpu_without_torch
    from .precision import wants_bf16

    path = Path(path)
    weights = path.with_suffix(".safetensors") if path.suffix == ".json" else path
    if not mc and weights.suffix == ".safetensors" and weights.is_file() and cpu_without_torch(device):
        from .onnx_backend import load_graph_net

        card = read_card(weights)
        _verify_hash(weights, card)
        bf16 = wants_bf16(precision) and (card.get("architecture") or {}).get("kind") == "dualnet"
        net = None if bf16 else load_graph_net(weights, card)
        if net is not None:
            return net, card
    return load_model(path, device="cpu")


def _verify_hash(path: Path, card: Dict[str, Any]) -> None:
    expected = card.get("sha256")
    if not isinstance(expected, str):
        raise ModelError(f"{card_path(path)}: card has no sha256 of the weights")
    actual = sha256_file(path)
    if actual.lower() != expected.lower():
        raise ModelError(f"{path}: SHA-256 mismatch with its card (file corrupt or tampered)")


def default_model_path(modality: str) -> Path:
    """Where the shipped model for ``modality`` lives: ``dualnet/weights/dualnet_{modality}.safetensors``.

    The file may not exist yet; see :func:`require_default_model`.
    """
    if modality not in MODALITIES:
        raise InputError(f"unknown modality {modality!r}; choose one of {', '.join(MODALITIES)}")
    return Path(__file__).resolve().parent / "weights" / f"dualnet_{modality}.safetensors"


def require_default_model(modality: str) -> Path:
    """:func:`default_model_path` if the file exists, else ModelError."""
    path = default_model_path(modality)
    if not path.is_file():
        raise ModelError(f"no shipped model for modality {modality} yet (expected {path})")
    return path
