"""Study runner: ``dualnet evaluate --config study.toml --out DIR``.

A study degrades real clean scans (``../shared/data``) to low-resolution noisy acquisitions with
:func:`dualnet.degrade.degrade`, denoises them with every configured method and compares each
output with the CLEAN LOW-RESOLUTION reference on the same grid (the comparison is made at the
low resolution: ``clean_lr`` versus ``method(noisy_lr)``; no method is asked to upsample).

Per case it records PSNR / SSIM / RMSE over the foreground mask and over the whole image (with
the data range stated in the report), downstream Dice of a frozen classical segmenter
(:mod:`dualnet.segment`, fitted once per subset on the clean LR references) applied to the
method's output against the REFERENCE LABELS on the LR grid (``dice``; ``dice_agree`` against the
segmenter's prediction on the clean reference; the prediction on the clean reference itself gives
the ceiling), and the method's wall-clock runtime (including per-case fine-tuning). Optional
parts: ``[robustness]`` (levels outside the training range, mis-specified noise, NEB maps),
``[uncertainty]`` (MC-dropout calibration) and ``[ablations]`` (compared in the report). Results are cached as one JSON file per (case, level, seed, method)
under ``OUT/cache``, keyed by a hash of everything that determines them, so an interrupted study
resumes where it stopped. :mod:`dualnet.report` then writes CSV tables, paired statistics with
the CASE as the unit (Holm-corrected), box plots, image panels and ``report.md`` / ``report.html``.

Config (TOML) outline -- see ``configs/study.toml``::

    [study]
    name = "..."; seeds = [0]; methods = ["noisy", "gaussian", ...]; focus = ["dualnet", "nlm"]
    alpha = 0.05; stats_metrics = ["psnr_fg", "ssim_fg", "dice"]; device = "cpu"
    data_dir = "auto"            # or a folder, relative to the config file
    [methods.dualnet_ft]         # per-method options; `base` reuses a registered method
    per_case = true; steps = 150; config = "finetune.toml"   # or: model = "path/to/model.safetensors"
    [methods.dualnet_noneb]      # a network method declared generically (an ablation variant)
    kind = "network"; ablation = true; model = { mri = "../weights/ablation/dualnet_mri_noneb.safetensors" }
    [ablations]
    pairs = [{ full = "dualnet_ref", ablated = "dualnet_noneb", without = "the NEB" }]
    [robustness]
    cases = 2; reference = { mri = "bm4d" }; levels = { mri = [0.005, 0.2] }; mismatch = { mri = ["speckle"] }
    [uncertainty]
    cases = 2; mc_samples = 8
    [[subset]]
    name = "mri_adni"; modality = "mri"; image = "mri/adni_mprage_t1.nii.gz"
    crop = [[z0, z1], [y0, y1], [x0, x1]]; slabs = 4     # non-overlapping z slabs = cases
    labels = { kind = "adni_pve", wm = "...", gm = "..." }
    levels = [0.05, 0.10]; lr_factor = 2; data_range = "reference"
    [[subset]]                   # ultrasound: frames grouped into cases
    images = "us/images/*.png"; groups = 8; frames_per_case = 3; crop = [[y0, y1], [x0, x1]]
    labels = { kind = "us_rgb", masks = "us/masks" }

Arrays are (z, y, x) (or (y, x) for ultrasound frames); spacing in mm in (z, y, x) order unless
named ``spacing`` on a :class:`~dualnet.io.Volume` (ITK x, y, z).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import hashlib
import importlib.util
import json
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import __version__
from .errors import CancelledError, InputError, ModelError
from .progress import CancelToken, ProgressFn, check_cancel, report

#: Bump when the meaning of cached numbers changes (invalidates every cache entry).
CACHE_VERSION = "2"  # 2: Dice against the reference labels, dice_agree added

#: Default data range per modality: "reference" = max - min of the clean LR reference of the
#: case; CT: 2000 HU (the span of a [-1000, 1000] HU window); US: 255 grey levels.
DEFAULT_DATA_RANGE = {"mri": "reference", "ct": 2000.0, "us": 255.0}

#: Metrics recorded per case (foreground / whole image) -- "_fg" uses metrics.foreground_mask.
IMAGE_METRICS = ("psnr_fg", "psnr_all", "ssim_fg", "ssim_all", "rmse_fg", "rmse_all")

#: Ultrasound Dice ROI: labelled structures dilated by this many low-resolution pixels.
US_ROI_MARGIN = 8

CLASSICAL = ("gaussian", "median", "nlm", "diffusion", "bm3d", "bm4d")
NETWORK = ("dualnet", "dualnet_ft", "dncnn", "n2v")
OPTIONAL_PACKAGES = {"bm3d": "bm3d", "bm4d": "bm4d"}

# Segmenter kind for each label loader.
_SEGMENTER_FOR_LABELS = {"adni_pve": "mri_wm", "freesurfer": "mri_wm", "mask": "ct_liver", "us_rgb": "us_nerve_vessel"}


# ----------------------------------------------------------------------------- method registry
@dataclass
class MethodContext:
    """What a method function gets besides the noisy array.

    Attributes:
        modality: ``"mri"``, ``"ct"`` or ``"us"``.
        spacing_zyx: voxel size of the noisy LR array in mm, (z, y, x) or (y, x).
        level: noise level of the case (units of ``dualnet.noise.add_noise``).
        seed: integer seed of the case (for methods with randomness).
        options: the ``[methods.NAME]`` table of the config.
        config_dir: folder of the config file (relative model paths are resolved from it).
        device: torch device string for network methods.
        progress / cancel: passed to the method (see :mod:`dualnet.progress`).
        work_dir: a temporary folder of the current case (removed after it), for methods with
            a ``prepare`` step (per-case fine-tuning writes its model there).
        state: what ``prepare`` leaves for ``run`` (e.g. ``{"model_path": Path}``), per case.
    """

    modality: str
    spacing_zyx: Tuple[float, ...] = (1.0, 1.0, 1.0)
    level: float = 0.0
    seed: int = 0
    options: Dict[str, Any] = field(default_factory=dict)
    config_dir: Path = Path(".")
    device: str = "cpu"
    progress: Optional[ProgressFn] = None
    cancel: Optional[CancelToken] = None
    work_dir: Optional[Path] = None
    state: Dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodSpec:
    """A method of the study.

    Attributes:
        name: registry name.
        run: ``run(noisy_lr, ctx) -> denoised`` (float array, same shape, same units).
        check: ``check(ctx) -> None`` when usable, else a one-line reason (e.g. "bm4d not
            installed"); the report lists the method as "unavailable: reason".
        description: one line for the report.
        prepare: optional ``prepare(noisy_items, ctx)`` called once per case before ``run`` on
            each of its items (arrays (z, y, x) or (y, x) frames); it may store results in
            ``ctx.state`` and files in ``ctx.work_dir``. Its time counts in the runtime.
        stamp: optional ``stamp(ctx) -> JSON-able`` added to the cache key (e.g. a digest of
            the model file), so a retrained model is not answered from the cache.
    """

    name: str
    run: Callable[[np.ndarray, MethodContext], np.ndarray]
    check: Callable[[MethodContext], Optional[str]] = lambda ctx: None
    description: str = ""
    prepare: Optional[Callable[[List[np.ndarray], MethodContext], None]] = None
    stamp: Optional[Callable[[MethodContext], Any]] = None


def _load_degrade() -> Callable:
    """``dualnet.degrade.degrade`` (a hook so tests can inject a stand-in)."""
    from .degrade import degrade

    return degrade


def _load_baselines_denoise() -> Callable:
    """``dualnet.baselines.denoise`` (a hook so tests can inject a stand-in)."""
    from .baselines import denoise

    return denoise


def _run_noisy(arr: np.ndarray, ctx: MethodContext) -> np.ndarray:
    return np.asarray(arr, dtype=np.float32).copy()


def _classical(name: str) -> MethodSpec:
    def run(arr: np.ndarray, ctx: MethodContext) -> np.ndarray:
        denoise = _load_baselines_denoise()
        sigma = ctx.options.get("sigma")
        return denoise(
            arr, ctx.options.get("method", name), ctx.modality, sigma=sigma, spacing_zyx=ctx.spacing_zyx,
            progress=ctx.progress, cancel=ctx.cancel,
        )

    def check(ctx: MethodContext) -> Optional[str]:
        base = ctx.options.get("method", name)
        pkg = OPTIONAL_PACKAGES.get(base)
        if pkg and importlib.util.find_spec(pkg) is None:
            return f"package '{pkg}' not installed (optional baseline, non-commercial licence)"
        try:
            _load_baselines_denoise()
        except ImportError as err:
            return f"dualnet.baselines not importable ({err})"
        try:
            from .baselines import METHODS
        except ImportError:
            return None  # a stand-in was injected
        if base not in METHODS:
            return f"dualnet.baselines has no method {base!r}"
        return None

    return MethodSpec(name, run, check, f"classical baseline `{name}` (dualnet.baselines, sigma estimated)")


def _per_modality(value: Any, modality: str) -> Any:
    """``value[modality]`` for a per-modality table (``{ mri = ..., ct = ... }``), else ``value``."""
    return value.get(modality) if isinstance(value, dict) else value


def _config_path(value: Any, ctx: MethodContext) -> Optional[Path]:
    """A path option (absolute, or relative to the study config's folder), or None."""
    if not value:
        return None
    p = Path(str(value))
    return p if p.is_absolute() else (ctx.config_dir / p)


def _model_path(name: str, ctx: MethodContext) -> Optional[Path]:
    """The ``model`` option for the case's modality, or None (network: the shipped model)."""
    return _config_path(_per_modality(ctx.options.get("model"), ctx.modality), ctx)


def _base_model_option(ctx: MethodContext) -> Optional[Path]:
    """Per-case fine-tuning start: ``base_model``, or ``base`` when it is a model file (not a
    registered method name); None = the shipped model of the modality."""
    value = _per_modality(ctx.options.get("base_model"), ctx.modality)
    if value is None:
        base = _per_modality(ctx.options.get("base"), ctx.modality)
        if base and str(base) not in REGISTRY:
            value = base
    return _config_path(value, ctx)


def _finetune_config_path(ctx: MethodContext) -> Path:
    """``config`` option (a finetune TOML, relative to the study config), else configs/finetune.toml."""
    p = _config_path(ctx.options.get("config"), ctx)
    return p if p is not None else Path(__file__).resolve().parent / "configs" / "finetune.toml"


_DIGESTS: Dict[Tuple[str, int, int], str] = {}


def file_digest(path: Path) -> Optional[str]:
    """SHA-256 (16 hex digits) of a file, memoised by (path, size, mtime); None if absent."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    return _DIGESTS[key]


#: Card entries that record how a model was made and scored; every other entry can change what its
#: inference computes (views, smoothing, TTA, output floor, normalisation, uncertainty scale).
_CARD_RECORDS = ("validation", "metrics", "notes", "reproduce")


def model_stamp(path: Path) -> Optional[str]:
    """Digest of a model's weights and of its card's inference entries (:data:`_CARD_RECORDS` left
    out): a card-only change, e.g. ``calibrate_card.py``'s uncertainty scale, invalidates the cache."""
    from .modelfile import read_card

    weights = file_digest(path)
    if weights is None:
        return None
    try:
        card = {k: v for k, v in read_card(path).items() if k not in _CARD_RECORDS}
    except ModelError:
        card = None
    return _hash([weights, card])


def _network_model(name: str, ctx: MethodContext) -> Path:
    """The model file a network method loads: configured, else the shipped one (``dualnet``)."""
    from . import api

    path = _model_path(name, ctx)
    return api.resolve_model_path(path, ctx.modality)


def _check_per_case(ctx: MethodContext) -> Optional[str]:
    """Why per-case fine-tuning cannot run here (None when it can)."""
    try:
        importlib.import_module(f"{__package__}.training.trainer")
    except ImportError as err:
        return f"dualnet.training not importable ({err})"
    base = _base_model_option(ctx)
    if base is not None and not base.exists():
        return f"base model file {base} not found"
    if base is None:
        from . import api

        try:
            api.resolve_model_path(None, ctx.modality)
        except ModelError as err:
            return str(err)
    cfg = _finetune_config_path(ctx)
    if not cfg.is_file():
        return f"fine-tuning config {cfg} not found"
    return None


def finetune_config(ctx: MethodContext):
    """The :class:`~dualnet.training.config.TrainConfig` of per-case fine-tuning.

    ``config`` TOML (default configs/finetune.toml), then ``steps`` (default 150), the case seed,
    the study device and any ``overrides = { batch_size = 4, ... }`` of the method's table.
    """
    from .training.config import TrainConfig

    cfg = TrainConfig.from_toml(_finetune_config_path(ctx))
    changes: Dict[str, Any] = {"steps": int(ctx.options.get("steps", 150)), "seed": int(ctx.seed) % (2**31 - 1),
                               "device": str(ctx.options.get("device", ctx.device))}
    changes.update(dict(ctx.options.get("overrides", {})))
    return cfg.replace(**changes)


def _finetune_inputs(items: List[np.ndarray], spacing_zyx: Tuple[float, ...]) -> List[Tuple[np.ndarray, Tuple[float, ...]]]:
    """Fine-tuning inputs of one case: each (z, y, x) slab as it is; ultrasound (y, x) frames of
    one shape stacked to (n, y, x) (one input, so none is held out for validation)."""
    arrays = [np.asarray(a, dtype=np.float32) for a in items]
    if arrays and arrays[0].ndim == 2:
        sp = (1.0,) + tuple(float(v) for v in spacing_zyx[-2:])
        if len({a.shape for a in arrays}) == 1:
            return [(np.stack(arrays), sp)]
        return [(a[None], sp) for a in arrays]
    return [(a, tuple(float(v) for v in spacing_zyx)) for a in arrays]


def _finetune_case(items: List[np.ndarray], ctx: MethodContext) -> None:
    """``prepare`` of per-case fine-tuning: self-supervised fine-tuning of the base model on the
    case's NOISY items only (no clean data), written to ``ctx.work_dir``; ``run`` then uses it."""
    if not ctx.options.get("per_case"):
        return
    from .training.trainer import finetune

    if ctx.work_dir is None:
        raise InputError("per-case fine-tuning needs a work folder")
    from . import api

    base = api.resolve_model_path(_base_model_option(ctx), ctx.modality)
    out = Path(ctx.work_dir) / "finetuned.safetensors"
    t0 = time.perf_counter()
    finetune(_finetune_inputs(items, ctx.spacing_zyx), base, out, finetune_config(ctx),
             progress=ctx.progress, cancel=ctx.cancel, out_dir=Path(ctx.work_dir) / "run")
    ctx.state["model_path"] = out
    ctx.state["seconds_finetune"] = time.perf_counter() - t0


def _network(name: str, description: Optional[str] = None) -> MethodSpec:
    """A network method: ``model`` option (one file, or one per modality), the shipped model
    for ``dualnet``; with ``per_case = true`` the base model is fine-tuned on each case first."""

    def check(ctx: MethodContext) -> Optional[str]:
        try:
            from . import api
        except ImportError as err:
            return f"dualnet.api not importable ({err})"
        if ctx.options.get("per_case"):
            return _check_per_case(ctx)
        path = _model_path(name, ctx)
        if path is None:
            if name != "dualnet":
                if isinstance(ctx.options.get("model"), dict):
                    return f"no {ctx.modality} model configured ([methods.{name}] model.{ctx.modality})"
                return f"no model file configured ([methods.{name}] model = ...)"
            try:
                api.resolve_model_path(None, ctx.modality)
            except (ModelError, ImportError) as err:
                return str(err)
            return None
        if not path.exists():
            return f"model file {path} not found"
        return None

    def run(arr: np.ndarray, ctx: MethodContext) -> np.ndarray:
        from . import api
        from .io import Volume

        spacing_xyz = tuple(reversed(tuple(ctx.spacing_zyx)))
        model = ctx.state.get("model_path") or _model_path(name, ctx)
        res = api.denoise_volume(
            Volume(np.asarray(arr, dtype=np.float32), spacing_xyz),
            method="dualnet",
            modality=ctx.modality,
            model=model,
            device=ctx.options.get("device", ctx.device),
            seed=ctx.seed,
            progress=ctx.progress,
            cancel=ctx.cancel,
        )
        return res.volume.array

    def stamp(ctx: MethodContext) -> Any:
        if ctx.options.get("per_case"):
            from . import api

            base = api.resolve_model_path(_base_model_option(ctx), ctx.modality)
            stamp = {"base": model_stamp(base), "finetune_config": file_digest(_finetune_config_path(ctx))}
        else:
            try:
                stamp = {"model": model_stamp(_network_model(name, ctx))}  # weights and card
            except ModelError:
                return None
        if name.startswith("dualnet"):  # what its inference computes (orthogonal views, guard, precision)
            from .inference import INFERENCE_VERSION
            from .precision import wants_bf16

            stamp["inference"] = INFERENCE_VERSION
            device = str(ctx.options.get("device", ctx.device) or "auto").lower()
            # on the CPU the host decides (dualnet.precision); a GPU keeps its own autocast
            stamp["bf16"] = wants_bf16("auto") and device in ("auto", "cpu")
        return stamp

    desc = description or {
        "dualnet": "DUAL-NET, shipped model for the modality (or [methods.dualnet] model)",
        "dualnet_ft": "DUAL-NET fine-tuned self-supervised on real scans ([methods.dualnet_ft] model)",
        "dncnn": "DnCNN network baseline ([methods.dncnn] model)",
        "n2v": "Noise2Void network baseline ([methods.n2v] model)",
    }.get(name, f"network `{name}`")
    return MethodSpec(name, run, check, desc, prepare=_finetune_case, stamp=stamp)


def default_registry() -> Dict[str, MethodSpec]:
    """Built-in methods: ``noisy``, the classical baselines and the network methods."""
    reg: Dict[str, MethodSpec] = {
        "noisy": MethodSpec("noisy", _run_noisy, lambda ctx: None, "noisy LR input, no denoising (lower bound)")
    }
    for name in CLASSICAL:
        reg[name] = _classical(name)
    for name in NETWORK:
        reg[name] = _network(name)
    return reg


#: The registry the study resolves method names through; ``register_method`` adds to it.
REGISTRY: Dict[str, MethodSpec] = default_registry()


def register_method(spec: MethodSpec) -> None:
    """Add or replace a method in :data:`REGISTRY`."""
    REGISTRY[spec.name] = spec


def resolve_method(name: str, options: Dict[str, Any]) -> Optional[MethodSpec]:
    """The spec for ``name``, or None.

    ``options`` is the ``[methods.NAME]`` table: ``kind = "network"`` declares a network method
    generically (``model`` = file or per-modality table, e.g. an ablation variant),
    ``kind = "classical"`` a classical baseline (``method`` = the dualnet.baselines name); else
    the registered method ``name`` or the one named by ``base``. ``description`` overrides the
    one-line description; ``per_case = true`` describes per-case fine-tuning.
    """
    kind = options.get("kind")
    base = options.get("base")
    if kind == "network":
        spec: Optional[MethodSpec] = _network(name)
    elif kind == "classical":
        spec = _classical(name)
    elif name in REGISTRY:
        spec = REGISTRY[name]
    elif isinstance(base, str) and base in REGISTRY:
        b = REGISTRY[base]
        spec = MethodSpec(name, b.run, b.check, f"{b.description} as `{name}`", b.prepare, b.stamp)
    else:
        return None
    if options.get("per_case") and not options.get("description"):
        spec = dataclasses.replace(spec, description=(
            f"DUAL-NET fine-tuned self-supervised on each test case's noisy input only ({int(options.get('steps', 150))} "
            "steps from the shipped model of the modality or `base_model`; runtime includes the fine-tuning)"))
    if options.get("description"):
        spec = dataclasses.replace(spec, description=str(options["description"]))
    return spec


# ----------------------------------------------------------------------------- config
def load_config(config_path: Path) -> Dict[str, Any]:
    """Read and validate a study TOML file (``tomllib``; ``tomli`` on Python < 3.11)."""
    try:
        import tomllib  # type: ignore[import-not-found]
    except ModuleNotFoundError:  # pragma: no cover - Python < 3.11
        import tomli as tomllib  # type: ignore[no-redef]

    p = Path(config_path)
    if not p.is_file():
        raise InputError(f"{p}: study config not found")
    try:
        cfg = tomllib.loads(p.read_text(encoding="utf-8"))
    except Exception as err:
        raise InputError(f"{p}: not a valid TOML file ({err})") from None
    study = cfg.setdefault("study", {})
    subsets = cfg.get("subset", [])
    if not subsets:
        raise InputError(f"{p}: no [[subset]] tables")
    if not study.get("methods"):
        raise InputError(f"{p}: [study] methods is empty")
    names = set()
    for s in subsets:
        for key in ("name", "modality", "levels"):
            if key not in s:
                raise InputError(f"{p}: a [[subset]] lacks '{key}'")
        if s["name"] in names:
            raise InputError(f"{p}: subset name {s['name']!r} used twice")
        names.add(s["name"])
        if s["modality"] not in ("mri", "ct", "us"):
            raise InputError(f"{p}: subset {s['name']}: modality must be mri, ct or us")
        if ("image" in s) == ("images" in s):
            raise InputError(f"{p}: subset {s['name']}: give exactly one of 'image' (a volume) or 'images' (a glob of 2D frames)")
    for s in subsets:  # every noise level, up front: a bad one must not stop a long study midway
        for lev in s["levels"]:
            _check_level(s["modality"], lev, f"{p}: subset {s['name']}")
    rob_levels = (cfg.get("robustness") or {}).get("levels") or {}
    for modality, levs in (rob_levels.items() if isinstance(rob_levels, dict) else []):
        for lev in (levs if isinstance(levs, list) else [levs]):
            _check_level(modality, lev, f"{p}: [robustness] levels.{modality}")
    study.setdefault("seeds", [0])
    study.setdefault("alpha", 0.05)
    study.setdefault("focus", ["dualnet"])
    if isinstance(study["focus"], str):
        study["focus"] = [study["focus"]]
    study.setdefault("stats_metrics", ["psnr_fg", "ssim_fg", "dice"])
    study.setdefault("device", "cpu")
    cfg.setdefault("methods", {})
    return cfg


def _check_level(modality: str, level: Any, where: str) -> None:
    """:func:`dualnet.noise.check_level` with ``where`` (config file and table) in the message."""
    from .noise import check_level

    try:
        check_level(modality, level)
    except InputError as err:
        raise InputError(f"{where}: {err}") from None


def find_data_dir(config_path: Path, setting: Optional[str] = None) -> Path:
    """Folder holding the shared scans.

    ``setting`` (or ``[study] data_dir``) relative to the config file; ``"auto"``/None: the
    ``$DUALNET_SHARED_DATA`` variable, else the first ``shared/data`` folder beside a parent of
    the config file (the project checkout's ``../shared/data``).
    """
    import os

    cfg_dir = Path(config_path).resolve().parent
    if setting and setting != "auto":
        p = Path(setting)
        p = p if p.is_absolute() else cfg_dir / p
        if not p.is_dir():
            raise InputError(f"data folder {p} does not exist")
        return p
    env = os.environ.get("DUALNET_SHARED_DATA")
    if env:
        return Path(env)
    for parent in [cfg_dir, *cfg_dir.parents]:
        cand = parent / "shared" / "data"
        if (cand / "README.md").exists():
            return cand
    raise InputError(f"no shared/data folder found above {cfg_dir}; set [study] data_dir or $DUALNET_SHARED_DATA")


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- data
@dataclass
class Case:
    """One statistical unit: a slab of a volume (3D) or a group of ultrasound frames (2D each).

    ``clean`` is a list of arrays: one (z, y, x) slab, or several (y, x) frames; ``labels``
    likewise (or None). ``spacing_zyx`` in mm.
    """

    subset: str
    case_id: str
    clean: List[np.ndarray]
    labels: Optional[List[np.ndarray]]
    roi: Optional[List[np.ndarray]]
    spacing_zyx: Tuple[float, ...]
    source: str


def _crop(arr: np.ndarray, crop: Optional[Sequence[Sequence[int]]]) -> np.ndarray:
    if not crop:
        return arr
    if len(crop) != arr.ndim:
        raise InputError(f"crop {crop} has {len(crop)} ranges for a {arr.ndim}D image of shape {arr.shape}")
    sl = []
    for (a, b), n in zip(crop, arr.shape):
        if not (0 <= a < b <= n):
            raise InputError(f"crop range [{a}, {b}) outside an axis of length {n} (shape {arr.shape})")
        sl.append(slice(int(a), int(b)))
    return arr[tuple(sl)]


def _read(path: Path) -> Tuple[np.ndarray, Tuple[float, ...]]:
    from .io import read_volume

    vol = read_volume(path)
    return vol.array, vol.spacing_zyx


def _labels_3d(spec: Dict[str, Any], data_dir: Path, shape: Tuple[int, ...]) -> Tuple[np.ndarray, np.ndarray]:
    """(label map, ROI) on the full image grid for a 3D subset."""
    from scipy import ndimage

    kind = spec["kind"]
    if kind == "adni_pve":
        wm = _read(data_dir / spec["wm"])[0] > 0.5
        gm = _read(data_dir / spec["gm"])[0] > 0.5
        lab_wm, n = ndimage.label(wm)
        if n > 1:  # the README's artificial sphere outside the brain: keep the largest component
            sizes = np.bincount(lab_wm.ravel())
            sizes[0] = 0
            wm = lab_wm == int(np.argmax(sizes))
        roi = ndimage.binary_dilation(ndimage.binary_fill_holes(wm | gm), iterations=2)
        lab = np.where(wm, 1, np.where(gm, 2, np.where(roi, 3, 0))).astype(np.uint8)
    elif kind == "freesurfer":
        # FreeSurfer aseg: WM = cerebral + cerebellar WM, brainstem; GM = cerebral and cerebellar
        # cortex; "other" (3) = ventricles / CSF. Deep grey nuclei and the rest stay in the ROI
        # but unlabelled (not used to fit).
        fs = _read(data_dir / spec["file"])[0].astype(np.int64)
        wm = np.isin(fs, spec.get("wm", [2, 41, 7, 46, 16, 28, 60]))
        gm = np.isin(fs, spec.get("gm", [3, 42, 8, 47]))
        csf = np.isin(fs, spec.get("csf", [4, 5, 14, 15, 24, 43, 44]))
        roi = fs > 0
        lab = np.where(wm, 1, np.where(gm, 2, np.where(csf, 3, 0))).astype(np.uint8)
    elif kind == "mask":
        files = spec["files"] if isinstance(spec.get("files"), list) else [spec["file"]]
        lab = np.zeros(shape, np.uint8)
        for f in files:
            lab |= (_read(data_dir / f)[0] > 0.5).astype(np.uint8)
        roi = None
    else:
        raise InputError(f"unknown label kind {kind!r} for a volume subset")
    if lab.shape != tuple(shape):
        raise InputError(f"labels of kind {kind} have shape {lab.shape}, image {shape}")
    return lab, roi


def _us_mask(path: Path) -> np.ndarray:
    """usgra-seg colour mask -> labels: red channel = nerve (1), green = vessel (2)."""
    import SimpleITK as sitk

    rgb = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    if rgb.ndim == 2:
        return np.where(rgb > 0, 1, 0).astype(np.uint8)
    lab = np.zeros(rgb.shape[:2], np.uint8)
    lab[rgb[..., 0] > 0] = 1
    lab[rgb[..., 1] > 0] = 2
    return lab


def load_cases(subset: Dict[str, Any], data_dir: Path) -> List[Case]:
    """Split one subset into cases (see the module docstring)."""
    name = subset["name"]
    labels_spec = subset.get("labels")
    cases: List[Case] = []
    if "image" in subset:
        path = data_dir / subset["image"]
        arr, spacing = _read(path)
        if arr.ndim != 3:
            raise InputError(f"{path}: subset {name} needs a 3D volume")
        lab = roi = None
        if labels_spec:
            lab, roi = _labels_3d(labels_spec, data_dir, arr.shape)
        crop = subset.get("crop")
        arr = _crop(arr, crop)
        lab = _crop(lab, crop) if lab is not None else None
        roi = _crop(roi, crop) if roi is not None else None
        slabs = int(subset.get("slabs", 1))
        depth = arr.shape[0] // slabs
        if depth < 1:
            raise InputError(f"subset {name}: {slabs} slabs do not fit in {arr.shape[0]} slices")
        for i in range(slabs):
            sl = slice(i * depth, (i + 1) * depth)
            cases.append(
                Case(
                    name, f"slab{i}", [arr[sl].astype(np.float32)],
                    [lab[sl]] if lab is not None else None,
                    [roi[sl]] if roi is not None else None,
                    tuple(spacing), f"{subset['image']} z {i * depth}:{(i + 1) * depth} of the crop",
                )
            )
        return cases
    files = sorted(glob.glob(str(data_dir / subset["images"])))
    if subset.get("frames"):  # inclusive [first, last] frame numbers (from the file names)
        lo, hi = (int(v) for v in subset["frames"])
        files = [f for f in files if Path(f).stem.isdigit() and lo <= int(Path(f).stem) <= hi]
    if not files:
        raise InputError(f"subset {name}: no files match {data_dir / subset['images']}")
    groups = int(subset.get("groups", 1))
    per = int(subset.get("frames_per_case", 1))
    chunks = np.array_split(np.arange(len(files)), groups)
    masks_dir = data_dir / labels_spec["masks"] if labels_spec else None
    for g, chunk in enumerate(chunks):
        if chunk.size == 0:
            continue
        pick = chunk[np.unique(np.round(np.linspace(0, chunk.size - 1, min(per, chunk.size))).astype(int))]
        clean, labs = [], []
        spacing: Tuple[float, ...] = (1.0, 1.0)
        for idx in pick:
            arr, spacing = _read(Path(files[idx]))
            if arr.ndim != 2:
                raise InputError(f"{files[idx]}: expected a 2D frame")
            clean.append(_crop(arr, subset.get("crop")).astype(np.float32))
            if masks_dir is not None:
                labs.append(_crop(_us_mask(masks_dir / Path(files[idx]).name), subset.get("crop")))
        names = [Path(files[i]).stem for i in pick]
        cases.append(
            Case(name, f"group{g}", clean, labs if masks_dir is not None else None, None, tuple(spacing),
                 f"frames {', '.join(names)} (group {g}: {Path(files[chunk[0]]).stem}..{Path(files[chunk[-1]]).stem})")
        )
    return cases


# ----------------------------------------------------------------------------- per-case work
def case_seed(subset: str, case_id: str, level: float, seed: int) -> int:
    """Deterministic noise seed of one (subset, case, level, seed)."""
    return (zlib.crc32(f"{subset}|{case_id}|{float(level)!r}".encode()) + 1000003 * int(seed)) % (2**31 - 1)


def _data_range(setting: Any, clean_lr: np.ndarray) -> float:
    if setting == "reference":
        dr = float(np.max(clean_lr) - np.min(clean_lr))
        return dr if dr > 0 else 1.0
    return float(setting)


def image_metrics(clean: np.ndarray, test: np.ndarray, modality: str, data_range: float) -> Dict[str, float]:
    """PSNR (dB), SSIM and RMSE over the foreground mask (``_fg``) and the whole image (``_all``)."""
    from . import metrics

    fg = metrics.foreground_mask(clean, modality)
    out = {
        "psnr_fg": metrics.psnr(clean, test, data_range=data_range, mask=fg),
        "psnr_all": metrics.psnr(clean, test, data_range=data_range),
        "rmse_fg": metrics.rmse(clean, test, fg),
        "rmse_all": metrics.rmse(clean, test),
    }
    try:
        out["ssim_fg"] = metrics.ssim(clean, test, data_range=data_range, mask=fg)
        out["ssim_all"] = metrics.ssim(clean, test, data_range=data_range)
    except InputError:  # image smaller than the SSIM window
        out["ssim_fg"] = out["ssim_all"] = float("nan")
    return out


@dataclass
class _Degraded:
    noisy: List[np.ndarray]
    clean: List[np.ndarray]
    spacing_zyx: Tuple[float, ...]
    roi: Optional[List[Optional[np.ndarray]]]
    labels_lr: Optional[List[np.ndarray]] = None
    ref_pred: Optional[List[np.ndarray]] = None


def _degrade_case(case: Case, modality: str, level: float, lr_factor: float, seed: int) -> _Degraded:
    from .segment import resample_labels

    degrade = _load_degrade()
    noisy, clean, rois, labels_lr = [], [], [], []
    spacing: Tuple[float, ...] = case.spacing_zyx
    for i, arr in enumerate(case.clean):
        d = degrade(arr, modality, level, lr_factor=lr_factor, spacing_zyx=case.spacing_zyx,
                    rng=case_seed(case.subset, case.case_id, level, seed) + i)
        noisy.append(np.asarray(d.noisy_lr, dtype=np.float32))
        clean.append(np.asarray(d.clean_lr, dtype=np.float32))
        spacing = tuple(float(s) for s in d.spacing_lr_zyx)
        # the labels and ROI cropped as degrade cropped the scan (to whole LR voxels), then resampled
        factors = getattr(d, "factors", None)  # (a stand-in degrade may not say: no crop then)
        covered = tuple(slice(0, int(n) * int(round(f))) for n, f in zip(clean[-1].shape, factors)) if factors \
            else tuple(slice(None) for _ in clean[-1].shape)
        if case.labels is not None:
            labels_lr.append(resample_labels(case.labels[i][covered], clean[-1].shape))
        if case.roi is not None:
            rois.append(resample_labels(case.roi[i][covered].astype(np.uint8), clean[-1].shape).astype(bool))
        elif modality == "us":
            # The same ROI for every method: the image sector of the clean frame, and when labels
            # exist only the neighbourhood (US_ROI_MARGIN LR pixels) of the labelled structures,
            # so the Dice reflects the structures' boundaries rather than the whole sector.
            from scipy import ndimage

            from .metrics import foreground_mask

            roi = foreground_mask(clean[-1], "us")
            if case.labels is not None:
                near = resample_labels(case.labels[i][covered], clean[-1].shape) > 0
                roi &= ndimage.binary_dilation(near, iterations=US_ROI_MARGIN) if near.any() else near
            rois.append(roi)
    return _Degraded(noisy, clean, spacing, rois if rois else None, labels_lr if labels_lr else None)


def _match_shape(noisy: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
    """Cubic resampling of the noisy input onto the reference grid (only if a degrade keeps HR)."""
    if noisy.shape == tuple(shape):
        return noisy
    from scipy import ndimage

    out = ndimage.zoom(noisy, [t / s for t, s in zip(shape, noisy.shape)], order=3, grid_mode=True, mode="nearest")
    return out[tuple(slice(0, s) for s in shape)]


def _nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values (NaN when none): per-frame metrics of an ultrasound case."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def _center_slice(arr: np.ndarray) -> np.ndarray:
    return np.asarray(arr[arr.shape[0] // 2] if arr.ndim == 3 else arr, dtype=np.float32)


def dice_scores(seg: Any, image: np.ndarray, roi: Optional[np.ndarray], labels_lr: np.ndarray,
                ref_pred: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Downstream Dice of one image ((z, y, x) slab or (y, x) frame) on the LR grid.

    Args:
        seg: the frozen :class:`~dualnet.segment.Segmenter` of the subset.
        image: the method's output (or the clean reference for the ceiling), image units.
        roi: the case's ROI (same for every method), or None.
        labels_lr: the REFERENCE LABELS resampled to the LR grid.
        ref_pred: the segmenter's prediction on the clean LR reference, or None.

    Returns:
        ``dice`` = mean over the target structures present in ``labels_lr`` of the Dice between
        ``seg.predict(image)`` and the reference labels; ``dice_<label>`` per structure (NaN where
        the reference labels lack it: not scored); ``dice_agree`` = the same mean against
        ``ref_pred`` (agreement with the segmentation of the clean image; NaN without it).
    """
    from . import segment
    from .metrics import dice_per_label

    targets = segment.TARGET_LABELS[seg.kind]
    names = segment.LABEL_NAMES[seg.kind]
    pred = seg.predict(image, roi)
    present = [t for t in targets if np.any(labels_lr == t)]
    vs_ref = dice_per_label(pred, labels_lr, labels=targets)
    vals = {f"dice_{names[t]}": (float(vs_ref[t]) if t in present else float("nan")) for t in targets}
    vals["dice"] = float(np.mean([vs_ref[t] for t in present])) if present else float("nan")
    if ref_pred is not None and present:
        agree = dice_per_label(pred, ref_pred, labels=targets)
        vals["dice_agree"] = float(np.mean([agree[t] for t in present]))
    else:
        vals["dice_agree"] = float("nan")
    return vals


# ----------------------------------------------------------------------------- study
@dataclass
class StudyResult:
    """Everything the report needs (produced by :func:`run_study`)."""

    config: Dict[str, Any]
    config_path: Path
    out_dir: Path
    data_dir: Path
    records: List[Dict[str, Any]]
    methods: List[str]
    status: Dict[str, Dict[str, str]]  # status[subset][method] = "ok" | "unavailable: reason"
    descriptions: Dict[str, str]
    segmenters: Dict[str, Dict[str, Any]]
    panels: Dict[str, Dict[str, Any]]
    cases: Dict[str, List[Dict[str, str]]]
    cache_hits: int
    computed: int
    seconds: float
    command: str
    ceilings: Dict[str, List[Dict[str, Any]]] = field(default_factory=dict)  # clean reference Dice per case
    robustness: Optional[Dict[str, Any]] = None
    calibration: Optional[Dict[str, Any]] = None


def _cache_load(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _cache_save(path: Path, data: Dict[str, Any]) -> None:
    from .io import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(data, indent=1, default=float).encode("utf-8"))


#: the modules whose code decides a cached number (inputs, methods, networks, metrics, segmentation);
#: not the report's rendering, so a report can be re-rendered from the cache
_COMPUTING_MODULES = ("api.py", "degrade.py", "estimate.py", "evaluate.py", "inference.py", "io.py", "metrics.py",
                      "modelfile.py", "noise.py", "onnx_backend.py", "orthoviews.py", "precision.py", "presets.py",
                      "segment.py", "sure_guard.py", "view_smoothing.py", "vst.py", "modality.py", "device.py",
                      "baselines/*.py", "models/*.py", "training/*.py")


@functools.lru_cache(maxsize=1)
def code_stamp() -> str:
    """SHA-256 of the source of :data:`_COMPUTING_MODULES`: a cache entry is reused only by the code
    that computed it (``__version__`` has not changed in 35 sessions of changes)."""
    import hashlib

    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for pattern in _COMPUTING_MODULES:
        for f in sorted(root.glob(pattern)):
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def _input_stamp(data_dir: Path, subset: Dict[str, Any]) -> List[Any]:
    """What determines a subset's noisy inputs besides its config: file sizes, noise-model version
    (from version 2 on, so that the entries of a modality whose noise never changed stay valid)."""
    from .noise import NOISE_MODEL_VERSION

    version = NOISE_MODEL_VERSION.get(subset.get("modality"), 1)
    stamp: List[Any] = [["noise_model", version]] if version > 1 else []
    for key in ("image",):
        if key in subset:
            p = data_dir / subset[key]
            stamp.append([subset[key], p.stat().st_size if p.exists() else None])
    if "images" in subset:
        stamp.append([subset["images"], subset.get("frames"), len(glob.glob(str(data_dir / subset["images"])))])
    return stamp


def _stack_items(items: List[np.ndarray]) -> np.ndarray:
    """Slabs concatenated along z, (y, x) frames stacked as (n, y, x)."""
    return np.concatenate([a if a.ndim == 3 else a[None] for a in items], 0)


def _segmenter_and_ceiling(
    s: Dict[str, Any], cases: List[Case], seeds: List[int], subset_hash: str, cache_dir: Path,
    cancel: Optional[CancelToken],
) -> Tuple[Any, List[Dict[str, Any]]]:
    """The subset's frozen segmenter and its Dice on each clean LR reference (the ceiling).

    The segmenter is fitted once per subset on the clean LR references of all its cases (first
    level and seed; the clean LR image does not depend on the level) with the reference labels
    resampled to that grid, then frozen. Both are cached. Returns ``(None, [])`` without labels.
    """
    from . import segment

    kind = _SEGMENTER_FOR_LABELS.get((s.get("labels") or {}).get("kind", ""))
    if not kind or not cases or cases[0].labels is None:
        return None, []
    sname, modality = s["name"], s["modality"]
    lr_factor = float(s.get("lr_factor", 2))
    seg_path = cache_dir / f"segmenter__{sname}__{subset_hash}.json"
    ceil_path = cache_dir / f"ceiling__{sname}__{subset_hash}.json"
    cached, ceil = _cache_load(seg_path), _cache_load(ceil_path)
    if cached is not None and ceil is not None:
        return segment.Segmenter.from_dict(cached), ceil["cases"]
    degraded = []
    for c in cases:
        check_cancel(cancel)
        degraded.append(_degrade_case(c, modality, s["levels"][0], lr_factor, seeds[0]))
    if cached is None:
        xs, ls, rs = [], [], []
        for d in degraded:
            for i, clean_lr in enumerate(d.clean):
                xs.append(clean_lr)
                ls.append(d.labels_lr[i])
                rs.append(d.roi[i] if d.roi is not None else np.ones(clean_lr.shape, bool))
        seg = segment.fit_segmenter(kind, _stack_items(xs), _stack_items(ls), roi=_stack_items(rs))
        _cache_save(seg_path, seg.to_dict())
    else:
        seg = segment.Segmenter.from_dict(cached)
    rows = []
    for c, d in zip(cases, degraded):
        per = [dice_scores(seg, clean, d.roi[i] if d.roi is not None else None, d.labels_lr[i])
               for i, clean in enumerate(d.clean)]
        vals = {k: _nanmean([v[k] for v in per]) for k in per[0] if k != "dice_agree"}
        rows.append({"case": c.case_id, **vals})
    _cache_save(ceil_path, {"cases": rows})
    return seg, rows


def _compute_entry(
    spec: MethodSpec, d: "_Degraded", ctx: MethodContext, seg: Any, modality: str, dr_setting: Any,
    want_panel: bool,
) -> Tuple[List[Dict[str, float]], float, Optional[np.ndarray]]:
    """Run one method on every item of one degraded case and score it.

    Returns ``(per-item metric dicts, seconds, output of the first item if want_panel)``;
    ``seconds`` is the wall-clock time of ``prepare`` (e.g. per-case fine-tuning) plus ``run``.
    """
    import tempfile

    per_item: List[Dict[str, float]] = []
    seconds = 0.0
    panel_out = None
    with tempfile.TemporaryDirectory(prefix="dualnet_eval_") as tmp:
        ctx.work_dir, ctx.state = Path(tmp), {}
        inputs = [_match_shape(noisy, clean.shape) for noisy, clean in zip(d.noisy, d.clean)]
        if spec.prepare is not None:
            t1 = time.perf_counter()
            spec.prepare(inputs, ctx)
            seconds += time.perf_counter() - t1
        for i, (x, clean) in enumerate(zip(inputs, d.clean)):
            check_cancel(ctx.cancel)
            t1 = time.perf_counter()
            out = np.asarray(spec.run(x, ctx), dtype=np.float32)
            seconds += time.perf_counter() - t1
            if out.shape != clean.shape:
                raise InputError(f"{spec.name} returned shape {out.shape}, expected {clean.shape}")
            dr = _data_range(dr_setting, clean)
            vals = image_metrics(clean, out, modality, dr)
            vals["data_range"] = dr
            if seg is not None:
                roi = d.roi[i] if d.roi is not None else None
                vals.update(dice_scores(seg, out, roi, d.labels_lr[i], d.ref_pred[i]))
            per_item.append(vals)
            if i == 0 and want_panel:
                panel_out = out
        if "seconds_finetune" in ctx.state:
            for v in per_item:
                v["seconds_finetune"] = float(ctx.state["seconds_finetune"])
    ctx.work_dir = None
    return per_item, seconds, panel_out


def _method_status(
    cfg: Dict[str, Any], method_names: Sequence[str], modality: str, cfg_dir: Path, device: str,
    descriptions: Dict[str, str],
) -> Tuple[Dict[str, Optional[MethodSpec]], Dict[str, str]]:
    """Resolve each method for one subset: ``(specs, status)`` with "ok" or "unavailable: why"."""
    specs: Dict[str, Optional[MethodSpec]] = {}
    status: Dict[str, str] = {}
    for m in method_names:
        opts = dict(cfg["methods"].get(m, {}))
        spec = resolve_method(m, opts)
        specs[m] = spec
        if spec is None:
            status[m] = "unavailable: unknown method name"
            continue
        descriptions[m] = spec.description
        reason = spec.check(MethodContext(modality, options=opts, config_dir=cfg_dir, device=device))
        status[m] = "ok" if reason is None else f"unavailable: {reason}"
    return specs, status


def _method_key(subset_hash: str, m: str, opts: Dict[str, Any], spec: MethodSpec, ctx: MethodContext) -> str:
    """Cache key of one method on one subset: config, options and the method's stamp."""
    stamp = spec.stamp(ctx) if spec.stamp is not None else None
    return _hash([subset_hash, m, opts] + ([stamp] if stamp is not None else []))


def _sub_progress(progress: Optional[ProgressFn], frac: float, prefix: str) -> Optional[ProgressFn]:
    """Messages of a method's own progress under ``prefix`` at a fixed study fraction."""
    if progress is None:
        return None
    return lambda f, msg: report(progress, frac, f"{prefix}: {msg}")


#: Fractions of the progress bar: main comparison up to 0.85, robustness to 0.92, calibration to 0.96.
_PROGRESS_MAIN, _PROGRESS_ROBUST, _PROGRESS_CALIB = 0.85, 0.92, 0.96


# ----------------------------------------------------------------------------- robustness
#: Noise models foreign to a modality that a robustness condition can apply (``mismatch``).
MISMATCH_NOISES = ("gaussian", "rician", "speckle", "poisson")


@dataclass
class Condition:
    """One robustness condition of a subset.

    Attributes:
        cid: short identifier (file names, tables).
        label: text for the report.
        kind: ``"level"`` (the modality's own noise at ``level``) or ``"mismatch"`` (``noise``
            applied instead, its mean foreground std matched to the modality's noise at ``level``).
        level: noise level in :func:`dualnet.noise.add_noise` units.
        noise: ``"native"`` or one of :data:`MISMATCH_NOISES`.
        in_range: whether ``level`` lies in the model's training range (None for mismatch).
    """

    cid: str
    label: str
    kind: str
    level: float
    noise: str = "native"
    in_range: Optional[bool] = None


def training_range(card: Dict[str, Any], modality: str) -> Tuple[Tuple[float, float], str]:
    """``((low, high), source)``: the noise levels a model was trained on, from its card
    (``noise_levels`` or ``config.levels``), else :data:`dualnet.noise.LEVEL_RANGES`."""
    for src, value in (("model card noise_levels", card.get("noise_levels")),
                       ("model card config.levels", (card.get("config") or {}).get("levels"))):
        if isinstance(value, (list, tuple)) and len(value) == 2:
            return (float(min(value)), float(max(value))), src
    from .noise import LEVEL_RANGES

    return tuple(float(v) for v in LEVEL_RANGES[modality]), "dualnet.noise.LEVEL_RANGES"  # type: ignore[return-value]


def robustness_conditions(subset: Dict[str, Any], rcfg: Dict[str, Any], train: Tuple[float, float]) -> List[Condition]:
    """The subset's first level (the in-range comparison point), each ``levels`` entry of
    ``[robustness]`` for the modality, and each ``mismatch`` noise at the first level's std."""
    modality = subset["modality"]
    base = float(subset["levels"][0])

    def inside(level: float) -> bool:
        return train[0] <= level <= train[1]

    conds = [Condition(f"L{base:g}", f"{modality} noise, level {base:g} (study level)", "level", base,
                       in_range=inside(base))]
    for lev in _per_modality(rcfg.get("levels", {}), modality) or []:
        lev = float(lev)
        if lev != base:
            conds.append(Condition(f"L{lev:g}", f"{modality} noise, level {lev:g}", "level", lev, in_range=inside(lev)))
    for noise in _per_modality(rcfg.get("mismatch", {}), modality) or []:
        if noise not in MISMATCH_NOISES:
            raise InputError(f"[robustness] mismatch noise {noise!r}: use one of {', '.join(MISMATCH_NOISES)}")
        conds.append(Condition(f"{noise}{base:g}", f"{noise} noise, std of level {base:g}", "mismatch", base, noise))
    return conds


def mismatched_noise(clean: np.ndarray, modality: str, noise: str, match_level: float, rng: Any,
                     fg: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Noise of another model applied to a clean LR image, std matched to this modality's noise.

    The target std ``s`` = mean over the foreground ``fg`` of
    :func:`dualnet.noise.noise_std_map` (``clean``, ``modality``, ``match_level``). Noise acts on
    ``u = clean + offset`` (offset 1000 HU for CT, so u >= 0; 0 otherwise):

    * ``gaussian``: ``clean + s N(0, 1)`` (additive, signal-independent);
    * ``rician``: magnitude of ``u`` plus complex Gaussian of std ``c`` per channel
      (:func:`dualnet.noise.add_rician`), ``c`` solved so the mean Rician std over ``fg`` is ``s``;
    * ``speckle``: ``u n``, ``n ~ Gamma(L, 1/L)`` with ``L = (mean_fg(u) / s)^2``
      (:func:`dualnet.noise.add_speckle`);
    * ``poisson``: ``g Poisson(u / g)`` with ``g = (s / mean_fg(sqrt u))^2`` (signal-dependent).

    CT voxels below -1000 HU (``u`` clipped to 0) keep their clean value under the last three, as
    in :func:`dualnet.noise.add_poisson_gaussian`.

    Args:
        clean: clean LR image, (z, y, x) or (y, x), modality units.
        fg: bool foreground mask of ``clean``.

    Returns:
        ``(noisy, true_std)``: float32 arrays of ``clean``'s shape, modality units.
    """
    from . import noise as nz

    g = nz.as_generator(rng)
    x = np.asarray(clean, dtype=np.float64)
    fgm = fg if fg.any() else np.ones(x.shape, bool)
    s = float(np.mean(nz.noise_std_map(x, modality, match_level)[fgm]))
    off = nz.CT_OFFSET_HU if modality == "ct" else 0.0
    u = np.clip(x + off, 0.0, None)
    mu = max(float(np.mean(u[fgm])), 1e-12)
    if noise == "gaussian":
        noisy, std = x + s * g.standard_normal(x.shape), np.full(x.shape, s)
    elif noise == "rician":
        c = s
        for _ in range(20):  # fixed point: the Rician std is below c where the signal is low
            c *= s / max(float(np.mean(nz.rician_std(u[fgm], c))), 1e-12)
        noisy, std = nz.add_rician(u, c, g) - off, nz.rician_std(u, c)
    elif noise == "speckle":
        looks = (mu / max(s, 1e-12)) ** 2
        noisy, std = nz.add_speckle(u, looks, g) - off, u / np.sqrt(looks)
    elif noise == "poisson":
        gain = (s / max(float(np.mean(np.sqrt(u[fgm]))), 1e-12)) ** 2
        noisy, std = gain * g.poisson(u / gain) - off, np.sqrt(gain * u)
    else:
        raise InputError(f"unknown mismatch noise {noise!r}; use one of {', '.join(MISMATCH_NOISES)}")
    if off and noise != "gaussian":  # CT below -1000 HU: noise around the clean value, not -1000
        noisy = noisy + (x + off - u)
    return np.asarray(noisy, np.float32), np.asarray(std, np.float32)


def _condition_inputs(case: Case, subset: Dict[str, Any], cond: Condition, seed: int
                      ) -> Tuple[List[np.ndarray], List[np.ndarray], List[np.ndarray], Tuple[float, ...]]:
    """``(noisy items, clean LR items, true noise std maps, LR spacing (z, y, x))`` of a condition."""
    from .metrics import foreground_mask
    from .noise import noise_std_map

    modality = subset["modality"]
    d = _degrade_case(case, modality, cond.level, float(subset.get("lr_factor", 2)), seed)
    clean = d.clean
    if cond.kind == "level":
        stds = [noise_std_map(c, modality, cond.level) for c in clean]
        return [_match_shape(n, c.shape) for n, c in zip(d.noisy, clean)], clean, stds, d.spacing_zyx
    noisy, stds = [], []
    for i, c in enumerate(clean):
        rng = case_seed(case.subset, case.case_id, cond.level, seed) + zlib.crc32(cond.noise.encode()) + i
        n, sd = mismatched_noise(c, modality, cond.noise, cond.level, rng, foreground_mask(c, modality))
        noisy.append(n)
        stds.append(sd)
    return noisy, clean, stds, d.spacing_zyx


def _mean_fg(a: Optional[np.ndarray], fg: np.ndarray) -> float:
    if a is None:
        return float("nan")
    return float(np.mean(a[fg])) if fg.any() else float(np.mean(a))


def _robust_case(
    case: Case, subset: Dict[str, Any], cond: Condition, seed: int, net: Any, card: Dict[str, Any],
    ref: Optional[MethodSpec], ref_opts: Dict[str, Any], cfg_dir: Path, device: str,
    cancel: Optional[CancelToken],
) -> Dict[str, Any]:
    """PSNR / SSIM (fg) of noisy, DUAL-NET and the reference method on one case under one
    condition, plus DUAL-NET's mean NEB confidence (alpha) and NEB sigma over the foreground and
    the true noise std there (modality units): of the simulated noise, and of all the input's noise
    (with the reference scan's own, :func:`dualnet.estimate.input_noise_std_map`). Frames of an
    ultrasound case are averaged."""
    from .estimate import input_noise_std_map
    from .inference import denoise_array
    from .metrics import foreground_mask

    modality = subset["modality"]
    dr_setting = subset.get("data_range", DEFAULT_DATA_RANGE[modality])
    noisy, clean, stds, spacing = _condition_inputs(case, subset, cond, seed)
    per: List[Dict[str, float]] = []
    for x, c, sd in zip(noisy, clean, stds):
        check_cancel(cancel)
        fg = foreground_mask(c, modality)
        dr = _data_range(dr_setting, c)
        vals: Dict[str, float] = {}
        m = image_metrics(c, x, modality, dr)
        vals.update(psnr_noisy=m["psnr_fg"], ssim_noisy=m["ssim_fg"])
        t1 = time.perf_counter()
        res = denoise_array(x, net, card, device=device, seed=int(seed), cancel=cancel)
        vals["seconds_dualnet"] = time.perf_counter() - t1
        m = image_metrics(c, res.denoised, modality, dr)
        vals.update(psnr_dualnet=m["psnr_fg"], ssim_dualnet=m["ssim_fg"],
                    alpha_fg=_mean_fg(res.alpha_map, fg), sigma_fg=_mean_fg(res.sigma_map, fg),
                    true_std_fg=_mean_fg(sd, fg),
                    total_std_fg=_mean_fg(input_noise_std_map(sd, c, modality), fg))
        if ref is not None:
            ctx = MethodContext(modality, spacing, cond.level, int(seed), ref_opts, cfg_dir, device, None, cancel)
            t1 = time.perf_counter()
            out = np.asarray(ref.run(x, ctx), dtype=np.float32)
            vals["seconds_reference"] = time.perf_counter() - t1
            m = image_metrics(c, out, modality, dr)
            vals.update(psnr_reference=m["psnr_fg"], ssim_reference=m["ssim_fg"])
        per.append(vals)
    return {k: _nanmean([v[k] for v in per]) for k in per[0]}


def run_robustness(
    cfg: Dict[str, Any], cfg_dir: Path, all_cases: Dict[str, List[Case]], seeds: List[int], cache_dir: Path,
    device: str, data_dir: Path, progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
) -> Dict[str, Any]:
    """The ``[robustness]`` part of a study (levels outside the training range, mis-specified noise).

    For the first ``cases`` cases of each subset (``subsets``, default all) and each
    :func:`robustness_conditions` entry: DUAL-NET with the shipped model of the modality (or
    ``model``), its NEB maps from the same tiling pass, and the classical ``reference`` of the
    modality (default BM4D for MRI / CT, BM3D for US). One cached JSON per (case, condition).

    Returns:
        ``{"rows": [...], "subsets": {name: {model, train_range, range_source, reference,
        reference_status}}}``.
    """
    from . import api, modelfile

    rcfg = cfg["robustness"]
    n_cases = int(rcfg.get("cases", 2))
    names = rcfg.get("subsets") or [s["name"] for s in cfg["subset"]]
    refs = {"mri": "bm4d", "ct": "bm4d", "us": "bm3d", **dict(rcfg.get("reference", {}))}
    rows: List[Dict[str, Any]] = []
    info: Dict[str, Any] = {}
    subsets = [s for s in cfg["subset"] if s["name"] in names]
    todo = sum(min(n_cases, len(all_cases[s["name"]])) for s in subsets)
    done = 0
    for s in subsets:
        sname, modality = s["name"], s["modality"]
        ctx0 = MethodContext(modality, options=dict(rcfg), config_dir=cfg_dir, device=device)
        try:
            model_path = api.resolve_model_path(_model_path("dualnet", ctx0), modality)
        except ModelError as err:
            info[sname] = {"error": str(err)}
            continue
        net, card = modelfile.load_model(model_path, device="cpu")
        train, src = training_range(card, modality)
        ref_name = refs.get(modality)
        ref_opts = dict(cfg["methods"].get(ref_name, {})) if ref_name else {}
        ref = resolve_method(ref_name, ref_opts) if ref_name else None
        reason = "not configured" if ref is None else ref.check(
            MethodContext(modality, options=ref_opts, config_dir=cfg_dir, device=device))
        if reason is not None:
            ref = None
        info[sname] = {"model": str(model_path), "train_range": list(train), "range_source": src,
                       "reference": ref_name, "reference_status": "ok" if reason is None else f"unavailable: {reason}"}
        conds = robustness_conditions(s, rcfg, train)
        shash = _hash([CACHE_VERSION, __version__, code_stamp(), s, _input_stamp(data_dir, s), model_stamp(model_path),
                       ref_name if ref else None, ref_opts, seeds[0]])
        for case in all_cases[sname][:n_cases]:
            report(progress, _PROGRESS_MAIN + (_PROGRESS_ROBUST - _PROGRESS_MAIN) * done / max(todo, 1),
                   f"robustness: {sname} {case.case_id}")
            done += 1
            for cond in conds:
                check_cancel(cancel)
                cpath = cache_dir / f"robust__{sname}__{case.case_id}__{cond.cid}__{_hash([shash, dataclasses.asdict(cond)])}.json"
                entry = _cache_load(cpath)
                if entry is None:
                    vals = _robust_case(case, s, cond, seeds[0], net, card, ref, ref_opts, cfg_dir, device, cancel)
                    entry = {"subset": sname, "modality": modality, "case": case.case_id, **dataclasses.asdict(cond),
                             "reference": ref_name if ref else None, **vals}
                    _cache_save(cpath, entry)
                rows.append(entry)
    return {"rows": rows, "subsets": info}


# ----------------------------------------------------------------------------- uncertainty calibration
#: A decile is "calibrated" when its RMSE / mean predicted std lies within [1/F, F].
CALIBRATION_FACTOR = 1.5
#: Most voxels per case kept for the correlation / calibration (an even stride beyond).
CALIBRATION_MAX_VOXELS = 500_000


def calibration_summary(std: np.ndarray, err: np.ndarray, bins: int = 10) -> Dict[str, Any]:
    """How well a predicted per-voxel std tracks the actual error.

    Args:
        std: predicted standard deviation per voxel (image units), 1D.
        err: signed error ``output - clean`` of the same voxels (image units), 1D.
        bins: number of quantile bins of ``std`` (10 = deciles).

    Returns:
        ``pearson`` / ``spearman`` correlation of ``std`` with ``|err|`` (NaN when ``std`` is
        constant), ``bins`` (per bin: ``mean_std``, ``rmse`` = sqrt(mean err^2), ``n``), ``ratio``
        per bin = rmse / mean_std, ``median_ratio``, ``calibrated`` (every bin within
        :data:`CALIBRATION_FACTOR`), ``rmse`` and ``rms_std`` overall, ``n`` voxels.
    """
    from scipy import stats as sps

    std = np.asarray(std, np.float64).ravel()
    err = np.asarray(err, np.float64).ravel()
    ae = np.abs(err)
    varies = std.size > 2 and np.ptp(std) > 0 and np.ptp(ae) > 0
    pearson = float(sps.pearsonr(std, ae)[0]) if varies else float("nan")
    spearman = float(sps.spearmanr(std, ae)[0]) if varies else float("nan")
    edges = np.unique(np.quantile(std, np.linspace(0, 1, bins + 1))) if std.size else np.array([0.0])
    idx = np.clip(np.searchsorted(edges, std, side="right") - 1, 0, max(len(edges) - 2, 0))
    out_bins = []
    for b in range(max(len(edges) - 1, 1)):
        sel = idx == b
        if sel.any():
            out_bins.append({"mean_std": float(std[sel].mean()), "rmse": float(np.sqrt(np.mean(err[sel] ** 2))),
                             "n": int(sel.sum())})
    ratios = [b["rmse"] / b["mean_std"] if b["mean_std"] > 0 else float("inf") for b in out_bins]
    calibrated = bool(ratios) and all(1.0 / CALIBRATION_FACTOR <= r <= CALIBRATION_FACTOR for r in ratios)
    return {"pearson": pearson, "spearman": spearman, "bins": out_bins, "ratio": ratios,
            "median_ratio": float(np.median(ratios)) if ratios else float("nan"), "calibrated": calibrated,
            "rmse": float(np.sqrt(np.mean(err ** 2))) if err.size else float("nan"),
            "rms_std": float(np.sqrt(np.mean(std ** 2))) if std.size else float("nan"), "n": int(std.size)}


def _calibration_case(case: Case, subset: Dict[str, Any], seed: int, model: Optional[Path], mc_samples: int,
                      device: str, cancel: Optional[CancelToken]) -> Tuple[np.ndarray, np.ndarray, float]:
    """(MC-dropout std, signed error) over the foreground of one case (all frames), seconds."""
    from . import api
    from .io import Volume
    from .metrics import foreground_mask

    modality = subset["modality"]
    d = _degrade_case(case, modality, float(subset["levels"][0]), float(subset.get("lr_factor", 2)), seed)
    stds, errs = [], []
    t0 = time.perf_counter()
    for noisy, clean in zip(d.noisy, d.clean):
        check_cancel(cancel)
        x = _match_shape(noisy, clean.shape)
        res = api.denoise_volume(Volume(x, tuple(reversed(d.spacing_zyx))), method="dualnet", modality=modality,
                                 model=model, device=device, uncertainty=True, mc_samples=mc_samples,
                                 seed=case_seed(case.subset, case.case_id, subset["levels"][0], seed), cancel=cancel)
        fg = foreground_mask(clean, modality)
        stds.append(np.asarray(res.uncertainty.array, np.float32)[fg])
        errs.append((np.asarray(res.volume.array, np.float32) - clean)[fg])
    std, err = np.concatenate(stds), np.concatenate(errs)
    step = max(1, int(np.ceil(std.size / CALIBRATION_MAX_VOXELS)))
    return std[::step], err[::step], time.perf_counter() - t0


def run_calibration(
    cfg: Dict[str, Any], cfg_dir: Path, all_cases: Dict[str, List[Case]], seeds: List[int], cache_dir: Path,
    device: str, data_dir: Path, progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
) -> Dict[str, Any]:
    """The ``[uncertainty]`` part of a study: does DUAL-NET's MC-dropout std track its error?

    For the first ``cases`` cases of each subset (``subsets``, default all) at the subset's first
    level and seed: ``api.denoise_volume(..., uncertainty=True, mc_samples)`` with the model of
    ``[methods.dualnet]`` (default the shipped one); the foreground voxels' std and error are
    cached per case (npz) and pooled per subset by :func:`calibration_summary`.

    Returns:
        ``{"subsets": {name: {summary..., "cases": [{case, pearson, spearman, n}], "model"}},
        "mc_samples": n, "errors": {name: reason}}``.
    """
    from . import api

    ucfg = cfg["uncertainty"]
    n_cases = int(ucfg.get("cases", 2))
    mc = int(ucfg.get("mc_samples", 8))
    bins = int(ucfg.get("bins", 10))
    names = ucfg.get("subsets") or [s["name"] for s in cfg["subset"]]
    out: Dict[str, Any] = {"subsets": {}, "mc_samples": mc, "bins": bins, "errors": {}}
    subsets = [s for s in cfg["subset"] if s["name"] in names]
    todo = sum(min(n_cases, len(all_cases[s["name"]])) for s in subsets)
    done = 0
    for s in subsets:
        sname, modality = s["name"], s["modality"]
        ctx0 = MethodContext(modality, options=dict(cfg["methods"].get("dualnet", {})), config_dir=cfg_dir, device=device)
        try:
            model = api.resolve_model_path(_model_path("dualnet", ctx0), modality)
        except ModelError as err:
            out["errors"][sname] = str(err)
            continue
        shash = _hash([CACHE_VERSION, __version__, code_stamp(), s, _input_stamp(data_dir, s), model_stamp(model), mc,
                       seeds[0]])
        stds, errs, per_case = [], [], []
        for case in all_cases[sname][:n_cases]:
            check_cancel(cancel)
            report(progress, _PROGRESS_ROBUST + (_PROGRESS_CALIB - _PROGRESS_ROBUST) * done / max(todo, 1),
                   f"uncertainty: {sname} {case.case_id}")
            done += 1
            cpath = cache_dir / f"calib__{sname}__{case.case_id}__{shash}.npz"
            if cpath.exists():
                with np.load(cpath) as z:
                    std, err, sec = z["std"], z["err"], float(z["seconds"])
            else:
                std, err, sec = _calibration_case(case, s, seeds[0], model, mc, device, cancel)
                tmp = cpath.with_name(cpath.stem + ".tmp.npz")
                np.savez_compressed(tmp, std=std, err=err, seconds=sec)
                tmp.replace(cpath)
            c = calibration_summary(std, err, bins)
            per_case.append({"case": case.case_id, "pearson": c["pearson"], "spearman": c["spearman"],
                             "n": c["n"], "seconds": sec})
            stds.append(std)
            errs.append(err)
        if not stds:
            continue
        summ = calibration_summary(np.concatenate(stds), np.concatenate(errs), bins)
        out["subsets"][sname] = {**summ, "cases": per_case, "model": str(model), "modality": modality,
                                 "level": float(s["levels"][0])}
    return out


def run_study(
    config_path: Path,
    out_dir: Path,
    *,
    data_dir: Optional[Path] = None,
    methods: Optional[Sequence[str]] = None,
    command: Optional[str] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
) -> Path:
    """Run (or resume) a study and write its report.

    Args:
        config_path: study TOML file.
        out_dir: output folder (created); ``cache/`` inside holds per-case results, so a second
            call with the same config recomputes nothing.
        data_dir: folder of the shared scans (default: ``[study] data_dir`` or found beside the
            checkout, see :func:`find_data_dir`).
        methods: override ``[study] methods``.
        command: the command line to print in the report (default ``sys.argv``).
        progress: ``progress(fraction, message)``.
        cancel: checked between cases; on cancel, finished cases stay cached.

    Returns:
        Path of ``report.md`` (``report.html``, CSV files and PNG figures beside it).
    """
    from .report import write_report

    t0 = time.perf_counter()
    config_path = Path(config_path)
    cfg = load_config(config_path)
    study = cfg["study"]
    data_dir = Path(data_dir) if data_dir else find_data_dir(config_path, study.get("data_dir"))
    out_dir = Path(out_dir)
    cache_dir = out_dir / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    method_names = list(methods) if methods else list(study["methods"])
    unknown = [m for m in (methods or ()) if resolve_method(m, dict(cfg["methods"].get(m, {}))) is None]
    if unknown:  # a misspelt override, refused before any work (the config's own list reports it per subset)
        raise InputError(f"unknown method(s) {', '.join(map(repr, unknown))}: use the names of [methods.*] in "
                         f"{config_path.name} or {', '.join(study['methods'])}")
    seeds = [int(s) for s in study["seeds"]]
    cfg_dir = config_path.resolve().parent

    report(progress, 0.0, "loading data")
    subsets = cfg["subset"]
    all_cases: Dict[str, List[Case]] = {}
    for s in subsets:
        check_cancel(cancel)
        all_cases[s["name"]] = load_cases(s, data_dir)
    total = sum(len(all_cases[s["name"]]) * len(s["levels"]) for s in subsets) * len(seeds) * len(method_names)
    done = 0

    records: List[Dict[str, Any]] = []
    status: Dict[str, Dict[str, str]] = {}
    descriptions: Dict[str, str] = {}
    segmenters: Dict[str, Dict[str, Any]] = {}
    ceilings: Dict[str, List[Dict[str, Any]]] = {}
    panels: Dict[str, Dict[str, Any]] = {}
    case_info: Dict[str, List[Dict[str, str]]] = {}
    hits = computed = 0

    for s in subsets:
        sname, modality = s["name"], s["modality"]
        cases = all_cases[sname]
        case_info[sname] = [{"case": c.case_id, "source": c.source} for c in cases]
        lr_factor = float(s.get("lr_factor", 2))
        dr_setting = s.get("data_range", DEFAULT_DATA_RANGE[modality])
        subset_hash = _hash([CACHE_VERSION, __version__, code_stamp(), s, seeds, _input_stamp(data_dir, s)])
        specs, status[sname] = _method_status(cfg, method_names, modality, cfg_dir, study["device"], descriptions)

        degraded_memo: Dict[Tuple[float, str, int], _Degraded] = {}

        def get_degraded(level: float, case: Case, seed: int) -> _Degraded:
            key = (level, case.case_id, seed)
            if key not in degraded_memo:
                degraded_memo.clear()  # keep memory bounded: one case at a time
                degraded_memo[key] = _degrade_case(case, modality, level, lr_factor, seed)
            return degraded_memo[key]

        seg, ceiling = _segmenter_and_ceiling(s, cases, seeds, subset_hash, cache_dir, cancel)
        if seg is not None:
            from . import segment

            ceilings[sname] = ceiling
            segmenters[sname] = {**seg.to_dict(), "targets": list(segment.TARGET_LABELS[seg.kind]),
                                 "names": segment.LABEL_NAMES[seg.kind]}

        for level in s["levels"]:
            for ci, case in enumerate(cases):
                for seed in seeds:
                    for m in method_names:
                        check_cancel(cancel)
                        frac = _PROGRESS_MAIN * done / max(total, 1)
                        report(progress, frac, f"{sname} {case.case_id} level {level} seed {seed}: {m}")
                        done += 1
                        if not status[sname][m].startswith("ok"):
                            continue
                        opts = dict(cfg["methods"].get(m, {}))
                        ctx = MethodContext(modality, case.spacing_zyx, float(level),
                                            case_seed(sname, case.case_id, level, seed), opts, cfg_dir,
                                            study["device"],
                                            _sub_progress(progress, frac, f"{sname} {case.case_id} {m}")
                                            if opts.get("per_case") else None, cancel)
                        mkey = _method_key(subset_hash, m, opts, specs[m], ctx)
                        cpath = cache_dir / f"{sname}__{case.case_id}__L{level}__s{seed}__{m}__{mkey}.json"
                        want_panel = ci == 0 and seed == seeds[0] and level == s["levels"][0]
                        entry = _cache_load(cpath)
                        if entry is None:
                            d = get_degraded(level, case, seed)
                            if seg is not None and d.ref_pred is None:
                                d.ref_pred = [seg.predict(c, r) for c, r in
                                              zip(d.clean, d.roi if d.roi is not None else [None] * len(d.clean))]
                            ctx.spacing_zyx = d.spacing_zyx
                            try:
                                per_item, seconds, panel_out = _compute_entry(
                                    specs[m], d, ctx, seg, modality, dr_setting, want_panel)
                            except (CancelledError, KeyboardInterrupt, MemoryError):
                                raise
                            except Exception as err:  # a method that fails is reported, not fatal
                                status[sname][m] = f"unavailable: failed on {case.case_id} at level {level} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                                # its cases of this level before the failure go too (a mean over fewer cases
                                # than the other methods' would sit in the same table), and its panel
                                records[:] = [r for r in records if not (r["subset"] == sname and r["method"] == m
                                                                          and r["level"] == float(level))]
                                panels.get(sname, {}).pop(m, None)
                                continue
                            keys = per_item[0].keys()
                            entry = {
                                "subset": sname, "modality": modality, "case": case.case_id, "level": float(level),
                                "seed": seed, "method": m, "n_items": len(per_item), "seconds": seconds,
                                "metrics": {k: _nanmean([v[k] for v in per_item]) for k in keys},
                                "spacing_lr_zyx": list(d.spacing_zyx), "shape_lr": list(d.clean[0].shape),
                                "key": mkey, "cache_version": CACHE_VERSION,
                            }
                            if panel_out is not None:
                                ppath = cache_dir / f"panel__{sname}__{m}__{mkey}.npz"
                                np.savez_compressed(ppath, out=_center_slice(panel_out),
                                                    noisy=_center_slice(d.noisy[0]), clean=_center_slice(d.clean[0]))
                                entry["panel"] = ppath.name
                            _cache_save(cpath, entry)
                            computed += 1
                        else:
                            hits += 1
                        if entry.get("panel"):
                            panels.setdefault(sname, {})[m] = str(cache_dir / entry["panel"])
                        rec = {k: entry[k] for k in ("subset", "modality", "case", "level", "seed", "method", "n_items", "seconds")}
                        rec.update(entry["metrics"])
                        records.append(rec)

    common = dict(cfg=cfg, cfg_dir=cfg_dir, all_cases=all_cases, seeds=seeds, cache_dir=cache_dir,
                  device=study["device"], data_dir=data_dir, progress=progress, cancel=cancel)
    robustness = run_robustness(**common) if cfg.get("robustness") else None
    calibration = run_calibration(**common) if cfg.get("uncertainty") else None

    report(progress, 0.97, "writing report")
    result = StudyResult(
        cfg, config_path, out_dir, data_dir, records, method_names, status, descriptions, segmenters, panels,
        case_info, hits, computed, time.perf_counter() - t0,
        command if command is not None else " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        ceilings, robustness, calibration,
    )
    path = write_report(result)
    report(progress, 1.0, "done")
    return path


# ----------------------------------------------------------------------------- CLI
def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``evaluate`` to the ``dualnet`` sub-command parser."""
    p = subparsers.add_parser(
        "evaluate",
        help="run a comparison study (metrics, downstream Dice, paired statistics, report)",
        description="Degrade real scans, denoise them with every configured method, compare with the clean "
        "low-resolution reference and write report.md / report.html, CSV tables and figures to --out. "
        "Per-case results are cached in OUT/cache, so an interrupted study resumes.",
    )
    p.add_argument("--config", required=True, help="study TOML file (e.g. DualNetDenoise/dualnet/configs/study_ci.toml)")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--data-dir", help="folder of the shared scans (default: ../shared/data beside the checkout)")
    p.add_argument("--methods", help="comma-separated methods overriding the config's list")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    p.add_argument("--progress-json", action="store_true", help="print 'DUALNET_PROGRESS {json}' lines")
    p.set_defaults(func=evaluate_main)
    return p


def evaluate_main(args: argparse.Namespace) -> int:
    """Run ``dualnet evaluate``; returns the exit code (0). Errors propagate as DualNetError."""
    load_config(Path(args.config))  # fail on a bad config before any progress output
    printer: Any = None
    try:
        from .cli import ProgressPrinter, _progress_mode

        printer = ProgressPrinter("evaluate", _progress_mode(args))
    except Exception:  # pragma: no cover - cli not importable
        printer = None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if getattr(args, "methods", None) else None
    import shlex

    command = "dualnet " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if "evaluate" in sys.argv[1:] else None
    try:
        path = run_study(Path(args.config), Path(args.out), data_dir=Path(args.data_dir) if args.data_dir else None,
                         methods=methods, command=command,
                         progress=printer if printer is not None and getattr(printer, "mode", "") != "none" else None)
    finally:
        if printer is not None and hasattr(printer, "close"):
            printer.close()
    if not getattr(args, "quiet", False):
        print(f"report written to {path}")
    return 0
