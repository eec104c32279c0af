"""Study runner: ``dualnet evaluate --config study.toml --out DIR``.

A study degrades real clean scans (``../shared/data``) to low-resolution noisy acquisitions with
:func:`dualnet.degrade.degrade`, denoises them with every configured method and compares each
output with the CLEAN LOW-RESOLUTION reference on the same grid (the comparison is made at the
low resolution: ``clean_lr`` versus ``method(noisy_lr)``; no method is asked to upsample).

Per case it records PSNR / SSIM / RMSE over the foreground mask and over the whole image (with
the data range stated in the report), downstream Dice of a frozen classical segmenter
(:mod:`dualnet.segment`) against the same segmenter applied to the clean reference, and the
method's wall-clock runtime. Results are cached as one JSON file per (case, level, seed, method)
under ``OUT/cache``, keyed by a hash of everything that determines them, so an interrupted study
resumes where it stopped. :mod:`dualnet.report` then writes CSV tables, paired statistics with
the CASE as the unit (Holm-corrected), box plots, image panels and ``report.md`` / ``report.html``.

Config (TOML) outline -- see ``configs/study.toml``::

    [study]
    name = "..."; seeds = [0]; methods = ["noisy", "gaussian", ...]; focus = ["dualnet", "nlm"]
    alpha = 0.05; stats_metrics = ["psnr_fg", "ssim_fg", "dice"]; device = "cpu"
    data_dir = "auto"            # or a folder, relative to the config file
    [methods.dualnet_ft]         # per-method options; `base` reuses a registered method
    base = "dualnet"; model = "path/to/model.safetensors"
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
CACHE_VERSION = "1"

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


@dataclass
class MethodSpec:
    """A method of the study.

    Attributes:
        name: registry name.
        run: ``run(noisy_lr, ctx) -> denoised`` (float array, same shape, same units).
        check: ``check(ctx) -> None`` when usable, else a one-line reason (e.g. "bm4d not
            installed"); the report lists the method as "unavailable: reason".
        description: one line for the report.
    """

    name: str
    run: Callable[[np.ndarray, MethodContext], np.ndarray]
    check: Callable[[MethodContext], Optional[str]] = lambda ctx: None
    description: str = ""


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


def _model_path(name: str, ctx: MethodContext) -> Optional[Path]:
    model = ctx.options.get("model")
    if isinstance(model, dict):  # one model per modality: model = { mri = "...", ct = "...", us = "..." }
        model = model.get(ctx.modality)
    if model:
        p = Path(model)
        return p if p.is_absolute() else (ctx.config_dir / p)
    return None


def _network(name: str) -> MethodSpec:
    def check(ctx: MethodContext) -> Optional[str]:
        try:
            from . import api
        except ImportError as err:
            return f"dualnet.api not importable ({err})"
        path = _model_path(name, ctx)
        if path is None:
            if name != "dualnet":
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
        res = api.denoise_volume(
            Volume(np.asarray(arr, dtype=np.float32), spacing_xyz),
            method="dualnet",
            modality=ctx.modality,
            model=_model_path(name, ctx),
            device=ctx.options.get("device", ctx.device),
            seed=ctx.seed,
            progress=ctx.progress,
            cancel=ctx.cancel,
        )
        return res.volume.array

    desc = {
        "dualnet": "DUAL-NET, shipped model for the modality (or [methods.dualnet] model)",
        "dualnet_ft": "DUAL-NET fine-tuned self-supervised on real scans ([methods.dualnet_ft] model)",
        "dncnn": "DnCNN network baseline ([methods.dncnn] model)",
        "n2v": "Noise2Void network baseline ([methods.n2v] model)",
    }.get(name, f"network `{name}`")
    return MethodSpec(name, run, check, desc)


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
    """The spec for ``name`` (directly, or through ``options['base']``), or None."""
    if name in REGISTRY:
        return REGISTRY[name]
    base = options.get("base")
    if base in REGISTRY:
        spec = REGISTRY[base]
        return MethodSpec(name, spec.run, spec.check, f"{spec.description} as `{name}`")
    return None


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
    study.setdefault("seeds", [0])
    study.setdefault("alpha", 0.05)
    study.setdefault("focus", ["dualnet"])
    if isinstance(study["focus"], str):
        study["focus"] = [study["focus"]]
    study.setdefault("stats_metrics", ["psnr_fg", "ssim_fg", "dice"])
    study.setdefault("device", "cpu")
    cfg.setdefault("methods", {})
    return cfg


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
    return (zlib.crc32(f"{subset}|{case_id}|{level!r}".encode()) + 1000003 * int(seed)) % (2**31 - 1)


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
        if case.labels is not None:
            labels_lr.append(resample_labels(case.labels[i], clean[-1].shape))
        if case.roi is not None:
            rois.append(resample_labels(case.roi[i].astype(np.uint8), clean[-1].shape).astype(bool))
        elif modality == "us":
            # The same ROI for every method: the image sector of the clean frame, and when labels
            # exist only the neighbourhood (US_ROI_MARGIN LR pixels) of the labelled structures,
            # so the Dice reflects the structures' boundaries rather than the whole sector.
            from scipy import ndimage

            from .metrics import foreground_mask

            roi = foreground_mask(clean[-1], "us")
            if case.labels is not None:
                near = resample_labels(case.labels[i], clean[-1].shape) > 0
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


def _cache_load(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _cache_save(path: Path, data: Dict[str, Any]) -> None:
    from .io import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(data, indent=1, default=float).encode("utf-8"))


def _file_stamp(data_dir: Path, subset: Dict[str, Any]) -> List[Any]:
    stamp = []
    for key in ("image",):
        if key in subset:
            p = data_dir / subset[key]
            stamp.append([subset[key], p.stat().st_size if p.exists() else None])
    if "images" in subset:
        stamp.append([subset["images"], subset.get("frames"), len(glob.glob(str(data_dir / subset["images"])))])
    return stamp


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
    from . import segment
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
    panels: Dict[str, Dict[str, Any]] = {}
    case_info: Dict[str, List[Dict[str, str]]] = {}
    hits = computed = 0

    for s in subsets:
        sname, modality = s["name"], s["modality"]
        cases = all_cases[sname]
        case_info[sname] = [{"case": c.case_id, "source": c.source} for c in cases]
        lr_factor = float(s.get("lr_factor", 2))
        dr_setting = s.get("data_range", DEFAULT_DATA_RANGE[modality])
        subset_hash = _hash([CACHE_VERSION, __version__, s, seeds, _file_stamp(data_dir, s)])
        status[sname] = {}
        specs: Dict[str, Optional[MethodSpec]] = {}
        for m in method_names:
            opts = dict(cfg["methods"].get(m, {}))
            spec = resolve_method(m, opts)
            specs[m] = spec
            if spec is None:
                status[sname][m] = "unavailable: unknown method name"
                continue
            descriptions[m] = spec.description
            reason = spec.check(MethodContext(modality, options=opts, config_dir=cfg_dir, device=study["device"]))
            status[sname][m] = "ok" if reason is None else f"unavailable: {reason}"

        degraded_memo: Dict[Tuple[float, str, int], _Degraded] = {}

        def get_degraded(level: float, case: Case, seed: int) -> _Degraded:
            key = (level, case.case_id, seed)
            if key not in degraded_memo:
                degraded_memo.clear()  # keep memory bounded: one case at a time
                degraded_memo[key] = _degrade_case(case, modality, level, lr_factor, seed)
            return degraded_memo[key]

        # Frozen downstream segmenter: fitted once per subset on the clean LR references of all
        # its cases (first level and seed) with the reference labels resampled to that grid.
        seg = None
        kind = _SEGMENTER_FOR_LABELS.get((s.get("labels") or {}).get("kind", ""))
        if kind and cases[0].labels is not None:
            seg_path = cache_dir / f"segmenter__{sname}__{subset_hash}.json"
            cached = _cache_load(seg_path)
            if cached is not None:
                seg = segment.Segmenter.from_dict(cached)
            else:
                xs, ls, rs = [], [], []
                for c in cases:
                    check_cancel(cancel)
                    d = _degrade_case(c, modality, s["levels"][0], lr_factor, seeds[0])
                    for i, (clean_lr, lab) in enumerate(zip(d.clean, c.labels)):
                        xs.append(clean_lr)
                        ls.append(segment.resample_labels(lab, clean_lr.shape))
                        rs.append(d.roi[i] if d.roi is not None else np.ones(clean_lr.shape, bool))

                def stack(items: List[np.ndarray]) -> np.ndarray:  # slabs along z, frames as (n, y, x)
                    return np.concatenate([a if a.ndim == 3 else a[None] for a in items], 0)

                seg = segment.fit_segmenter(kind, stack(xs), stack(ls), roi=stack(rs))
                _cache_save(seg_path, seg.to_dict())
            segmenters[sname] = {**seg.to_dict(), "targets": list(segment.TARGET_LABELS[kind]),
                                 "names": segment.LABEL_NAMES[kind]}

        for level in s["levels"]:
            for ci, case in enumerate(cases):
                for seed in seeds:
                    for m in method_names:
                        check_cancel(cancel)
                        frac = done / max(total, 1)
                        report(progress, frac, f"{sname} {case.case_id} level {level} seed {seed}: {m}")
                        done += 1
                        if not status[sname][m].startswith("ok"):
                            continue
                        opts = dict(cfg["methods"].get(m, {}))
                        mkey = _hash([subset_hash, m, opts])
                        cpath = cache_dir / f"{sname}__{case.case_id}__L{level}__s{seed}__{m}__{mkey}.json"
                        want_panel = ci == 0 and seed == seeds[0] and level == s["levels"][0]
                        entry = _cache_load(cpath)
                        if entry is None:
                            d = get_degraded(level, case, seed)
                            if seg is not None and d.ref_pred is None:
                                d.ref_pred = [seg.predict(c, r) for c, r in
                                              zip(d.clean, d.roi if d.roi is not None else [None] * len(d.clean))]
                            ctx = MethodContext(modality, d.spacing_zyx, float(level),
                                                case_seed(sname, case.case_id, level, seed), opts, cfg_dir,
                                                study["device"], None, cancel)
                            per_item: List[Dict[str, float]] = []
                            seconds = 0.0
                            panel_out = None
                            try:
                                for i, (noisy, clean) in enumerate(zip(d.noisy, d.clean)):
                                    check_cancel(cancel)
                                    x = _match_shape(noisy, clean.shape)
                                    t1 = time.perf_counter()
                                    out = np.asarray(specs[m].run(x, ctx), dtype=np.float32)
                                    seconds += time.perf_counter() - t1
                                    if out.shape != clean.shape:
                                        raise InputError(f"{m} returned shape {out.shape}, expected {clean.shape}")
                                    dr = _data_range(dr_setting, clean)
                                    vals = image_metrics(clean, out, modality, dr)
                                    vals["data_range"] = dr
                                    if seg is not None:
                                        roi = d.roi[i] if d.roi is not None else None
                                        from .metrics import dice_per_label

                                        targets = segment.TARGET_LABELS[seg.kind]
                                        dl = dice_per_label(seg.predict(out, roi), d.ref_pred[i], labels=targets)
                                        names = segment.LABEL_NAMES[seg.kind]
                                        present = d.labels_lr[i] if d.labels_lr is not None else None
                                        for t in targets:
                                            # scored only where the reference labels contain the structure
                                            absent = present is not None and not np.any(present == t)
                                            vals[f"dice_{names[t]}"] = float("nan") if absent else dl[t]
                                        scored = [vals[f"dice_{names[t]}"] for t in targets]
                                        scored = [v for v in scored if np.isfinite(v)]
                                        vals["dice"] = float(np.mean(scored)) if scored else float("nan")
                                    per_item.append(vals)
                                    if i == 0 and want_panel:
                                        panel_out = out
                            except (CancelledError, KeyboardInterrupt, MemoryError):
                                raise
                            except Exception as err:  # a method that fails is reported, not fatal
                                status[sname][m] = f"unavailable: failed on {case.case_id} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
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

    report(progress, 0.97, "writing report")
    result = StudyResult(
        cfg, config_path, out_dir, data_dir, records, method_names, status, descriptions, segmenters, panels,
        case_info, hits, computed, time.perf_counter() - t0,
        command if command is not None else " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
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
    p.add_argument("--config", required=True, help="study TOML file (e.g. dualnet/configs/study_ci.toml)")
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
