"""Network inference on whole volumes: normalisation, sliding-window tiling, TTA, MC dropout.

Arrays are numpy, (z, y, x) for volumes and (y, x) for 2D images, intensities in the file's
units (MRI arbitrary units, CT in HU, US 0..255). A 2D model runs slice by slice (axial
slices, z) with 2D tiles over (y, x); a 3D model runs on 3D tiles. Overlapping tiles are
blended with a Gaussian weight (sigma = 1/8 of the tile side), so seams vanish and the result
depends only weakly on the tile size (max abs difference typically < 1e-2 of the intensity
range for trained models; see ``Testing/test_inference.py`` for the checked bound).

Memory: a 2D model's tiles of one slice depend only on that slice (and its ``context``
neighbours), so 2D inference is streamed: each slice is normalised (and its noise map made) when
its first tile is read, its blend is finished as soon as its last tile is done and written,
de-normalised, straight into the output. Besides the input and the returned maps, peak memory is a
few slices plus the network's activations (``benchmarks/bench_memory.py``). 3D models blend in
whole-volume buffers.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .degrade import CT_FLOOR_HU
from .errors import InputError, ModelError
from .orthoviews import choose_views
from .progress import CancelToken, ProgressFn, check_cancel, report, scaled

TileArg = Union[None, int, Sequence[int]]

#: Bump when what the default inference of a DUAL-NET model computes changes (the evaluation study's
#: cache keys carry it). 2: the second and third orthogonal views read the first view's NEB maps, and
#: each view's SURE guard checks a third of the slices (session 13). 3: a model card may set the
#: default test-time augmentation (``test_time_augmentation``; session 14). 4: that default applies where
#: one view runs, none with three views; CPU bf16 where :mod:`dualnet.precision` says (session 19).
INFERENCE_VERSION = 4
MIN_TILE = 16
#: where the SURE guard's pass starts on the progress bar (it runs a quarter of the slices or more)
GUARD_PROGRESS_FROM = 0.8
MAX_TILE_2D = 512
MAX_TILE_3D_CPU = 96
MAX_TILE_3D_GPU = 192
#: ONNX Runtime (2D models on the CPU): at most this many pixels per batch. Measured on the 2-core
#: CPU: 0.93 us per pixel for 2 x 128^2, 1.06 for 1 x 256^2, 1.35 for 2 x 256^2 (PyTorch 1.5-1.6)
ORT_BATCH_PIXELS = 2 * 128 * 128
#: PyTorch in CPU bf16 (2D models): at most this many pixels per batch. Measured on the Intel Xeon host
#: (AMX), one thread: 286 / 239 / 303 ms per 256^2 slice in batches of 1 / 4 / 16 slices (session 19)
BF16_BATCH_PIXELS = 4 * 256 * 256


@dataclass
class InferenceResult:
    """Output of :func:`denoise_array`; every array has the input's shape, float32.

    Attributes:
        denoised: denoised image in the input's intensity units.
        uncertainty: per-voxel std over MC-dropout passes (input units), or None.
        sigma_map: estimated noise std per voxel (input units), or None for baselines.
        alpha_map: confidence of the blind-spot estimate in [0, 1], or None.
        info: device, tile, seconds, passes, normalisation, fallbacks.
    """

    denoised: np.ndarray
    uncertainty: Optional[np.ndarray]
    sigma_map: Optional[np.ndarray]
    alpha_map: Optional[np.ndarray]
    info: Dict[str, Any] = field(default_factory=dict)


class _SharedNeb:
    """The NEB maps of the first orthogonal view, read by the other two (:func:`_three_views`).

    The noise-estimation branch costs about a third of the network's time per slice, and what it
    gives the restoration branch is three per-voxel maps (blind-spot estimate, log sigma, gate);
    the second and third views read the first view's maps instead of making their own
    (:meth:`dualnet.models.dualnet.DualNet.restore`). ``maps`` are (z, y, x) volumes of the
    original orientation: ``blind`` and ``gate`` in normalised units, ``sigma`` in input units,
    ``alpha``; ``scale`` is the normalisation scale (sigma / scale = the network's sigma).
    ``axis`` is the view reading them (0 = the recording view).
    """

    def __init__(self) -> None:
        self.maps: Dict[str, np.ndarray] = {}
        self.scale = 1.0
        self.axis = 0

    def record(self, outs: Dict[str, np.ndarray], params: Dict[str, float]) -> None:
        """Keep the first view's maps (``blind`` and ``gate`` are taken out of ``outs``)."""
        self.maps = {"blind": outs.pop("blind"), "gate": outs.pop("gate"), "sigma": outs["sigma"],
                     "alpha": outs["alpha"]}
        self.scale = float(params["scale"])

    def along(self, axis: int) -> "_SharedNeb":
        """The same maps read by the view along ``axis`` (no copies)."""
        view = _SharedNeb()
        view.maps, view.scale, view.axis = self.maps, self.scale, int(axis)
        return view

    def volume(self, key: str) -> np.ndarray:
        """A map in the reading view's orientation (a view of the array, not a copy)."""
        return np.moveaxis(self.maps[key], self.axis, 0) if self.axis else self.maps[key]

    def channels(self, zs: Optional[np.ndarray] = None) -> List[Callable[[Tuple[slice, ...]], np.ndarray]]:
        """Readers of the three extra input channels of ``restore`` for a tile (z, y, x slices of
        the reading view, or of its slices ``zs`` when given), in :data:`dualnet.presets.NEB_MAPS` order."""
        vols = [self.volume(k) for k in ("blind", "sigma", "gate")]
        if zs is not None:
            vols = [v[zs] for v in vols]
        blind, sigma, gate = vols
        scale = np.float32(self.scale)

        def log_sigma(s: Tuple[slice, ...]) -> np.ndarray:
            return np.log(np.maximum(sigma[s][0] / scale, np.float32(1e-12)))

        return [lambda s: blind[s][0], log_sigma, lambda s: gate[s][0]]


def _with_neb(read: Callable[[Tuple[slice, ...]], np.ndarray], neb: _SharedNeb,
              zs: Optional[np.ndarray] = None) -> Callable[[Tuple[slice, ...]], np.ndarray]:
    """A 2D tile reader with the shared NEB maps appended as channels (``restore``'s input)."""
    extra = neb.channels(zs)

    def read_with_maps(s: Tuple[slice, ...]) -> np.ndarray:
        x = read(s)
        return np.concatenate([x, np.stack([c(s) for c in extra]).astype(np.float32, copy=False)], 0)

    return read_with_maps


# ----------------------------------------------------------------------------- normalisation

def normalise(array: np.ndarray, spec: Dict[str, Any]) -> Tuple[np.ndarray, Dict[str, float]]:
    """Map intensities to the network's input scale: ``(x - offset) / scale``.

    ``spec`` is a model card's ``normalisation``: ``percentile`` (offset = p_low-th percentile,
    scale = p_high-th minus p_low-th, computed on this array), ``hu_window`` (fixed HU values
    ``hu_low``/``hu_high``), ``fixed`` (``low``/``high``) or ``zscore`` (mean / std). No
    clipping, so :func:`denormalise` inverts exactly. Returns the float32 array and
    ``{"offset", "scale"}`` in input units.
    """
    x = np.asarray(array)
    params = _norm_params(x, spec)
    out = x.astype(np.float32, copy=True)  # in place from here: one float32 copy at most
    out -= np.float32(params["offset"])
    out /= np.float32(params["scale"])
    return out, params


#: Voxels per chunk of the chunked whole-volume reductions (4 MiB of float32).
_CHUNK_VOXELS = 1 << 20


def _chunks(x: np.ndarray) -> Iterator[np.ndarray]:
    """Views of ``x`` along its first axis of about ``_CHUNK_VOXELS`` voxels each."""
    if x.ndim == 0:
        yield x.reshape(1)
        return
    per = max(1, int(np.prod(x.shape[1:], dtype=np.int64)))
    step = max(1, _CHUNK_VOXELS // per)
    for i in range(0, x.shape[0], step):
        yield x[i:i + step]


def _all_finite(x: np.ndarray) -> bool:
    """``np.isfinite(x).all()`` without a whole-volume boolean temporary."""
    if not np.issubdtype(x.dtype, np.floating):
        return True
    return all(bool(np.isfinite(c).all()) for c in _chunks(x))


def _norm_params(x: np.ndarray, spec: Dict[str, Any]) -> Dict[str, float]:
    """``{"offset", "scale"}`` of :func:`normalise` for the array ``x`` (no float64 copy of it:
    the z-score std is summed chunk by chunk, equal to ``np.std`` up to float64 rounding)."""
    method = spec.get("method")
    if method == "percentile":
        lo, hi = np.percentile(x, [float(spec["p_low"]), float(spec["p_high"])])
        offset, scale = float(lo), float(hi - lo)
    elif method == "hu_window":
        offset, scale = float(spec["hu_low"]), float(spec["hu_high"]) - float(spec["hu_low"])
    elif method == "fixed":
        offset, scale = float(spec["low"]), float(spec["high"]) - float(spec["low"])
    elif method == "zscore":
        offset = float(x.mean(dtype=np.float64))
        ss = 0.0
        for c in _chunks(x):
            d = c.astype(np.float64).ravel()
            d -= offset
            ss += float(np.dot(d, d))
        scale = float(np.sqrt(ss / max(x.size, 1)))
    else:
        raise ModelError(f"unknown normalisation method {method!r} in model card")
    if not np.isfinite(scale) or scale <= 0:
        scale = 1.0  # constant image: only shift
    return {"offset": offset, "scale": scale}


def denormalise(array: np.ndarray, params: Dict[str, float]) -> np.ndarray:
    """Inverse of :func:`normalise` (float32, input units; exact up to float32 rounding)."""
    out = np.asarray(array, dtype=np.float32).copy()
    out *= np.float32(params["scale"])
    out += np.float32(params["offset"])
    return out


def _add_noise_info(info: Dict[str, Any], noise_info: Optional[Dict[str, Any]]) -> None:
    """Record the estimated noise model in ``info``, and ``noise_warning`` where the estimate is
    doubtful (:func:`dualnet.estimate.estimate_caution`)."""
    if noise_info is None:
        return
    from .estimate import estimate_caution

    info["noise_model"] = noise_info
    caution = estimate_caution(noise_info)
    if caution:
        info["noise_warning"] = caution


# ----------------------------------------------------------------------------- tiling

def gaussian_weight(shape: Sequence[int], sigma_scale: float = 0.125,
                    floor: float = 1e-3) -> np.ndarray:
    """Separable Gaussian blending weight over a tile, peak 1 at the centre, >= ``floor``.

    Axes of length 1 get weight 1.
    """
    w = np.ones(tuple(shape), dtype=np.float32)
    for axis, n in enumerate(shape):
        if n <= 1:
            continue
        c = (n - 1) / 2.0
        s = max(sigma_scale * n, 1e-6)
        g = np.exp(-0.5 * ((np.arange(n) - c) / s) ** 2).astype(np.float32)
        g = np.maximum(g / g.max(), floor)
        shape1 = [1] * len(shape)
        shape1[axis] = n
        w = w * g.reshape(shape1)
    return w


def tile_starts(size: int, tile: int, overlap: float) -> List[int]:
    """Start indices of windows of length ``tile`` covering ``[0, size)`` with ``overlap``."""
    if tile >= size:
        return [0]
    step = max(1, int(round(tile * (1.0 - overlap))))
    starts = list(range(0, size - tile + 1, step))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def _tiles(shape: Sequence[int], tile: Sequence[int], overlap: float
           ) -> List[Tuple[slice, ...]]:
    axes = [tile_starts(s, t, overlap if t > 1 else 0.0) for s, t in zip(shape, tile)]
    return [tuple(slice(a, a + t) for a, t in zip(start, tile))
            for start in itertools.product(*axes)]


# ----------------------------------------------------------------------------- memory

def _model_dims(model: Any, card: Optional[Dict[str, Any]]) -> Tuple[int, Dict[str, Any]]:
    arch = dict(getattr(model, "config", {}) or {})
    if card and isinstance(card.get("architecture"), dict):
        arch = {**card["architecture"], **arch}
    dim = int(arch.get("dim", 2))
    if dim not in (2, 3):
        raise ModelError(f"model dim must be 2 or 3, got {dim}")
    return dim, arch


def bytes_per_voxel(arch: Dict[str, Any]) -> float:
    """Rough peak activation memory (bytes) per input voxel of one forward pass, no grad."""
    from .presets import PRESETS

    dim = int(arch.get("dim", 2))
    kind = arch.get("kind", "dualnet")
    cfg = PRESETS.get(arch.get("preset", "tiny"), PRESETS["tiny"])
    if kind == "dncnn":
        floats = 4 * {"tiny": 16, "small": 48, "base": 64}.get(arch.get("preset"), 64)
    elif kind == "n2v":
        floats = 12 * cfg["width"]
    else:
        layers, growth = cfg["rdb"]
        neb_w = cfg["neb"][0] if arch.get("use_neb", True) else 0
        floats = neb_w * (4 * dim + 8) + 6 * cfg["width"] + 2 * layers * growth
        if arch.get("sr"):
            floats += 8 * 2 ** dim * cfg["width"]
    return 4.0 * floats * 1.5  # float32, safety margin


#: Most memory (bytes) the automatic tile / batch choice plans for network activations on the
#: CPU: larger batches barely speed up CPU inference but multiply peak memory. Override with
#: ``DUALNET_CPU_MEMORY_GB``.
CPU_ACTIVATION_BUDGET = 1 << 30


def memory_budget(device: Any) -> float:
    """Bytes the automatic tiling may plan for activations: 60 % of free VRAM on CUDA; on CPU a
    quarter of free RAM, at most ``CPU_ACTIVATION_BUDGET`` (or ``$DUALNET_CPU_MEMORY_GB``)."""
    import os

    from .device import available_memory

    if getattr(device, "type", str(device)) == "cuda":
        return available_memory(device) * 0.6
    cap = float(os.environ.get("DUALNET_CPU_MEMORY_GB", CPU_ACTIVATION_BUDGET / 2**30)) * 2**30
    return min(available_memory(device) * 0.25, cap)


def auto_tile(arch: Dict[str, Any], device: Any, shape: Sequence[int]) -> Tuple[int, int]:
    """(tile side in voxels, tiles per batch) fitting :func:`memory_budget` of ``device``.

    2D tiles are capped at 512, 3D tiles at 96 (CPU) / 192 (GPU); sides are multiples of 16.
    """
    dim = int(arch.get("dim", 2))
    dev_type = getattr(device, "type", str(device))
    budget = memory_budget(device)
    bpv = bytes_per_voxel(arch)
    cap = MAX_TILE_2D if dim == 2 else (MAX_TILE_3D_GPU if dev_type == "cuda" else MAX_TILE_3D_CPU)
    side = int((budget / bpv) ** (1.0 / dim))
    side = max(MIN_TILE, min(cap, side // 16 * 16))
    batch = max(1, min(16 if dim == 2 else 4, int(budget // (bpv * side ** dim))))
    return side, batch


# ----------------------------------------------------------------------------- TTA

#: numbers of test-time transforms: none, the four quarter turns, and those with the flip too
TTA_CHOICES = (1, 4, 8)


def tta_transforms(n: int) -> List[Tuple[int, bool]]:
    """The first ``n`` in-plane dihedral transforms as (quarter turns k, flip x): for 4 the quarter
    turns, for 8 the quarter turns of the image and of its mirror."""
    all8 = [(k, f) for f in (False, True) for k in range(4)]
    return all8[:n]


def normalise_tta(tta: Any) -> Optional[int]:
    """A ``tta`` option as a number of transforms: None stays None (the model's default), True ->
    8, False -> 1 (numpy booleans too), an integer of :data:`TTA_CHOICES` -> itself.

    Raises:
        InputError: anything else.
    """
    if tta is None:
        return None
    if isinstance(tta, (bool, np.bool_)):
        return 8 if tta else 1
    if not isinstance(tta, numbers.Integral) or int(tta) not in TTA_CHOICES:
        raise InputError(f"tta must be one of {TTA_CHOICES} transforms (or true / false), got {tta!r}")
    return int(tta)


def choose_tta(tta: Union[bool, int, None], card: Optional[Dict[str, Any]], views: int = 1) -> int:
    """How many test-time transforms to average (:data:`TTA_CHOICES`) in each of ``views`` views:
    ``tta`` when given (:func:`normalise_tta`), else the card's ``test_time_augmentation`` (the
    model's default, set where its validation measured a gain worth the time; 1 when absent) where
    the model runs along one view, and 1 where it runs along three: the three orthogonal views
    already average three passes, and the transforms would multiply their time by the count.

    Raises:
        InputError: ``tta`` is not one of those. ModelError: the card's entry is not.
    """
    n = normalise_tta(tta)
    if n is not None:
        return n
    value = (card or {}).get("test_time_augmentation", 1)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value not in TTA_CHOICES:
        raise ModelError(f"model card: test_time_augmentation must be one of {TTA_CHOICES}, got {value!r}")
    return int(value) if views == 1 else 1


def parse_tta(text: Any) -> Optional[int]:
    """A ``tta`` option as the faces take it: ``"auto"`` -> None (the model's default), ``"off"`` ->
    1, ``"x4"`` / ``"4"`` -> 4, ``"x8"`` / ``"8"`` / ``"on"`` -> 8; ``"true"`` / ``"false"`` (8 / 1)
    as scenes saved before session 14 stored the panel's check box.

    Raises:
        InputError: anything else.
    """
    word = str(text).strip().lower()
    named = {"auto": None, "off": 1, "on": 8, "false": 1, "true": 8}
    if word in named:
        return named[word]
    number = word[1:] if word.startswith("x") else word
    if number not in {str(n) for n in TTA_CHOICES}:
        raise InputError(f"tta must be auto, off, on, x4 or x8, got {text!r}")
    return int(number)


def apply_tta(x: Any, k: int, flip: bool) -> Any:
    """Flip the last (x) axis if asked, then rotate by ``k`` quarter turns in (y, x) (a numpy array
    or a torch tensor)."""
    if isinstance(x, np.ndarray):
        if flip:
            x = np.flip(x, -1)
        return np.rot90(x, k, (-2, -1)) if k % 4 else x
    if flip:
        x = x.flip(-1)
    return x.rot90(k, (-2, -1)) if k % 4 else x


def invert_tta(y: Any, k: int, flip: bool) -> Any:
    """Exact inverse of :func:`apply_tta`."""
    if isinstance(y, np.ndarray):
        if k % 4:
            y = np.rot90(y, -k, (-2, -1))
        return np.flip(y, -1) if flip else y
    if k % 4:
        y = y.rot90(-k, (-2, -1))
    return y.flip(-1) if flip else y


# ----------------------------------------------------------------------------- main

def denoise_array(
    array: np.ndarray,
    model: Any,
    card: Optional[Dict[str, Any]],
    *,
    device: str = "auto",
    tile: TileArg = None,
    overlap: float = 0.25,
    tta: Union[bool, int, None] = None,
    mc_samples: int = 0,
    seed: int = 0,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
    noise_coef: Optional[Sequence[float]] = None,
    modality: Optional[str] = None,
    guard: Optional[bool] = None,
    views: Optional[int] = None,
    spacing_zyx: Optional[Sequence[float]] = None,
    precision: str = "auto",
    _neb: Optional[_SharedNeb] = None,
    _views: int = 1,
) -> InferenceResult:
    """Denoise a 2D (y, x) image or a 3D (z, y, x) volume with a DUAL-NET / baseline model.

    A 2.5D model (architecture ``context = K``) sees the ``K`` slices around each slice (the first
    and last slice repeated at the ends); a noise-map model (``noise_map``) also gets the per-voxel
    noise std of the modality's physics model, ``noise_coef = (c0, c1, c2)`` with variance
    ``c0 + c1 s + c2 s^2`` in file units (s = the in-plane smoothed input). Without
    ``noise_coef`` it is estimated from the input by
    :func:`dualnet.training.data.noise_variance_model` for ``modality`` (default: the card's).

    Args:
        array: intensities in file units (CT in HU); NaN/inf are rejected.
        model: a network from :mod:`dualnet.models` (moved to the chosen device).
        card: its model card (``normalisation`` is used; None means zscore).
        device: ``"auto" | "cpu" | "cuda" | "mps"``; CUDA runs under autocast (bf16/fp16) and
            on out-of-memory retries with halved tiles, then falls back to the CPU.
        tile: tile side in voxels (int, or per-axis sequence of 2 ints (y, x) for 2D models /
            3 ints (z, y, x) for 3D), None = chosen from free memory.
        overlap: fraction of a tile shared with its neighbour, in [0, 0.9].
        tta: average the results of in-plane flips / quarter turns of the input (exactly inverted):
            1 (none), 4 (quarter turns) or 8 (and their mirror images), in every view; True = 8,
            False = 1; None = the model's default where one view runs, none with three views
            (:func:`choose_tta`).
        mc_samples: number of Monte-Carlo dropout passes for ``uncertainty`` (0 = none). The
            denoised image itself always comes from the deterministic (eval) model.
        seed: seeds the dropout masks, so results are reproducible.
        progress / cancel: see :mod:`dualnet.progress`; checked between batches of tiles.
        noise_coef: the noise variance polynomial of noise-map models (None = estimated).
        modality: ``"mri" | "ct" | "us"`` for that estimate (None = the card's ``modality``).
        guard: SURE guard (:mod:`dualnet.sure_guard`): blend the result with the input by the
            weight that minimises the estimated error; None = on for MRI and CT (2D models).
            ``info["guard"]`` holds the weight and the estimates.
        views: 1 = slices along z only; 3 = a 2D model run along z, y and x and the three results
            averaged (:mod:`dualnet.orthoviews`, three times the time); None = 3 where the model was
            trained on all three slice orientations and the volume is near-isotropic, else 1.
        spacing_zyx: voxel spacing in mm, (z, y, x), for that choice (None = isotropic).
        precision: ``"auto" | "float32" | "bfloat16"`` of the CPU passes (:mod:`dualnet.precision`):
            auto = bf16 for a PyTorch DUAL-NET where the CPU has AMX bf16, with the intensity layers
            (or the card's ``bf16_fp32_layers``) in fp32, else fp32 (ONNX Runtime where the model
            ships its graphs).
            ``info["precision"]`` says which ran (in bf16 ``info["fp32_layers"]`` the layers kept in
            fp32); Monte-Carlo dropout passes run in fp32.
        _neb: internal (orthogonal views): the first view records its NEB maps there, the others
            read them instead of running the NEB (:class:`_SharedNeb`).
        _views: internal: the number of views this one is part of (the guard checks its share).
    """
    from .onnx_backend import GraphNet, forward_for
    from .precision import card_fp32_layers, check_precision, fp32_modules, resolve

    t0 = time.perf_counter()
    precision = check_precision(precision)
    fp32_layers = card_fp32_layers(card)  # a malformed card fails before any work
    asked = (device or "auto").strip().lower().split(":")[0]
    if isinstance(model, GraphNet) or asked not in ("auto", "cpu"):  # before any work: graphs and GPUs
        resolve(precision, model, "cpu" if asked == "auto" else asked)  # refuse an explicit bf16
    arr = np.asarray(array)
    if arr.ndim not in (2, 3) or min(arr.shape) < 1:
        raise InputError(f"expected a 2D (y, x) or 3D (z, y, x) array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise InputError(f"expected a real-valued array, got dtype {arr.dtype}")
    if not _all_finite(arr):
        raise InputError("input contains NaN or infinite voxels")
    if not 0.0 <= overlap <= 0.9:
        raise InputError(f"overlap must be in [0, 0.9], got {overlap}")
    if mc_samples < 0:
        raise InputError(f"mc_samples must be >= 0, got {mc_samples}")
    dim, arch = _model_dims(model, card)
    vol = arr[None] if arr.ndim == 2 else arr
    if dim == 3 and arr.ndim == 2:
        raise InputError("a 3D model needs a 3D (z, y, x) volume, got a 2D image")
    modality = modality or (card or {}).get("modality")
    n_views = choose_views(views, arr.shape, dim, card, spacing_zyx)
    n_tta = choose_tta(tta, card, n_views)
    if n_views == 3:
        coef3, noise_info3 = _noise_model(arr, modality, noise_coef, progress) if arch.get("noise_map") \
            else (noise_coef, None)
        return _three_views(arr, model, card, progress, noise_info3, dict(
            device=device, tile=tile, overlap=overlap, tta=n_tta, mc_samples=mc_samples, seed=seed,
            cancel=cancel, noise_coef=coef3, modality=modality, guard=guard, precision=precision))
    spec = (card or {}).get("normalisation") or {"method": "zscore"}
    # scanner fill values (CT): the network sees air there, the output keeps them
    has_fill = _has_ct_fill(vol, modality)
    xn = nmap = fill = None
    if dim == 3:  # 3D tiles span slices: whole-volume normalised copy (and noise map)
        fill = _ct_fill(vol, modality) if has_fill else None
        src = np.where(fill, np.float32(CT_FLOOR_HU), vol).astype(np.float32) if fill is not None else vol
        xn, norm_params = normalise(src, spec)
        del src
    elif has_fill and spec.get("method") in ("percentile", "zscore"):
        norm_params = _norm_params(_fill_air(vol), spec)  # statistics need the air-filled volume
    else:
        norm_params = _norm_params(vol, spec)
    noise_info: Optional[Dict[str, Any]] = None
    coef: Optional[Tuple[float, float, float]] = None
    if arch.get("noise_map"):
        coef, noise_info = _noise_model(arr, modality, noise_coef, progress)
        if dim == 3:
            from .training.data import variance_map

            nmap = np.sqrt(variance_map(xn, coef, (-norm_params["offset"], norm_params["scale"]),
                                        smooth=1.0))
    context = int(arch.get("context", 1))
    outs: Dict[str, np.ndarray] = {}
    sink: Optional[Callable[[int, Dict[str, np.ndarray]], None]] = None
    restore = _neb is not None and _neb.axis > 0  # the other views: the restoration branch alone
    keys = ("out",) if restore else (("out", "sigma", "alpha", "blind", "gate") if _neb is not None
                                     else ("out", "sigma", "alpha"))
    if dim == 2:  # streamed: slices normalised on demand, blends finished slice by slice
        reader = _SliceSource(vol, norm_params, has_fill, coef).reader(context)
        if restore:
            reader = _with_neb(reader, _neb)  # type: ignore[arg-type]
        sink = _slice_writer(outs, vol, norm_params, has_fill)
    else:
        reader = _tile_reader(xn, nmap, context, dim)

    floor = _output_floor(card)  # physical units -> normalised, as the network's output
    out_floor = None if floor is None else (floor - norm_params["offset"]) / norm_params["scale"]
    graph_only = isinstance(model, GraphNet)  # ONNX graphs only: PyTorch is never imported
    if graph_only and mc_samples:
        raise InputError("Monte-Carlo dropout needs the PyTorch network: load it with dualnet.modelfile.load_model")
    dev, threads, device_name, amp_name = _device(device, graph_only)
    tile_shape, batch = _tile_shape(tile, dim, arch, dev, vol.shape, overlap)
    info: Dict[str, Any] = dict(
        device=dev.type, device_name=device_name, mode="2d-slicewise" if dim == 2 else "3d", views=1,
        overlap=overlap, tta=n_tta, mc_samples=int(mc_samples),
        passes=n_tta + int(mc_samples), seed=seed, normalisation=dict(norm_params),
        output_floor=floor, fallback=None, oom_retries=0, threads=threads, amp=amp_name)
    _add_noise_info(info, noise_info)

    from .sure_guard import GUARD_MODALITIES, unchecked_reason

    if guard is None:
        guard = modality in GUARD_MODALITIES
    # the guard's pass (a quarter of the slices or more) gets its share of the progress bar
    checks = guard and unchecked_reason(modality, dim) is None
    main_progress = scaled(progress, 0.0, GUARD_PROGRESS_FROM) if checks else progress
    was_training = model.training
    try:
        while True:
            try:
                if not graph_only:
                    _to_device(model, dev, dim)
                info["precision"] = resolve(precision, model, dev)
                if info["precision"] == "bfloat16":  # PyTorch under CPU autocast
                    info["fp32_layers"] = sorted(fp32_modules(model, fp32_layers))
                    fast = _torch_forward(model, dev, dim, restore, bf16=True, fp32_layers=fp32_layers)
                    info["backend"] = "torch"
                else:  # ONNX Runtime where the model ships the graph
                    fast = forward_for(model, dev, threads, graph="restore" if restore else "forward")
                    info["backend"] = "torch" if fast is None else "onnxruntime"
                # the CPU kernels of ONNX Runtime and of bf16 run fastest on small batches
                cap = BF16_BATCH_PIXELS if info["precision"] == "bfloat16" else \
                    ORT_BATCH_PIXELS if info["backend"] == "onnxruntime" else None
                if cap is not None and dim == 2:
                    batch = max(1, min(batch, cap // int(np.prod(tile_shape))))
                outputs = _run(vol.shape, reader, model, dim, dev, tile_shape, batch, overlap, n_tta,
                               int(mc_samples), seed, main_progress, cancel, sink, out_floor, fast=fast,
                               restore=restore, keys=keys)
                break
            except Exception as err:  # noqa: BLE001 - only a CUDA out-of-memory error is handled
                if dev.type != "cuda" or not _cuda_oom(err):
                    raise
                import torch

                torch.cuda.empty_cache()
                info["oom_retries"] += 1
                smaller = tuple(min(t, max(1 if (dim == 2 and i == 0) else MIN_TILE, t // 2))  # never larger
                                for i, t in enumerate(tile_shape))
                if batch > 1:
                    batch = max(1, batch // 2)
                elif smaller != tile_shape:
                    tile_shape = smaller
                else:
                    dev, threads, device_name, _ = _device("cpu", False)
                    info.update(device="cpu", device_name=device_name, fallback="cpu", amp=None, threads=threads)
                    tile_shape, batch = _tile_shape(tile, dim, arch, dev, vol.shape, overlap)
                    report(progress, 0.0, "warning: GPU out of memory, continuing on the CPU")
                    continue
                report(progress, 0.0, f"warning: GPU out of memory, retrying with tiles "
                                      f"{tile_shape} x{batch}")
    finally:
        model.train(was_training)
    del xn, nmap, reader

    if sink is None:  # 3D: whole-volume maps in normalised units, finished here in place
        outs = _finish_volume(outputs, vol, norm_params, fill)
    if _neb is not None and not restore:
        _neb.record(outs, norm_params)
    elif restore:  # no maps of its own: the first view's are the result's
        info["neb"] = "the first view's maps"
    if guard:
        if checks:  # (a 3D model or speckle: no pass, and the bar is already at the end of the main pass)
            report(progress, GUARD_PROGRESS_FROM, "checking the result against the input (SURE guard)")
        info["guard"] = _sure_guard(vol, outs["out"], model, dim, context, norm_params, has_fill, coef,
                                    modality, dev, tile_shape, batch, overlap, n_tta, seed, cancel, out_floor,
                                    fast, _neb if restore else None, _views, given_coef=noise_coef,
                                    progress=scaled(progress, GUARD_PROGRESS_FROM, 0.99))
    else:
        info["guard"] = None
    if floor is not None:  # exactly, in input units (the per-pass floor was in normalised units)
        for c, v in zip(_chunks(outs["out"]), _chunks(vol)):  # CT fill values stay as they came
            np.maximum(c, np.float32(floor), out=c, where=~_fill_mask(v) if has_fill else True)
    squeeze = (lambda a: a[0]) if arr.ndim == 2 else (lambda a: a)
    unc, sigma, alpha = outs.get("unc"), outs.get("sigma"), outs.get("alpha")
    if unc is not None:  # post-hoc sigma-scaling of the MC-dropout std, fitted on validation (card)
        info["uncertainty_scale"] = _uncertainty_scale(card)
        unc *= np.float32(info["uncertainty_scale"])
        weight = float((info.get("guard") or {}).get("weight", 1.0))
        if weight < 1.0:  # the result is weight * network + (1 - weight) * input: so is its spread
            unc *= np.float32(weight)
    info.update(tile=tuple(int(t) for t in (tile_shape[1:] if dim == 2 else tile_shape)),
                batch=batch, seconds=time.perf_counter() - t0)
    report(progress, 1.0, "done")
    return InferenceResult(
        denoised=squeeze(outs["out"]),
        uncertainty=None if unc is None else squeeze(unc),
        sigma_map=None if sigma is None else squeeze(sigma),
        alpha_map=None if alpha is None else squeeze(alpha),
        info=info)


def _noise_model(arr: np.ndarray, modality: Optional[str], noise_coef: Optional[Sequence[float]],
                 progress: Optional[ProgressFn]) -> Tuple[Tuple[float, float, float], Optional[Dict[str, Any]]]:
    """The noise variance polynomial a noise-map model is given: ``noise_coef`` checked, or
    estimated from ``arr`` for ``modality`` (then also the estimate's info)."""
    noise_info = None
    if noise_coef is None:
        from .training.data import noise_variance_model

        if modality not in ("mri", "ct", "us"):
            raise ModelError("this model needs the noise model of its input: give noise_coef "
                             "or the modality (mri, ct, us) to estimate it")
        report(progress, 0.0, f"estimating the {modality} noise model")
        noise_coef, noise_info = noise_variance_model(arr, modality)
    if len(noise_coef) != 3 or not np.all(np.isfinite(noise_coef)):
        raise ModelError(f"invalid noise model {tuple(noise_coef)} (need 3 finite coefficients)")
    return (float(noise_coef[0]), float(noise_coef[1]), float(noise_coef[2])), noise_info


def _device(name: str, graph_only: bool) -> Tuple[Any, Optional[int], str, Optional[str]]:
    """``(device, CPU threads or None, its description, the CUDA autocast dtype's name or None)``;
    for ONNX graphs the CPU, without importing PyTorch.

    Raises:
        InputError: graphs only and another device was asked for, or the device is unavailable.
    """
    from .device import HostCPU, autocast_dtype, configure_cpu_threads, cpu_threads, describe, resolve_device

    if graph_only:
        if (name or "auto").strip().lower() not in ("auto", "cpu"):
            raise InputError(f"device {name!r}: a network loaded as its ONNX graphs runs on the CPU only")
        threads = cpu_threads()
        return HostCPU(), threads, f"cpu ({threads} threads)", None
    if (name or "").strip().lower() == "cpu":  # also the fallback after a CUDA out-of-memory error
        import torch

        dev = torch.device("cpu")
    else:
        dev = resolve_device(name)
    threads = configure_cpu_threads() if dev.type == "cpu" else None
    amp = str(autocast_dtype(dev)).replace("torch.", "") if dev.type == "cuda" else None
    return dev, threads, describe(dev), amp


def _to_device(model: Any, dev: Any, dim: int) -> None:
    """A PyTorch network onto ``dev`` (channels-last for 2D on the CPU: measured faster here)."""
    import torch

    model.to(dev)
    if dim == 2 and dev.type == "cpu":
        model.to(memory_format=torch.channels_last)


def _cuda_oom(err: BaseException) -> bool:
    """Whether ``err`` is PyTorch's CUDA out-of-memory error (PyTorch is imported if it was raised)."""
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(err, torch.cuda.OutOfMemoryError)


def _three_views(arr: np.ndarray, model: Any, card: Optional[Dict[str, Any]], progress: Optional[ProgressFn],
                 noise_info: Optional[Dict[str, Any]], kwargs: Dict[str, Any]) -> InferenceResult:
    """:func:`denoise_array` along z, y and x (one noise model for all three), averaged
    (:mod:`dualnet.orthoviews`), then smoothed where the views disagree when the card asks for it
    (:mod:`dualnet.view_smoothing`); MC dropout in the first view only."""
    from .orthoviews import denoise_views, merge_info
    from .view_smoothing import card_strength, smooth_views

    t0 = time.perf_counter()
    mc = int(kwargs.pop("mc_samples"))

    from .onnx_backend import can_restore

    share = _SharedNeb() if can_restore(model) else None

    def run(view: np.ndarray, a: int, prog: Optional[ProgressFn]) -> InferenceResult:
        return denoise_array(view, model, card, views=1, progress=prog, mc_samples=mc if a == 0 else 0,
                             _neb=None if share is None else (share if a == 0 else share.along(a)), _views=3,
                             **kwargs)

    strength = card_strength(card)  # a malformed card fails before any work
    res = denoise_views(arr, run, progress, spread=strength is not None)
    smoothing = None
    if strength is not None:
        t1 = time.perf_counter()
        report(progress, 1.0, "smoothing where the views disagree")
        res["denoised"] = smooth_views(res["denoised"], res.pop("spread"), strength)
        smoothing = {"strength": strength, "seconds": round(time.perf_counter() - t1, 3)}
    info = merge_info(res["infos"], time.perf_counter() - t0)
    if smoothing is not None:
        info["view_smoothing"] = smoothing
    _add_noise_info(info, noise_info)
    report(progress, 1.0, "done")
    return InferenceResult(denoised=res["denoised"], uncertainty=res["uncertainty"], sigma_map=res["sigma_map"],
                           alpha_map=res["alpha_map"], info=info)


def _sure_guard(vol: np.ndarray, out: np.ndarray, model: Any, dim: int, context: int,
                norm_params: Dict[str, float], has_fill: bool, coef: Optional[Tuple[float, float, float]],
                modality: Optional[str], dev: Any, tile_shape: Tuple[int, ...], batch: int, overlap: float,
                tta: int, seed: int, cancel: Optional[CancelToken], out_floor: Optional[float],
                fast: Optional[Callable[[Any], Dict[str, Any]]] = None,
                neb: Optional[_SharedNeb] = None, views: int = 1,
                given_coef: Optional[Sequence[float]] = None,
                progress: Optional[ProgressFn] = None) -> Dict[str, Any]:
    """The SURE guard of :mod:`dualnet.sure_guard` on ``out`` (input units, blended in place):
    one more streamed pass of the network over the runs of slices of ``guard_blocks`` with a small
    noise probe added, each slice's SURE terms summed as soon as it is done (a few slices in memory).
    One of ``views`` orthogonal views checks a ``views``-th of the slices a single view checks;
    ``neb``: the view reads another view's NEB maps (the probe goes through the restoration branch).
    ``coef`` is the network's noise model (None for a model without a noise map); the guard uses it,
    else the caller's ``given_coef`` (a given ``--sigma``), else an estimate from ``vol``.
    Returns the weight and the estimates (``reason`` when the check could not run)."""
    from . import sure_guard as sg

    t0 = time.perf_counter()
    reason = sg.unchecked_reason(modality, dim)
    if reason is not None:
        return {"weight": 1.0, "reason": reason}
    var_coef = coef
    if var_coef is None and given_coef is not None:  # a model without a noise map, a noise level given
        var_coef, _ = _noise_model(vol, modality, given_coef, None)  # checked as the network's would be
    if var_coef is None:  # ... and none given
        from .training.data import noise_variance_model

        try:
            var_coef, _ = noise_variance_model(vol, modality)  # type: ignore[arg-type]
        except InputError as err:  # e.g. a tiny image: the network's result stands
            return {"weight": 1.0, "reason": f"no noise estimate ({err})"}
    blocks = sg.guard_blocks(vol.shape[0], context, fraction=sg.FRACTION / max(int(views), 1))
    # the runs with their context slices, one after the other: a run's own context comes first and
    # last, so its inner slices see the right neighbours; the network runs on the inner slices only
    zs = np.concatenate([np.arange(lo, hi) for _, _, lo, hi in blocks])
    inner = np.concatenate([(np.arange(lo, hi) >= z0) & (np.arange(lo, hi) < z1) for z0, z1, lo, hi in blocks])
    probed = _ProbedSlices(vol, out, zs, var_coef, seed, has_fill, inner)
    sums = sg.SureSums()

    def add(i: int, maps: Dict[str, np.ndarray]) -> None:
        b, eps, var, keep = probed.take(i)
        z = int(zs[i])
        perturbed = _finish_map("out", maps["out"], norm_params)
        sums.add(vol[z], out[z], perturbed, b, eps, var, sg.check_mask(modality, out[z], var, keep))

    reader = _SliceSource(probed, norm_params, has_fill, coef).reader(context)
    if neb is not None:  # the probe goes through the restoration branch; the NEB maps stay the view's
        reader = _with_neb(reader, neb, zs)
    _run(probed.shape, reader, model, dim, dev, tile_shape, batch, overlap, tta, 0, seed, progress, cancel, add,
         out_floor, only=inner, fast=fast, restore=neb is not None, keys=("out",))
    res = sums.result()
    for y, f in zip(_chunks(vol), _chunks(out)):
        sg.blend(y, f, res["weight"])
    res.update(slices=[[int(z0), int(z1)] for z0, z1, _, _ in blocks], seconds=round(time.perf_counter() - t0, 3))
    return res


class _ProbedSlices:
    """Slices ``zs`` of ``vol`` (in that order) with the SURE probe added, made on demand (float32):
    entry ``i`` is ``vol[zs[i]] + eps * b`` with ``b, eps`` from :func:`dualnet.sure_guard.probe`
    for ``(seed, i)`` and the noise variance at the network's result ``out``; CT fill values stay.
    Each entry's probe is made when the network reads the entry; the probes of the entries marked in
    ``summed`` are kept until :meth:`take` hands them to the SURE sums (a few entries at a time)."""

    def __init__(self, vol: np.ndarray, out: np.ndarray, zs: np.ndarray, coef: Sequence[float], seed: int,
                 has_fill: bool, summed: np.ndarray) -> None:
        self.vol, self.out, self.zs, self.coef, self.seed, self.has_fill = vol, out, zs, coef, seed, has_fill
        self.summed = summed
        self.shape = (len(zs),) + tuple(vol.shape[1:])
        self._probes: Dict[int, Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]] = {}

    def _probe(self, i: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """``(b, eps, var, keep)`` of entry ``i`` (``keep``: not a fill value; None without fill)."""
        from . import sure_guard as sg
        from .training.data import variance_at

        z = int(self.zs[i])
        var = variance_at(self.out[z], self.coef)
        b, eps = sg.probe(var.shape, var, self.seed, i)
        keep = ~_fill_mask(self.vol[z]) if self.has_fill else None
        if keep is not None:
            eps[~keep] = 0.0
        return b, eps, var, keep

    def take(self, i: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """The probe of entry ``i``, released."""
        found = self._probes.pop(i, None)
        return found if found is not None else self._probe(i)

    def __getitem__(self, i: int) -> np.ndarray:
        found = self._probes.get(i)
        if found is None:
            found = self._probe(i)
            if self.summed[i]:
                self._probes[i] = found
        b, eps = found[0], found[1]
        return self.vol[int(self.zs[i])].astype(np.float32) + eps * b


def _output_floor(card: Optional[Dict[str, Any]]) -> Optional[float]:
    """The card's ``output_floor`` (input units; e.g. 0 for magnitude MRI), None when absent. A
    model trained with it (``nonnegative``) saw its output floored there in every forward pass."""
    floor = (card or {}).get("output_floor")
    if floor is None:
        return None
    return _card_number(floor, "output_floor", "a finite number", lambda v: True)


def _uncertainty_scale(card: Optional[Dict[str, Any]]) -> float:
    """The card's ``uncertainty_calibration.scale`` (MC-dropout std -> expected error; 1 = none)."""
    scale = ((card or {}).get("uncertainty_calibration") or {}).get("scale", 1.0)
    return _card_number(scale, "uncertainty_calibration.scale", "a positive number", lambda v: v > 0)


def _card_number(value: Any, name: str, what: str, ok: Callable[[float], bool]) -> float:
    """A number read from a model card (untrusted input): finite and ``ok``, else ModelError."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number) or not ok(number):
        raise ModelError(f"model card: {name} must be {what}, got {value!r}")
    return number


def _finish_map(key: str, val: np.ndarray, params: Dict[str, float]) -> np.ndarray:
    """A blended map in normalised units -> input units (float32): ``out`` de-normalised (as
    :func:`denormalise`, in place), ``unc`` / ``sigma`` scaled, ``alpha`` unchanged."""
    if key == "out":
        out = np.asarray(val, dtype=np.float32)
        out *= np.float32(params["scale"])
        out += np.float32(params["offset"])
        return out
    if key in ("unc", "sigma"):
        return (val * params["scale"]).astype(np.float32, copy=False)
    return val.astype(np.float32, copy=False)


def _finish_volume(outputs: Dict[str, np.ndarray], vol: np.ndarray, params: Dict[str, float],
                   fill: Optional[np.ndarray]) -> Dict[str, np.ndarray]:
    """Whole-volume maps from :func:`_run` (normalised units) -> input units, fill values kept."""
    outs = {key: _finish_map(key, val, params) for key, val in outputs.items()}
    if fill is not None:
        outs["out"][fill] = vol[fill]
    return outs


def _slice_writer(outs: Dict[str, np.ndarray], vol: np.ndarray, params: Dict[str, float],
                  has_fill: bool) -> Callable[[int, Dict[str, np.ndarray]], None]:
    """The ``sink`` of a streamed :func:`_run`: finishes one slice's blended maps (normalised
    units) into input units and writes them into ``outs`` (float32 volumes of ``vol``'s shape,
    allocated at the first slice); CT fill values of ``vol`` are copied through."""

    def write(z: int, maps: Dict[str, np.ndarray]) -> None:
        for key, val in maps.items():
            dst = outs.get(key)
            if dst is None:
                dst = outs[key] = np.empty(vol.shape, np.float32)
            val = _finish_map(key, val, params)
            if key == "out" and has_fill:
                fill = _fill_mask(vol[z])
                val[fill] = vol[z][fill]
            dst[z] = val

    return write


def _fill_mask(a: np.ndarray) -> np.ndarray:
    from .estimate import CT_PADDING_HU

    return a < CT_PADDING_HU


def _has_ct_fill(vol: np.ndarray, modality: Optional[str]) -> bool:
    """Whether :func:`_ct_fill` would find fill values (without building the mask)."""
    if modality != "ct":
        return False
    from .estimate import CT_PADDING_HU

    return any(bool((c < CT_PADDING_HU).any()) for c in _chunks(vol))


def _fill_air(vol: np.ndarray) -> np.ndarray:
    """A float32 copy of ``vol`` with CT fill values raised to air (as the network sees them)."""
    out = vol.astype(np.float32, copy=True)
    for c_in, c_out in zip(_chunks(vol), _chunks(out)):
        c_out[_fill_mask(c_in)] = np.float32(CT_FLOOR_HU)
    return out


class _SliceSource:
    """Normalised slices and noise-std maps of a (z, y, x) volume, made on demand, slice by slice.

    A slice is normalised like :func:`normalise` would on the whole volume (CT fill values raised
    to air first, as :func:`denoise_array` does) and its noise map made like ``variance_map`` on the
    whole normalised volume with the in-plane smoothing of 2D models, so the values are identical;
    only the few slices a 2.5D window needs are cached.
    """

    def __init__(self, vol: np.ndarray, params: Dict[str, float], has_fill: bool,
                 coef: Optional[Tuple[float, float, float]]) -> None:
        self.vol = vol
        self.offset = np.float32(params["offset"])
        self.scale = np.float32(params["scale"])
        self.params = params
        self.has_fill = has_fill
        self.coef = coef
        self._norm: Dict[int, np.ndarray] = {}
        self._noise: Dict[int, np.ndarray] = {}

    def norm(self, z: int) -> np.ndarray:
        z = min(max(z, 0), self.vol.shape[0] - 1)  # edge slices repeated
        out = self._norm.get(z)
        if out is None:
            a = self.vol[z]
            out = a.astype(np.float32, copy=True)
            if self.has_fill:
                out[_fill_mask(a)] = np.float32(CT_FLOOR_HU)
            out -= self.offset
            out /= self.scale
            self._norm[z] = out
        return out

    def noise(self, z: int) -> np.ndarray:
        out = self._noise.get(z)
        if out is None:
            from .training.data import variance_map

            assert self.coef is not None
            var = variance_map(self.norm(z)[None], self.coef,
                               (-self.params["offset"], self.params["scale"]), smooth=(0.0, 1.0, 1.0))
            out = self._noise[z] = np.sqrt(var)[0]
        return out

    def release_below(self, z: int) -> None:
        for cache in (self._norm, self._noise):
            for key in [k for k in cache if k < z]:
                del cache[key]

    def reader(self, context: int) -> Callable[[Tuple[slice, ...]], np.ndarray]:
        """Like :func:`_tile_reader` for a 2D model, reading this source; tiles must come in
        increasing z (as :func:`_tiles` lists them): slices below the window are dropped."""
        k = max(int(context), 1) // 2

        def read(s: Tuple[slice, ...]) -> np.ndarray:
            z = s[0].start
            self.release_below(max(z - k, 0))
            plane = tuple(s[1:])
            chans = [self.norm(zz)[plane] for zz in range(z - k, z + k + 1)]
            if self.coef is not None:
                chans.append(self.noise(z)[plane])
            return np.stack(chans, 0)  # (K [+ 1], ty, tx)

        return read


def balanced_tile(size: int, max_tile: int, overlap: float, multiple: int = 16) -> int:
    """Smallest tile side (multiple of ``multiple``, <= ``max_tile``) needing no more tiles
    along an axis of ``size`` voxels than ``max_tile`` would, so little work is repeated."""
    if size <= max_tile:
        return size
    step = max(1, int(round(max_tile * (1.0 - overlap))))
    n = math.ceil((size - max_tile) / step) + 1
    side = math.ceil(size / (n - (n - 1) * overlap))
    side = min(max_tile, math.ceil(side / multiple) * multiple)
    while side < max_tile and len(tile_starts(size, side, overlap)) > n:
        side += multiple
    return side


def _tile_shape(tile: TileArg, dim: int, arch: Dict[str, Any], dev: Any,
                shape: Sequence[int], overlap: float = 0.25) -> Tuple[Tuple[int, ...], int]:
    """Tile (tz, ty, tx) clipped to the volume (tz = 1 for 2D models) and tiles per batch."""
    if tile is None:
        side, batch = auto_tile(arch, dev, shape)
        spatial = list(shape[1:]) if dim == 2 else list(shape)
        sides = [balanced_tile(s, side, overlap) for s in spatial]
    else:
        sides = [int(tile)] * dim if np.isscalar(tile) else [int(t) for t in tile]
        if len(sides) != dim or min(sides) < 1:
            raise InputError(f"tile must be a positive int or {dim} ints, got {tile!r}")
        batch = None
    full = ([1] + sides) if dim == 2 else sides
    clipped = tuple(min(t, s) for t, s in zip(full, shape))
    if batch is None:
        per = bytes_per_voxel(arch) * float(np.prod(clipped))
        budget = memory_budget(dev)
        batch = max(1, min(16 if dim == 2 else 4, int(budget // max(per, 1.0))))
    return clipped, batch


def _batches(items: List[Any], size: int) -> Iterator[List[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _ct_fill(vol: np.ndarray, modality: Optional[str]) -> Optional[np.ndarray]:
    """Mask of CT fill values outside the scan field (below ``estimate.CT_PADDING_HU``), or None
    when the data are not CT or have none. Training never shows the network such values
    (``degrade`` raises them to air), so inference does the same and keeps them in the output."""
    if modality != "ct":
        return None
    from .estimate import CT_PADDING_HU

    mask = vol < CT_PADDING_HU
    return mask if mask.any() else None


def _tile_reader(xn: np.ndarray, nmap: Optional[np.ndarray], context: int, dim: int
                 ) -> Callable[[Tuple[slice, ...]], np.ndarray]:
    """A function from a tile (slices over (z, y, x)) to the network's input for it, (C, *tile):
    2D models get the ``context`` slices around the tile's slice (edge slices repeated), and
    noise-map models the noise-std map of the tile as the last channel."""
    k = max(int(context), 1) // 2
    src = np.pad(xn, ((k, k), (0, 0), (0, 0)), mode="edge") if (dim == 2 and k) else xn

    def read(s: Tuple[slice, ...]) -> np.ndarray:
        if dim == 2:
            z = s[0].start
            chans = [src[(slice(z, z + 2 * k + 1),) + tuple(s[1:])]]  # (K, ty, tx)
            if nmap is not None:
                chans.append(nmap[s])  # (1, ty, tx)
        else:
            chans = [xn[s][None]] + ([nmap[s][None]] if nmap is not None else [])
        return np.concatenate(chans, 0) if len(chans) > 1 else chans[0]

    return read


def _tensor(x: np.ndarray, dev: Any, dim: int) -> Any:
    """A numpy batch as a tensor on ``dev`` (channels-last for 2D on the CPU: measured faster here)."""
    import torch

    # a copy where any stride is negative: numpy calls a flip along a length-1 axis contiguous, torch refuses it
    t = torch.from_numpy(x.copy() if any(st < 0 for st in x.strides) else np.ascontiguousarray(x)).to(dev)
    return t.contiguous(memory_format=torch.channels_last) if dim == 2 and dev.type == "cpu" else t


def _torch_forward(model: Any, dev: Any, dim: int, restore: bool, bf16: bool = False,
                   fp32_layers: Optional[Sequence[str]] = None) -> Callable[[np.ndarray], Dict[str, np.ndarray]]:
    """``model`` (or ``model.restore``) in eval mode as a function of a float32 numpy batch
    (channels-last on the CPU for 2D models, autocast on CUDA, ``bf16``: CPU bf16 with the model's
    intensity layers, or the card's ``fp32_layers``, in fp32, :func:`dualnet.precision.cpu_bf16`),
    returning float32 numpy maps."""
    import torch

    from .device import autocast_dtype
    from .precision import cpu_bf16

    amp = autocast_dtype(dev)
    net = model.restore if restore else model

    def scope() -> Any:
        if bf16:
            return cpu_bf16(model, fp32_layers)
        return torch.autocast(device_type="cuda", dtype=amp) if amp is not None else contextlib.nullcontext()

    def run(x: np.ndarray) -> Dict[str, np.ndarray]:
        t = _tensor(x, dev, dim)
        model.eval()
        with torch.inference_mode(), scope():
            res = net(t)
            return {k: v.float().to("cpu").numpy() for k, v in res.items() if v is not None}

    return run


@contextlib.contextmanager
def _torch_mc(model: Any, dev: Any, dim: int, restore: bool, samples: int, seed: int,
              out_floor: Optional[float]) -> Iterator[Callable[[np.ndarray], np.ndarray]]:
    """Inside: a function giving the std over ``samples`` Monte-Carlo dropout passes of a numpy batch
    (PyTorch; the dropout masks drawn from ``seed`` in order, the global RNG restored after)."""
    import torch

    from .models import enable_mc_dropout

    net = model.restore if restore else model  # a PyTorch network: denoise_array refuses MC for graphs

    def std(x: np.ndarray) -> np.ndarray:
        enable_mc_dropout(model)
        try:
            t = _tensor(x, dev, dim)
            with torch.inference_mode():
                outs = []
                for _ in range(samples):
                    out = net(t)["out"].float()
                    outs.append(out.clamp_min(out_floor) if out_floor is not None else out)
                mc = torch.stack(outs)
                res = mc.std(0, unbiased=samples > 1) if samples > 1 else torch.zeros_like(mc[0])
                return res.to("cpu").numpy()
        finally:
            model.eval()

    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        yield std


def _run(shape: Tuple[int, ...], reader: Callable[[Tuple[slice, ...]], np.ndarray], model: Any,
         dim: int, dev: Any, tile_shape: Tuple[int, ...], batch: int, overlap: float, tta: int,
         mc_samples: int, seed: int, progress: Optional[ProgressFn], cancel: Optional[CancelToken],
         sink: Optional[Callable[[int, Dict[str, np.ndarray]], None]] = None,
         out_floor: Optional[float] = None, only: Optional[np.ndarray] = None,
         fast: Optional[Callable[[Any], Dict[str, Any]]] = None, restore: bool = False,
         keys: Sequence[str] = ("out", "sigma", "alpha")) -> Dict[str, np.ndarray]:
    """Tiled passes over a normalised (z, y, x) volume of ``shape`` whose tiles ``reader``
    returns; gives normalised-unit maps.

    Without ``sink`` the blends are accumulated in whole-volume buffers and returned. With a
    ``sink`` (2D models only) each slice's blend is finished as soon as its last tile is done and
    handed over as ``sink(z, {key: (y, x) map})`` (the arrays are the sink's to keep); only the
    slices of the current batch are held, and an empty dict is returned. The values are the same.
    ``out_floor`` (normalised units) floors ``out`` in every pass (TTA, MC) before blending.
    ``only`` (bool per slice, streamed 2D only): the network runs on those slices alone (the others
    are still read as their context) and only they reach the sink. ``fast``
    (:func:`dualnet.onnx_backend.forward_for`) replaces the deterministic forward of ``model``;
    Monte-Carlo dropout passes always run ``model``. ``restore``: the tiles carry the NEB maps and
    ``model.restore`` runs. ``keys``: the maps blended (of the model's outputs).
    """
    tiles = _tiles(shape, tile_shape, overlap)
    weight = gaussian_weight(tile_shape)
    stream = sink is not None
    if stream and dim != 2:
        raise ValueError("streamed blending needs a 2D (slice-wise) model")
    if only is not None:
        if not stream:
            raise ValueError("only= needs the streamed 2D pass")
        tiles = [s for s in tiles if only[s[0].start]]
    acc: Dict[str, np.ndarray] = {}
    open_slices: Dict[int, Dict[str, np.ndarray]] = {}
    done: Dict[int, int] = {}
    if stream:  # every slice is tiled alike: one (1, y, x) weight sum serves all
        plane = (1,) + tuple(shape[1:])
        plane_tiles = _tiles(plane, tile_shape, overlap)
        wsum = np.zeros(plane, np.float32)
        for s in plane_tiles:
            wsum[s] += weight
    else:
        acc["out"] = np.zeros(shape, np.float32)
        wsum = np.zeros(shape, np.float32)
    transforms = tta_transforms(tta)
    n_batches = max(1, math.ceil(len(tiles) / batch))
    forward = fast if fast is not None else _torch_forward(model, dev, dim, restore)
    mc_scope = _torch_mc(model, dev, dim, restore, mc_samples, int(seed), out_floor) if mc_samples else None

    def run(x: np.ndarray) -> Dict[str, np.ndarray]:
        res = {k: v for k, v in forward(x).items() if k in keys and v is not None}
        if out_floor is not None:
            res["out"] = np.maximum(res["out"], np.float32(out_floor))
        return res

    with mc_scope if mc_scope is not None else contextlib.nullcontext() as mc_std:
        for b, group in enumerate(_batches(tiles, batch)):
            check_cancel(cancel)
            x = np.stack([reader(s) for s in group]).astype(np.float32, copy=False)  # (B, C, *tile)
            sums: Dict[str, np.ndarray] = {}
            for k, flip in transforms:
                for key, val in run(apply_tta(x, k, flip)).items():
                    val = invert_tta(val, k, flip)
                    sums[key] = val if key not in sums else sums[key] + val
            preds = {key: v / np.float32(len(transforms)) for key, v in sums.items()} if len(transforms) > 1 else sums
            if mc_std is not None:
                preds["unc"] = mc_std(x)
            del x, sums
            for key, val in preds.items():
                if dim == 2:
                    val = val[:, :, None]
                val = val[:, 0] * weight
                for i, s in enumerate(group):
                    if stream:
                        bufs = open_slices.setdefault(s[0].start, {})
                        if key not in bufs:
                            bufs[key] = np.zeros(plane, np.float32)
                        bufs[key][(slice(0, 1),) + tuple(s[1:])] += val[i]
                    else:
                        if key not in acc:
                            acc[key] = np.zeros(shape, np.float32)
                        acc[key][s] += val[i]
            del preds
            if stream:
                for s in group:
                    z = s[0].start
                    done[z] = done.get(z, 0) + 1
                    if done[z] == len(plane_tiles):  # the slice's last tile: finish its blend
                        del done[z]
                        bufs = open_slices.pop(z)
                        for val in bufs.values():
                            val /= wsum
                        sink(z, {key: val[0] for key, val in bufs.items()})
            else:
                for s in group:
                    wsum[s] += weight
            report(progress, (b + 1) / n_batches * 0.99,
                   f"denoising: batch {b + 1}/{n_batches} ({len(tiles)} tiles)")
    if stream:
        return {}
    for val in acc.values():  # in place: no second whole-volume copy
        val /= wsum
    return acc
