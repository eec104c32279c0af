"""Training data: clean sources, intensity normalisation, on-the-fly degradation, patches.

Arrays are numpy in (z, y, x) order for volumes and (y, x) for 2D images; batches handed to the
network are float32 (N, C, [D,] H, W) with C = 1.

Normalisation (defined ONCE here, recorded in the model card under ``"normalisation"`` in the
format of :mod:`dualnet.modelfile`, and inverted exactly by :func:`denormalise`): an affine map
``y = (x - low) / (high - low)`` with

* CT: ``{"method": "hu_window", "hu_low": -1000, "hu_high": 1000}`` (fixed HU scaling: air -> 0,
  water -> 0.5, no clipping);
* US: ``{"method": "fixed", "low": 0, "high": 255}`` (8-bit B-mode grey levels -> 0..1);
* MRI: ``{"method": "percentile", "p_low": 0.5, "p_high": 99.5}``: ``low``/``high`` are those
  percentiles of the image (robust percentile scaling). At inference they are taken from the
  noisy input; training jitters the scale by ``intensity_jitter`` so the network does not depend
  on the exact estimate.

Training pairs are made per mini-batch: a clean high-resolution crop is augmented (flips,
90-degree rotations, light elastic deformation), degraded with :func:`dualnet.degrade.degrade`
at a random level in the modality's range (noisy LR + clean LR + clean HR), and the simulated
per-voxel noise standard deviation (:func:`dualnet.noise.noise_std_map`) is returned for NEB
calibration. Every batch is a deterministic function of ``(seed, rank, step)``, so training
resumed from a checkpoint sees exactly the batches an uninterrupted run would have seen,
whatever the number of data workers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import InputError

ArrayLike = Union[np.ndarray, "Volume"]  # noqa: F821

#: Normalised intensity above which a voxel counts as foreground when sampling patches.
FOREGROUND_THRESHOLD = 0.05


# ---------------------------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------------------------
def normalisation_spec(modality: str) -> Dict[str, Any]:
    """The normalisation recipe of ``modality`` as stored in the model card (modelfile format)."""
    if modality == "ct":
        return {"method": "hu_window", "hu_low": -1000.0, "hu_high": 1000.0}
    if modality == "us":
        return {"method": "fixed", "low": 0.0, "high": 255.0}
    if modality == "mri":
        return {"method": "percentile", "p_low": 0.5, "p_high": 99.5}
    raise InputError(f"unknown modality {modality!r}; choose mri, ct or us")


def normalisation_params(array: np.ndarray, spec: Dict[str, Any]) -> Tuple[float, float]:
    """``(offset, scale)`` such that ``y = (x + offset) / scale`` implements ``spec`` on ``array``.

    Delegates to :func:`dualnet.inference.normalise` (the one definition used at inference), so
    training and inference normalise identically: ``percentile`` offset = -P(p_low), scale =
    P(p_high) - P(p_low); ``hu_window`` / ``fixed`` offset = -low, scale = high - low.
    """
    from ..inference import normalise as _inf_normalise

    a = np.asarray(array)
    if spec.get("method") == "percentile" and a.size > 4_000_000:  # percentiles of a large volume: subsample
        a = a.ravel()[:: int(a.size // 2_000_000)]
    _, p = _inf_normalise(a, spec)
    return -float(p["offset"]), float(p["scale"])


def normalise(array: np.ndarray, spec: Dict[str, Any], params: Optional[Tuple[float, float]] = None
              ) -> Tuple[np.ndarray, Tuple[float, float]]:
    """``(y, (offset, scale))`` with ``y = (x + offset) / scale`` as float32."""
    offset, scale = params if params is not None else normalisation_params(array, spec)
    return ((np.asarray(array, dtype=np.float32) + offset) / scale).astype(np.float32), (offset, scale)


def denormalise(y: np.ndarray, params: Tuple[float, float]) -> np.ndarray:
    """Exact inverse of :func:`normalise`: ``x = y * scale - offset``."""
    offset, scale = params
    return np.asarray(y, dtype=np.float32) * scale - offset


# ---------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------
@dataclass
class CleanImage:
    """One clean training / validation image in physical units.

    Attributes:
        array: float32, (z, y, x) or (y, x).
        spacing_zyx: voxel size in mm, array order.
        name: where it came from (path or ``array[i]``).
        params: normalisation ``(offset, scale)`` computed on this image.
        peak: max |x| of the image (MRI noise level reference).
    """

    array: np.ndarray
    spacing_zyx: Tuple[float, ...]
    name: str
    params: Tuple[float, float] = (0.0, 1.0)
    peak: float = 1.0
    source: Dict[str, Any] = field(default_factory=dict)
    #: noisy data only (SURE fine-tuning): noise variance ``c0 + c1 s + c2 s^2`` in physical
    #: units^2 as a function of the signal ``s`` in physical units (see :func:`noise_variance_model`)
    noise_var: Optional[Tuple[float, float, float]] = None


def _plane_anisotropy(spacing_zyx: List[float], axis: int) -> float:
    """Ratio of the larger to the smaller voxel size (mm) in the plane of a slice cut along ``axis``."""
    plane = [float(s) for i, s in enumerate(spacing_zyx) if i != axis]
    return max(plane) / max(min(plane), 1e-9)


_FRAME_RE = re.compile(r"(\d+)(?=\.[A-Za-z]+$)")
_LEADING_RE = re.compile(r"^(\d+)_")  # e.g. HC18's "010_2HC.png": frame 10


def _frame_number(path: Path) -> Optional[int]:
    m = _FRAME_RE.search(path.name) or _LEADING_RE.search(path.name)
    return int(m.group(1)) if m else None


def _crop(arr: np.ndarray, crop: Optional[Sequence[int]], name: str) -> np.ndarray:
    if not crop:
        return arr
    if len(crop) != 2 * arr.ndim:
        raise InputError(f"{name}: crop needs {2 * arr.ndim} numbers for a {arr.ndim}D image, got {list(crop)}")
    sl = tuple(slice(int(crop[2 * i]), int(crop[2 * i + 1])) for i in range(arr.ndim))
    out = arr[sl]
    if out.size == 0:
        raise InputError(f"{name}: crop {list(crop)} is empty for shape {arr.shape}")
    return out


def resolve_path(path: Union[str, Path], data_dir: Optional[Union[str, Path]]) -> Path:
    """``path`` itself when absolute or existing, else ``data_dir / path``."""
    p = Path(path).expanduser()
    if p.is_absolute() or data_dir is None:
        return p
    cand = Path(data_dir) / p
    return cand if cand.exists() or not p.exists() else p


def read_source(path: Union[str, Path], *, frame: Optional[int] = None, crop: Optional[Sequence[int]] = None,
                frames: Optional[Sequence[int]] = None, brain_mask: Optional[Sequence[Union[str, Path]]] = None,
                coarsen: Optional[Sequence[int]] = None) -> List[Tuple[np.ndarray, Tuple[float, ...], str]]:
    """Read one source into ``[(array float32, spacing_zyx, name), ...]``.

    A folder of PNG/JPG/TIFF frames gives one 2D image per frame (restricted to frame numbers in
    ``frames = [first, last]`` inclusive); any other folder is read as a DICOM series.
    ``brain_mask``: tissue probability map files of a 3D scan, on its grid; the scan is returned
    skull-stripped (:mod:`dualnet.training.skull_strip`, applied before ``crop``) and its name
    gets ``" (skull-stripped)"``. ``coarsen``: integer factors (z, y, x) by which each image is
    then block-averaged (:func:`dualnet.degrade.downsample`), its spacing multiplied and its name
    suffixed ``" (coarsened AxBxC)"``.
    """
    if coarsen:
        return [_coarsened(a, sp, name, coarsen)
                for a, sp, name in read_source(path, frame=frame, crop=crop, frames=frames, brain_mask=brain_mask)]
    from ..io import read_volume

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: training data not found (set data_dir / --data-dir / DUALNET_SHARED_DATA)")
    out = []
    if p.suffix == ".npz":  # packed clean images (scripts/pack_lr_data.py): image_<i>, spacing_<i>
        if brain_mask:
            raise InputError(f"{p}: brain_mask needs a 3D scan, not packed images")
        with np.load(p, allow_pickle=False) as z:
            keys = sorted((k for k in z.files if k.startswith("image_")), key=lambda k: int(k.split("_")[1]))
            for k in keys:
                a = _crop(np.asarray(z[k], dtype=np.float32), crop, str(p))
                out.append((a, tuple(float(v) for v in z["spacing_" + k.split("_")[1]]), f"{p.name}:{k}"))
        return out
    if p.is_dir():
        imgs = sorted(q for q in p.iterdir() if q.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"))
        if imgs:
            if brain_mask:
                raise InputError(f"{p}: brain_mask needs a 3D scan, not a folder of frames")
            if frames:
                lo, hi = int(frames[0]), int(frames[-1])
                imgs = [q for q in imgs if (n := _frame_number(q)) is not None and lo <= n <= hi]
            if not imgs:
                raise InputError(f"{p}: no image frames in range {list(frames or [])}")
            for q in imgs:
                v = read_volume(q)
                a = _crop(np.asarray(v.array, dtype=np.float32), crop, str(q))
                out.append((a, tuple(v.spacing_zyx), str(q)))
            return out
    v = read_volume(p, frame=frame)
    a = np.asarray(v.array, dtype=np.float32)
    name = str(p)
    if brain_mask:
        a, name = _skull_stripped(a, brain_mask, name), f"{p} (skull-stripped)"
    return [(_crop(a, crop, str(p)), tuple(v.spacing_zyx), name)]


def read_data_source(src: Any, data_dir: Optional[Union[str, Path]]) -> List[Tuple[np.ndarray, Tuple[float, ...], str]]:
    """:func:`read_source` of one config ``[[data]]`` entry (a ``DataSource``), its paths resolved
    against ``data_dir``."""
    masks = [resolve_path(m, data_dir) for m in src.brain_mask] if src.brain_mask else None
    return read_source(resolve_path(src.path, data_dir), frame=src.frame, crop=src.crop, frames=src.frames,
                       brain_mask=masks, coarsen=src.coarsen)


def _coarsened(arr: np.ndarray, spacing_zyx: Sequence[float], name: str, factors: Sequence[int]
               ) -> Tuple[np.ndarray, Tuple[float, ...], str]:
    from ..degrade import downsample

    f = tuple(int(v) for v in factors)
    if arr.ndim == 2 and len(f) == 3:  # a (z, y, x) setting on a 2D image: its (y, x)
        f = f[1:]
    if len(f) != arr.ndim:
        raise InputError(f"{name}: coarsen needs {arr.ndim} factors for a {arr.ndim}D image, got {list(factors)}")
    lr, _ = downsample(arr, f)
    return lr, tuple(float(s) * k for s, k in zip(spacing_zyx, f)), f"{name} (coarsened {'x'.join(map(str, f))})"


def _skull_stripped(arr: np.ndarray, maps: Sequence[Union[str, Path]], name: str) -> np.ndarray:
    """``arr`` (a 3D scan) with everything outside the brain of its tissue map files set to 0."""
    from ..io import read_volume
    from .skull_strip import brain_mask_from_maps, strip

    if arr.ndim != 3:
        raise InputError(f"{name}: brain_mask needs a 3D scan, got shape {arr.shape}")
    for m in maps:
        if not Path(m).exists():
            raise InputError(f"{m}: training data not found (set data_dir / --data-dir / DUALNET_SHARED_DATA)")
    mask = brain_mask_from_maps([np.asarray(read_volume(Path(m)).array, dtype=np.float32) for m in maps])
    return strip(arr, mask, name)


def _as_images(data: Any) -> List[Tuple[np.ndarray, Tuple[float, ...], str]]:
    """Arrays handed over in memory: arrays, ``(array, spacing_zyx)`` pairs or Volumes."""
    from ..io import Volume

    if isinstance(data, (np.ndarray, Volume)) or (isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], np.ndarray)):
        data = [data]
    items = []
    for i, d in enumerate(data):
        if isinstance(d, Volume):
            arr, sp = d.array, d.spacing_zyx
        elif isinstance(d, tuple):
            arr, sp = d
        elif isinstance(d, (str, Path)):
            items.extend(read_source(d))
            continue
        else:
            arr, sp = d, None
        arr = np.asarray(arr, dtype=np.float32)
        if arr.ndim not in (2, 3):
            raise InputError(f"array[{i}]: expected a 2D or 3D array, got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise InputError(f"array[{i}]: contains NaN or Inf")
        sp = tuple(float(s) for s in sp) if sp is not None else (1.0,) * arr.ndim
        items.append((arr, sp, f"array[{i}]"))
    return items


def make_image(arr: np.ndarray, spacing_zyx: Sequence[float], name: str, modality: str,
               source: Optional[Dict[str, Any]] = None) -> CleanImage:
    """Wrap an array with its normalisation parameters and peak."""
    a = np.ascontiguousarray(arr, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] == 1:  # a single-slice volume is a 2D image
        a, spacing_zyx = a[0], tuple(spacing_zyx)[1:]
    params = normalisation_params(a, normalisation_spec(modality))
    return CleanImage(a, tuple(float(s) for s in spacing_zyx), name, params,
                      float(np.max(np.abs(a))) if a.size else 1.0, dict(source or {}))


def load_split(config: "TrainConfig", data: Any = None, data_dir: Optional[Union[str, Path]] = None  # noqa: F821
               ) -> Tuple[List[CleanImage], List[CleanImage]]:
    """Clean images for training and validation, split per source FILE (never per slice).

    ``data`` (arrays / ``(array, spacing_zyx)`` / Volumes / paths handed over by the caller)
    replaces ``config.data``. Without an explicit ``split = "val"`` source, the files listed last
    (in the order given; a file listed several times, e.g. with ``coarsen`` copies, counts once and all
    its entries go to the same side) are held out, ``val_fraction`` of the distinct files and at least
    one when there are two or more; with a single file the validation set is drawn from that same file
    (flagged in the source info).
    """
    train: List[CleanImage] = []
    val: List[CleanImage] = []
    if data is not None:
        raw = _as_images(data)
        groups = [("train", [r], 1.0) for r in raw]
        keys = [str(i) for i in range(len(groups))]
    else:
        if not config.data:
            raise InputError("training config has no data sources ([[data]] path = ...)")
        groups = []
        for src in config.data:
            groups.append((src.split, read_data_source(src, data_dir), float(src.weight)))
        keys = [str(src.path) for src in config.data]
    has_val = any(g[0] == "val" for g in groups)
    distinct = list(dict.fromkeys(keys))  # files in the order first listed
    if not has_val and len(distinct) >= 2:
        n_val = max(1, int(round(len(distinct) * config.val_fraction)))
        held = set(distinct[len(distinct) - n_val:])
        groups = [("val" if k in held else "train", g, w) for k, (_, g, w) in zip(keys, groups)]
    floor = config.modality == "mri" and getattr(config, "clean_floor", "keep") == "remove"
    for split, items, weight in groups:
        for arr, sp, name in items:
            info: Dict[str, Any] = {"split": split, "weight": weight}
            if floor:
                arr, info["rician_floor_sigma"] = remove_rician_floor(arr)
            img = make_image(arr, sp, name, config.modality, info)
            (val if split == "val" else train).append(img)
    if not train:
        raise InputError("no training images (all sources are marked split = 'val')")
    if not val:  # a single case: validate on the same case (different crops / noise)
        val = [CleanImage(t.array, t.spacing_zyx, t.name, t.params, t.peak, {"split": "val (same case as train)"})
               for t in train]
    return train, val


def remove_rician_floor(arr: np.ndarray) -> Tuple[np.ndarray, float]:
    """A magnitude MRI scan without its own acquisition noise floor, and that floor's sigma.

    ``sqrt(max(m^2 - 2 sigma0^2, 0))`` (the second-moment Rician correction, Gudbjartsson &
    Patz 1995) with ``sigma0`` estimated from the scan (:func:`noise_variance_model`): the
    background, pure Rayleigh noise of mean ``1.25 sigma0``, drops towards the true signal 0
    (mean ``0.46 sigma0``); tissue (m >> sigma0) moves by ``sigma0^2 / m`` only.
    """
    a = np.asarray(arr, dtype=np.float32)
    coef, _ = noise_variance_model(a, "mri")
    s2 = max(float(coef[0]), 0.0)
    if s2 <= 0:
        return a, 0.0
    return np.sqrt(np.maximum(a * a - 2.0 * s2, 0.0)).astype(np.float32), float(np.sqrt(s2))


def noise_variance_model(array: np.ndarray, modality: str, sigma: Optional[float] = None
                         ) -> Tuple[Tuple[float, float, float], Dict[str, Any]]:
    """Per-voxel noise variance of a NOISY image as a polynomial of its signal: given, or from the data.

    Returns ``((c0, c1, c2), info)`` with ``var(s) = c0 + c1 s + c2 s^2`` in physical units^2
    (``s`` in physical units: MRI a.u., CT HU, US grey level):

    * MRI: Rician ~ Gaussian above the noise floor: ``c0 = sigma^2``.
    * CT: Poisson-Gaussian on ``HU + 1000``: ``var = gain (s + 1000) + sigma_e^2``.
    * US: multiplicative speckle with ``L`` looks: ``var = s^2 / L``.

    Args:
        sigma: the noise level when it is known, in the units of ``dualnet estimate``'s ``sigma`` (and of
            ``--sigma`` for every method): MRI the Rician sigma (image units); CT the noise std at
            water, HU (the image's own fit still gives the shape, scaled to it by
            :func:`dualnet.estimate.scale_ct_noise_to_water`); US the relative speckle std
            ``1 / sqrt(L)``. None: all from :func:`dualnet.estimate.estimate_noise` on the whole image.
    """
    from ..estimate import check_sigma, ct_dose, estimate_noise, scale_ct_noise_to_water

    modality = str(modality).lower()
    given = None if sigma is None else check_sigma(sigma, modality, np.asarray(array))
    if given is not None and modality == "mri":
        return variance_coef("mri", sigma=given), {"modality": "mri", "sigma": given, "method": "given"}
    if given is not None and modality == "us":
        looks = 1.0 / (given * given)
        return variance_coef("us", looks=looks), {"modality": "us", "sigma": given, "level": looks, "looks": looks,
                                                  "method": "given"}
    try:
        est = estimate_noise(np.asarray(array, dtype=np.float32), modality)
    except InputError as err:
        if given is None or modality != "ct":
            raise
        # CT too small to fit a shape: the given std at water, as white noise
        return (given * given, 0.0, 0.0), {"modality": "ct", "sigma": given, "gain": 0.0, "electronic_sigma": given,
                                           "level": None, "method": f"given std at water, white (no fit: {err})"}
    info: Dict[str, Any] = {"modality": est.modality, "level": float(est.level), "sigma": float(est.sigma),
                            "method": est.method, **{k: float(v) for k, v in est.params.items()}}
    gain = float(est.params.get("gain", 0.0))
    electronic = float(est.params.get("electronic_sigma", est.sigma))
    if est.modality == "ct" and given is not None:
        gain, electronic = scale_ct_noise_to_water(gain, electronic, given)
        info.update(sigma=given, gain=gain, electronic_sigma=electronic, level=ct_dose(gain),
                    estimated_sigma=float(est.sigma), estimated_gain=info.get("gain", 0.0),
                    estimated_electronic_sigma=info.get("electronic_sigma", float(est.sigma)),
                    method=f"given std at water, shape from {est.method}")
    if not np.isfinite(info["level"]):  # CT with no signal dependence (no dose), an MRI with no peak: None (strict JSON)
        info["level"] = None
    if est.modality == "ct" and gain <= 0:  # no signal dependence found
        return (electronic ** 2, 0.0, 0.0), info
    return variance_coef(est.modality, sigma=float(est.sigma), gain=gain, electronic_sigma=electronic,
                         looks=max(float(est.level), 1e-3)), info


def variance_coef(modality: str, *, sigma: float = 0.0, gain: float = 0.0, electronic_sigma: float = 0.0,
                  looks: float = 1.0) -> Tuple[float, float, float]:
    """The noise variance polynomial ``(c0, c1, c2)`` (physical units) of a modality's noise model
    from its parameters: MRI ``sigma^2``; CT ``gain (s + 1000) + electronic_sigma^2`` (HU);
    US ``s^2 / looks``."""
    from ..noise import CT_OFFSET_HU

    if modality == "mri":
        return (sigma ** 2, 0.0, 0.0)
    if modality == "ct":
        return (gain * CT_OFFSET_HU + electronic_sigma ** 2, gain, 0.0)
    return (0.0, 0.0, 1.0 / looks)


def variance_map(noisy_n: np.ndarray, coef: Tuple[float, float, float], params: Tuple[float, float],
                 smooth: float = 1.0) -> np.ndarray:
    """Noise variance per voxel in NORMALISED units^2 for a normalised noisy patch.

    The signal is a Gaussian-smoothed copy of the noisy patch (``smooth`` voxels), mapped back to
    physical units with the image's normalisation ``params = (offset, scale)`` (see
    :func:`variance_at`).
    """
    from scipy.ndimage import gaussian_filter

    offset, scale = params
    c0, c1, c2 = coef
    if c1 == 0 and c2 == 0:  # signal-independent (MRI): no smoothing needed
        var = np.full(np.shape(noisy_n), c0, dtype=np.float32)
    else:
        var = variance_at(gaussian_filter(np.asarray(noisy_n, dtype=np.float32), smooth) * scale - offset, coef)
    return (var / np.float32(scale * scale)).astype(np.float32)


def variance_at(signal: np.ndarray, coef: Tuple[float, float, float]) -> np.ndarray:
    """The noise variance polynomial ``c0 + c1 s + c2 s^2`` at ``signal`` (physical units), float32.

    The linear term is CT's Poisson term, which counts from -1000 HU (zero counts): below it (air
    down to -1024 HU, fill values) the variance is the electronic term ``c0 - 1000 c1``, as
    :func:`dualnet.noise.noise_std_map` has it. Clipped at 0.
    """
    from ..noise import CT_OFFSET_HU

    c0, c1, c2 = (float(c) for c in coef)
    s = np.asarray(signal, dtype=np.float32)
    lin = c1 * np.maximum(s, np.float32(-CT_OFFSET_HU)) if c1 != 0 else 0.0
    return np.maximum(c0 + lin + c2 * np.square(s), 0.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# augmentation and masking
# ---------------------------------------------------------------------------------------------
def elastic(arr: np.ndarray, alpha: float, rng: np.random.Generator, grid: int = 4) -> np.ndarray:
    """Light elastic deformation: smooth random displacement of amplitude ``alpha`` voxels.

    A coarse ``grid``-per-axis random displacement field is upsampled (cubic) to the image
    size and applied with linear interpolation (reflecting borders). ``arr``: (z,y,x) or (y,x).
    """
    from scipy import ndimage

    shape = arr.shape
    coords = list(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    for ax in range(arr.ndim):
        coarse = rng.standard_normal([grid] * arr.ndim).astype(np.float32) * alpha
        zoom = [s / grid for s in shape]
        d = ndimage.zoom(coarse, zoom, order=3, mode="nearest")[tuple(slice(0, s) for s in shape)]
        coords[ax] += d
    return ndimage.map_coordinates(arr, coords, order=1, mode="reflect").astype(np.float32)


def n2v_mask(x: np.ndarray, ratio: float, radius: int, rng: np.random.Generator
             ) -> Tuple[np.ndarray, np.ndarray]:
    """Noise2Void / Noise2Self masking of one image.

    Exactly ``round(ratio * x.size)`` voxels (at least 1) are chosen without replacement and each
    is replaced by the ORIGINAL value of a random neighbour at an offset in
    ``[-radius, radius]`` per axis, never the voxel itself (clipped at the borders, where the
    offset is redrawn toward the inside).

    Args:
        x: image, (z, y, x) or (y, x) (any spatial dims).
        ratio: fraction of voxels to mask, in (0, 1).
        radius: neighbourhood radius in voxels (>= 1).

    Returns:
        ``(masked, mask)``: the masked copy (float32) and a float32 0/1 mask of the masked voxels.
    """
    x = np.asarray(x, dtype=np.float32)
    n = x.size
    k = int(min(n, max(1, round(ratio * n))))
    idx = rng.choice(n, size=k, replace=False)
    pos = np.stack(np.unravel_index(idx, x.shape), axis=1)  # (k, ndim)
    r = max(1, int(radius))
    off = rng.integers(-r, r + 1, size=pos.shape)
    zero = np.all(off == 0, axis=1)
    while zero.any():  # never the voxel itself
        off[zero] = rng.integers(-r, r + 1, size=(int(zero.sum()), x.ndim))
        zero = np.all(off == 0, axis=1)
    src = pos + off
    shape = np.array(x.shape)
    # reflect out-of-range neighbours to the other side (still != the voxel for size > 1)
    src = np.where(src < 0, pos - off, src)
    src = np.where(src >= shape, pos - off, src)
    src = np.clip(src, 0, shape - 1)
    masked = x.copy()
    masked[tuple(pos.T)] = x[tuple(src.T)]
    mask = np.zeros(x.shape, dtype=np.float32)
    mask[tuple(pos.T)] = 1.0
    return masked, mask


def _augment(arr: np.ndarray, cfg: "TrainConfig", rng: np.random.Generator, spatial_dims: int) -> np.ndarray:  # noqa: F821
    """Flips on every axis, 90-degree rotation in the (y, x) plane, optional elastic."""
    if cfg.augment_flip:
        for ax in range(arr.ndim):
            if rng.random() < 0.5:
                arr = np.flip(arr, axis=ax)
    if cfg.augment_rot90 and arr.shape[-1] == arr.shape[-2]:
        arr = np.rot90(arr, k=int(rng.integers(4)), axes=(arr.ndim - 2, arr.ndim - 1))
    arr = np.ascontiguousarray(arr)
    if cfg.elastic_prob > 0 and rng.random() < cfg.elastic_prob:
        arr = elastic(arr, cfg.elastic_alpha, rng)
    return arr


# ---------------------------------------------------------------------------------------------
# patch sampling
# ---------------------------------------------------------------------------------------------
def level_range(cfg: "TrainConfig") -> Tuple[float, float]:  # noqa: F821
    """``cfg.levels`` or the modality's ``noise.LEVEL_RANGES``."""
    if cfg.levels:
        return float(cfg.levels[0]), float(cfg.levels[1])
    from ..noise import LEVEL_RANGES

    lo, hi = LEVEL_RANGES[cfg.modality]
    return float(lo), float(hi)


def _pad_to(arr: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    pads = [(0, max(0, int(s) - a)) for a, s in zip(arr.shape, shape)]
    if any(p[1] for p in pads):
        arr = np.pad(arr, pads, mode="reflect" if all(a > 1 for a in arr.shape) else "edge")
    return arr


class PatchSampler:
    """Deterministic mini-batch generator.

    ``batch(step)`` returns a dict of float32 arrays (N, 1, [D,] H, W):

    * supervised (``selfsup=False``): ``noisy`` (normalised noisy LR), ``clean`` (clean LR),
      ``std`` (simulated noise std, normalised units), ``hr`` (clean HR, only if ``cfg.sr``),
      ``level`` (N,) noise levels;
    * self-supervised (``selfsup=True``, the images ARE the noisy data): ``noisy``;
    * with masking (``masked=True``): ``input`` (masked copy of ``noisy``) and ``mask``.

    Randomness comes only from ``np.random.default_rng([seed, rank, step])``. ``min_foreground``
    overrides ``cfg.min_foreground`` (the validation set's ``cfg.val_min_foreground``).
    """

    def __init__(self, images: List[CleanImage], cfg: "TrainConfig", *, rank: int = 0,  # noqa: F821
                 selfsup: bool = False, masked: bool = False, seed: Optional[int] = None,
                 min_foreground: Optional[float] = None) -> None:
        if not images:
            raise InputError("no images to sample patches from")
        self.images = images
        self.cfg = cfg
        self.rank = int(rank)
        self.selfsup = selfsup
        self.masked = masked
        self.min_foreground = float(cfg.min_foreground if min_foreground is None else min_foreground)
        self.seed = cfg.seed if seed is None else int(seed)
        self.levels = level_range(cfg) if not selfsup else (0.0, 0.0)
        self.spec = normalisation_spec(cfg.modality)
        self.lr_factor = 1 if selfsup else int(cfg.lr_factor)
        self.context = int(cfg.context)
        self.use_slab = bool(cfg.dim == 2 and not cfg.sr and
                             (self.context > 1 or (not selfsup and cfg.slab_degrade)))
        self._slab_axis: Optional[int] = None
        # sampling weights: number of voxels (2D images from 3D volumes count their slices) times
        # the source's ``weight``
        w = np.array([float(im.array.size) * float(im.source.get("weight", 1.0)) for im in images])
        self.weights = w / w.sum()

    # -- geometry ------------------------------------------------------------------------------
    def _hr_shape(self, ndim: int, patch: Optional[int] = None) -> Tuple[int, ...]:
        p = int(patch or self.cfg.patch_size)
        if ndim == 2:
            return (p * self.lr_factor,) * 2
        an = list(self.cfg.anisotropy) + [1.0] * 3
        return tuple(int(round(p * self.lr_factor * (an[i] if not self.selfsup else 1.0))) for i in range(3))

    def _slice_axis(self, img: CleanImage, rng: np.random.Generator) -> int:
        """A random axis of ``cfg.slice_axes`` to cut ``img`` along (a 3D image), skipping the axes
        whose slices have in-plane voxel sizes further apart than ``cfg.slice_max_anisotropy``
        (the first axis of ``slice_axes`` when none qualifies)."""
        axes = list(self.cfg.slice_axes)
        limit = float(self.cfg.slice_max_anisotropy)
        if limit > 0:
            sp = list(img.spacing_zyx)[-3:]
            ok = [a for a in axes if _plane_anisotropy(sp, a) <= limit]
            axes = ok or axes[:1]
        return int(axes[int(rng.integers(len(axes)))])

    def _slab(self, img: CleanImage, rng: np.random.Generator, patch: Optional[int]) -> Tuple[np.ndarray, int, np.ndarray]:
        """2D model on a 3D image: a slab around a random slice, so that the 3D degradation
        (blur + down-sampling along every axis, as in a real LR volume) can be simulated and a
        2.5D model gets its adjacent slices. Thickness in LR slices: 3 for ``context = 1``,
        ``context + 2`` for a 2.5D model (one spare slice each side for the blur), ``context``
        in self-supervised sampling (the noisy data itself, nothing simulated). Returns
        ``(slab, slice axis, middle HR slice for the foreground test)``."""
        cfg = self.cfg
        a = img.array
        f = self.lr_factor
        an = [int(round(v)) for v in (list(cfg.anisotropy) + [1.0] * 3)[:3]]
        if self.selfsup:
            an = [1, 1, 1]
        ax = self._slice_axis(img, rng)
        p = int(patch or cfg.patch_size)
        thick = self.context if self.selfsup else (self.context + 2 if self.context > 1 else 3)
        shape = [thick * f * an[i] if i == ax else p * f * an[i] for i in range(3)]
        a = _pad_to(a, shape)
        start = [int(rng.integers(0, s - q + 1)) for s, q in zip(a.shape, shape)]
        slab = a[tuple(slice(st, st + q) for st, q in zip(start, shape))]
        mid = np.take(slab, shape[ax] // 2, axis=ax)
        return slab, ax, mid

    def _crop(self, rng: np.random.Generator, patch: Optional[int] = None) -> Tuple[np.ndarray, CleanImage, Tuple[float, ...]]:
        """A random HR crop (physical units) and its image, preferring foreground."""
        cfg = self.cfg
        best, best_fg, best_img, best_sp = None, -1.0, None, None
        self._slab_axis = None
        for _ in range(8):
            img = self.images[int(rng.choice(len(self.images), p=self.weights))]
            a = img.array
            if self.use_slab and a.ndim == 3:
                crop, ax, mid = self._slab(img, rng, patch)
                fg = float(np.mean((mid + img.params[0]) / img.params[1] > FOREGROUND_THRESHOLD))
                if fg > best_fg:
                    best, best_fg, best_img, best_sp, self._slab_axis = crop, fg, img, tuple(img.spacing_zyx), ax
                if fg >= self.min_foreground:
                    break
                continue
            if cfg.dim == 2 and a.ndim == 3:
                ax = self._slice_axis(img, rng)
                a = np.take(a, int(rng.integers(a.shape[ax])), axis=ax)
                sp = tuple(s for i, s in enumerate(img.spacing_zyx) if i != ax)
            elif cfg.dim == 3 and a.ndim == 2:
                a = a[None]
                sp = (1.0,) + tuple(img.spacing_zyx)
            else:
                sp = tuple(img.spacing_zyx)
            shape = self._hr_shape(a.ndim, patch)
            if cfg.dim == 3 and a.shape[0] == 1:
                shape = (1,) + shape[1:]
            a = _pad_to(a, shape)
            start = [int(rng.integers(0, s - p + 1)) for s, p in zip(a.shape, shape)]
            crop = a[tuple(slice(st, st + p) for st, p in zip(start, shape))]
            fg = float(np.mean((crop + img.params[0]) / img.params[1] > FOREGROUND_THRESHOLD))
            if fg > best_fg:
                best, best_fg, best_img, best_sp, self._slab_axis = crop, fg, img, sp, None
            if fg >= self.min_foreground:
                break
        return np.array(best, dtype=np.float32), best_img, best_sp

    def _augment_slab(self, slab: np.ndarray, axis: int, rng: np.random.Generator) -> np.ndarray:
        """Flips / in-plane 90-degree rotation / elastic of a slab, slice by slice consistently."""
        cfg = self.cfg
        s = np.moveaxis(slab, axis, 0)
        if cfg.augment_flip:
            for ax in (1, 2):
                if rng.random() < 0.5:
                    s = np.flip(s, axis=ax)
        if cfg.augment_rot90 and s.shape[1] == s.shape[2]:
            s = np.rot90(s, k=int(rng.integers(4)), axes=(1, 2))
        if cfg.elastic_prob > 0 and rng.random() < cfg.elastic_prob:
            seed = int(rng.integers(2**31))
            s = np.stack([elastic(np.ascontiguousarray(sl), cfg.elastic_alpha, np.random.default_rng(seed)) for sl in s])
        return np.ascontiguousarray(np.moveaxis(s, 0, axis))

    # -- one sample ----------------------------------------------------------------------------
    def sample(self, rng: np.random.Generator, *, augment: bool = True, level: Optional[float] = None,
               patch: Optional[int] = None) -> Dict[str, np.ndarray]:
        """One training sample (arrays without the N, C axes)."""
        cfg = self.cfg
        crop, img, sp = self._crop(rng, patch)
        slab_axis = self._slab_axis
        if augment:
            if slab_axis is not None:  # augment in-plane only, the same for every slice of the slab
                crop = self._augment_slab(crop, slab_axis, rng)
            else:
                crop = _augment(crop, cfg, rng, cfg.dim)
        offset, scale = self._params(img, rng, augment)
        # physical 0 in normalised units: the output floor, and the Rician SURE of fine-tuning
        out: Dict[str, np.ndarray] = {"zero": np.float32(offset / scale)}
        if self.selfsup:
            noisy_n = ((crop + offset) / scale).astype(np.float32)
            out["noisy"] = _middle(noisy_n, slab_axis)
            if self.context > 1:
                out["context"] = _context(noisy_n, slab_axis, self.context)
            if img.noise_var is not None:
                out["var"] = variance_map(out["noisy"], img.noise_var, (offset, scale))
            if cfg.noise_map:
                if "var" not in out:
                    raise InputError("a noise-map model needs the noise model of its fine-tuning data")
                out["nmap"] = np.sqrt(out["var"]).astype(np.float32)
        else:
            from ..degrade import degrade
            from ..noise import noise_std_map

            lev = self._level(rng, level)
            crop, lev_eff = self._contrast(crop, img, lev, rng, augment)
            kw: Dict[str, Any] = {"lr_factor": self.lr_factor, "spacing_zyx": sp, "rng": rng}
            if crop.ndim == 3:
                kw["anisotropy"] = tuple(int(round(v)) for v in cfg.anisotropy)
            if cfg.blur_fwhm > 0:
                kw["blur_fwhm"] = cfg.blur_fwhm
            deg = degrade(crop, cfg.modality, lev_eff, **kw)
            clean_lr = np.asarray(deg.clean_lr, dtype=np.float32)
            noisy_lr = np.asarray(deg.noisy_lr, dtype=np.float32)
            if cfg.modality == "mri":  # the sigma degrade() used (slab-wide peak)
                sig = _rician_sigma(deg, lev_eff, clean_lr)
            if self.context > 1:
                out["context"] = _context(((noisy_lr + offset) / scale).astype(np.float32), slab_axis,
                                          self.context)
            clean_lr = _middle(clean_lr, slab_axis)  # the middle LR slice of the slab
            noisy_lr = _middle(noisy_lr, slab_axis)
            if cfg.modality == "mri":  # Rician std of the middle slice
                from ..noise import rician_std

                std = rician_std(clean_lr, sig).astype(np.float32)
            else:
                std = noise_std_map(clean_lr, cfg.modality, lev_eff)
            out["noisy"] = ((noisy_lr + offset) / scale).astype(np.float32)
            if cfg.noise_map:
                coef = self._map_coef(lev_eff, deg, rng, augment)
                out["nmap"] = np.sqrt(variance_map(out["noisy"], coef, (offset, scale))).astype(np.float32)
            out["clean"] = ((clean_lr + offset) / scale).astype(np.float32)
            out["std"] = (np.asarray(std, dtype=np.float32) / scale).astype(np.float32)
            out["level"] = np.float32(lev)
            if cfg.sr:
                out["hr"] = ((np.asarray(deg.clean_hr, dtype=np.float32) + offset) / scale).astype(np.float32)
        if self.masked:
            masked, mask = n2v_mask(out["noisy"], cfg.mask_ratio, cfg.mask_radius, rng)
            out["input"], out["mask"] = masked, mask
        return out

    # -- the steps sample() and sample_cube() share, in the order they draw from ``rng`` --------
    def _params(self, img: CleanImage, rng: np.random.Generator, augment: bool) -> Tuple[float, float]:
        """The image's normalisation ``(offset, scale)``, the scale jittered by
        ``cfg.intensity_jitter`` when augmenting (percentile normalisation only)."""
        offset, scale = img.params
        jit = self.cfg.intensity_jitter
        if augment and jit > 0 and self.spec["method"] == "percentile":
            scale = scale * float(rng.uniform(1 - jit, 1 + jit))
        return offset, scale

    def _level(self, rng: np.random.Generator, level: Optional[float] = None) -> float:
        """``level`` when given, else one drawn from the training range by ``cfg.level_sampling``."""
        if level is not None:
            return float(level)
        lo, hi = self.levels
        if self.cfg.level_sampling == "loguniform":
            return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        return float(rng.uniform(lo, hi))

    def _contrast(self, crop: np.ndarray, img: CleanImage, lev: float, rng: np.random.Generator,
                  augment: bool) -> Tuple[np.ndarray, float]:
        """The clean crop after the contrast jitter (``cfg.gamma_jitter``, when augmenting) and the
        level to simulate on it: MRI levels are relative to the WHOLE image's peak, not the crop's."""
        cfg = self.cfg
        if augment and cfg.gamma_jitter > 0:
            crop = gamma_contrast(crop, img.peak, cfg.gamma_jitter, rng)
        if cfg.modality != "mri":
            return crop, lev
        cpeak = float(np.max(np.abs(crop)))
        return crop, (lev * img.peak / cpeak if cpeak > 0 else lev)

    def _map_coef(self, lev_eff: float, deg: Any, rng: np.random.Generator, augment: bool) -> Tuple[float, ...]:
        """The noise-map polynomial of the simulated noise, scaled by a random factor up to
        ``(1 + cfg.noise_map_jitter)^2`` either way when augmenting (the map at inference is
        estimated: teach tolerance)."""
        coef = physics_variance_coef(self.cfg.modality, lev_eff, float(deg.sigma))
        j = float(self.cfg.noise_map_jitter)
        if augment and j > 0:
            f2 = float(np.exp(rng.uniform(-2 * np.log1p(j), 2 * np.log1p(j))))
            coef = tuple(c * f2 for c in coef)
        return coef

    def batch(self, step: int, *, batch_size: Optional[int] = None) -> Dict[str, np.ndarray]:
        """Mini-batch number ``step`` (deterministic in ``(seed, rank, step)``): ``batch_size``
        independent samples, or on the view loss's steps (:meth:`is_cube_step`)
        ``cfg.cubes_per_step`` cubes (:meth:`sample_cube`), their slices concatenated and
        ``cube_clean`` (C, 1, P, P, P)."""
        rng = np.random.default_rng([int(self.seed), self.rank, int(step)])
        if self.is_cube_step(step):
            cubes = [self.sample_cube(rng) for _ in range(int(self.cfg.cubes_per_step))]
            out = {k: np.concatenate([c[k] for c in cubes]) for k in cubes[0] if k != "cube_clean"}
            out["cube_clean"] = np.stack([c["cube_clean"] for c in cubes])[:, None]
            return out
        n = int(batch_size or self.cfg.batch_size)
        samples = [self.sample(rng) for _ in range(n)]
        return stack(samples)

    # -- cubes for the view loss ---------------------------------------------------------------
    def is_cube_step(self, step: int) -> bool:
        """Whether batch ``step`` is made of cubes: the view loss is on (supervised) and ``step``
        is a multiple of ``cfg.view_every``."""
        return (self.cfg.view_loss > 0 and not self.selfsup
                and int(step) % int(self.cfg.view_every) == 0)

    def _cube_weights(self) -> np.ndarray:
        """Sampling weights of the images a cube can be cut from: 3D, and every plane within
        ``cfg.slice_max_anisotropy`` (where inference runs three views)."""
        limit = float(self.cfg.slice_max_anisotropy)
        ok = np.array([im.array.ndim == 3 and min(im.array.shape) > 1 and
                       (limit <= 0 or all(_plane_anisotropy(list(im.spacing_zyx), a) <= limit for a in range(3)))
                       for im in self.images], dtype=bool)
        if not ok.any():
            raise InputError("view_loss: no near-isotropic 3D training image to cut cubes from")
        w = np.where(ok, self.weights, 0.0)
        return w / w.sum()

    def sample_cube(self, rng: np.random.Generator) -> Dict[str, np.ndarray]:
        """One low-resolution cube of ``P = cfg.cube_size`` voxels for the view loss: every slice
        along z, then y, then x (``np.moveaxis(cube, axis, 0)``, as :mod:`dualnet.orthoviews` cuts
        them) as a 2.5D sample with its ``context`` slices read from a margin around the cube, so
        ``3 P`` samples with the keys of :meth:`sample` (N, 1, P, P), plus ``cube_clean`` (P, P, P),
        the clean cube (z, y, x) the views' mean is scored against. One noise level per cube."""
        from ..degrade import degrade
        from ..noise import noise_std_map, rician_std

        cfg = self.cfg
        p, f = int(cfg.cube_size), self.lr_factor
        margin = self.context // 2 + 1  # the context, and one spare voxel for the blur at the edge
        side = (p + 2 * margin) * f
        weights = self._cube_weights()
        best, best_fg, best_img = None, -1.0, None
        for _ in range(8):
            img = self.images[int(rng.choice(len(self.images), p=weights))]
            a = _pad_to(img.array, (side,) * 3)
            start = [int(rng.integers(0, n - side + 1)) for n in a.shape]
            crop = a[tuple(slice(st, st + side) for st in start)]
            inner = crop[(slice(margin * f, -margin * f),) * 3]
            fg = float(np.mean((inner + img.params[0]) / img.params[1] > FOREGROUND_THRESHOLD))
            if fg > best_fg:
                best, best_fg, best_img = crop, fg, img
            if fg >= self.min_foreground:
                break
        img, crop = best_img, np.array(best, dtype=np.float32)
        sp = list(img.spacing_zyx)
        for ax in range(3):  # flips and an axis order: the cube's content seen along any view
            if cfg.augment_flip and rng.random() < 0.5:
                crop = np.flip(crop, axis=ax)
        if cfg.augment_rot90:
            order = [int(i) for i in rng.permutation(3)]
            crop, sp = np.transpose(crop, order), [sp[i] for i in order]
        offset, scale = self._params(img, rng, True)
        lev = self._level(rng)
        crop, lev_eff = self._contrast(crop, img, lev, rng, True)
        kw: Dict[str, Any] = {"lr_factor": f, "spacing_zyx": tuple(sp), "rng": rng}
        if cfg.blur_fwhm > 0:
            kw["blur_fwhm"] = cfg.blur_fwhm
        deg = degrade(np.ascontiguousarray(crop), cfg.modality, lev_eff, **kw)
        clean = np.asarray(deg.clean_lr, dtype=np.float32)[(slice(1, -1),) * 3]  # the spare voxel off
        noisy = np.asarray(deg.noisy_lr, dtype=np.float32)[(slice(1, -1),) * 3]
        if cfg.modality == "mri":
            std = rician_std(clean, _rician_sigma(deg, lev_eff, clean)).astype(np.float32)
        else:
            std = noise_std_map(clean, cfg.modality, lev_eff)
        coef = self._map_coef(lev_eff, deg, rng, True) if cfg.noise_map else None
        noisy_n = (noisy + offset) / np.float32(scale)
        clean_n = (clean + offset) / np.float32(scale)
        std_n = np.asarray(std, dtype=np.float32) / np.float32(scale)
        c, k = self.context // 2, self.context
        inner = slice(c, c + p)
        samples: List[Dict[str, np.ndarray]] = []
        for ax in range(3):
            nv, cv, sv = (np.moveaxis(x, ax, 0) for x in (noisy_n, clean_n, std_n))
            for i in range(p):
                s: Dict[str, np.ndarray] = {"noisy": np.ascontiguousarray(nv[c + i, inner, inner], dtype=np.float32)}
                if k > 1:
                    s["context"] = np.ascontiguousarray(nv[i:i + k, inner, inner], dtype=np.float32)
                if coef is not None:
                    s["nmap"] = np.sqrt(variance_map(s["noisy"], coef, (offset, scale))).astype(np.float32)
                s["clean"] = np.ascontiguousarray(cv[c + i, inner, inner], dtype=np.float32)
                s["zero"] = np.float32(offset / scale)
                s["std"] = np.ascontiguousarray(sv[c + i, inner, inner], dtype=np.float32)
                s["level"] = np.float32(lev)
                samples.append(s)
        out = stack(samples)
        out["cube_clean"] = np.ascontiguousarray(clean_n[inner, inner, inner], dtype=np.float32)
        return out

    def fixed_set(self, n: int, seed_offset: int = 12345, patch: Optional[int] = None) -> Dict[str, np.ndarray]:
        """A fixed validation set: ``n`` samples, no augmentation, levels ``cfg.val_levels`` cycled
        or (none given) evenly spread over the training range."""
        rng = np.random.default_rng([int(self.seed) + seed_offset, 0, 0])
        lo, hi = self.levels
        if self.cfg.val_levels:
            levels = [float(self.cfg.val_levels[i % len(self.cfg.val_levels)]) for i in range(n)]
        elif self.cfg.level_sampling == "loguniform" and lo > 0:
            levels = np.geomspace(lo, hi, n) if n > 1 else [float(np.sqrt(lo * hi))]
        else:
            levels = np.linspace(lo, hi, n) if n > 1 else [0.5 * (lo + hi)]
        return stack([self.sample(rng, augment=False, level=None if self.selfsup else float(levels[i]), patch=patch)
                      for i in range(n)])


def _rician_sigma(deg: Any, lev_eff: float, clean_lr: np.ndarray) -> float:
    """The Rician sigma ``degrade()`` used, or (none recorded) ``lev_eff`` times ``clean_lr``'s peak."""
    sigma = float(getattr(deg, "sigma", float("nan")))
    return sigma if np.isfinite(sigma) else lev_eff * float(np.max(np.abs(clean_lr)))


def gamma_contrast(clean: np.ndarray, peak: float, jitter: float, rng: np.random.Generator) -> np.ndarray:
    """A clean magnitude crop with its contrast changed by a random power law:
    ``peak * (x / peak) ** g``, ``log g`` uniform in ``[-log(1 + jitter), log(1 + jitter)]``.

    The image's range [0, peak] is kept (0 and the peak are fixed points) and the order of the
    intensities too; only the tissue contrasts change. Applied before the noise is simulated, so the
    noise physics stays that of the new image.
    """
    if peak <= 0:
        return clean
    g = float(np.exp(rng.uniform(-np.log1p(jitter), np.log1p(jitter))))
    x = np.clip(clean / np.float32(peak), 0.0, 1.0)
    return (np.float32(peak) * np.power(x, np.float32(g))).astype(np.float32)


def stack(samples: List[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """Stack per-sample dicts into (N, 1, ...) arrays (``level`` -> (N,); ``context``, whose
    slices are already the channel axis, -> (N, K, H, W))."""
    out = {}
    for k in samples[0]:
        arrs = [np.asarray(s[k]) for s in samples]
        if k == "context" or arrs[0].ndim == 0:
            out[k] = np.stack(arrs)
        else:
            out[k] = np.stack(arrs)[:, None]
    return out


def _middle(arr: np.ndarray, axis: Optional[int]) -> np.ndarray:
    """The middle slice of a slab along ``axis`` (the array itself when ``axis`` is None)."""
    if axis is None:
        return arr
    return np.take(arr, arr.shape[axis] // 2, axis=axis)


def _context(arr: np.ndarray, axis: Optional[int], k: int) -> np.ndarray:
    """``k`` adjacent slices around the middle of a slab as (k, H, W); a 2D image (``axis``
    None) is repeated ``k`` times, as inference pads a volume's first / last slice."""
    if axis is None:
        return np.repeat(np.asarray(arr, np.float32)[None], k, axis=0)
    s = np.moveaxis(arr, axis, 0)
    mid = s.shape[0] // 2
    return np.ascontiguousarray(s[mid - k // 2: mid + k // 2 + 1], dtype=np.float32)


def physics_variance_coef(modality: str, level: float, sigma: float) -> Tuple[float, float, float]:
    """Noise variance polynomial ``(c0, c1, c2)`` (physical units, see
    :func:`noise_variance_model`) of the SIMULATED noise: MRI ``sigma^2`` (Rician sigma, a.u.),
    CT Poisson-Gaussian ``gain (s + 1000) + sigma_e^2`` at dose ``level``, US ``s^2 / L``."""
    if modality == "ct":
        from ..noise import ct_noise_parameters

        gain, se = ct_noise_parameters(float(level))
        return variance_coef("ct", gain=gain, electronic_sigma=se)
    return variance_coef(modality, sigma=float(sigma), looks=float(level))


def network_input(batch: Dict[str, Any], centre: Any = None) -> Any:
    """The tensor a network takes for a batch of torch tensors: ``centre`` (default
    ``batch["noisy"]``, (N, 1, H, W)) placed in the middle of the ``context`` slices when the
    batch has them, followed by the ``nmap`` noise-std channel when it has one."""
    import torch

    x = batch["noisy"] if centre is None else centre
    if "context" in batch:
        ctx = batch["context"]
        k = ctx.shape[1] // 2
        x = torch.cat([ctx[:, :k], x, ctx[:, k + 1:]], 1)
    if "nmap" in batch:
        x = torch.cat([x, batch["nmap"]], 1)
    return x


class BatchStream:
    """Iterable over batches ``start .. stop-1`` for a ``torch.utils.data.DataLoader``.

    Worker ``w`` of ``W`` generates steps ``start + w, start + w + W, ...``; the loader's in-order
    round-robin fetching returns them in step order, so the stream is identical for any ``W``.
    """

    def __init__(self, sampler: PatchSampler, start: int, stop: int) -> None:
        self.sampler, self.start, self.stop = sampler, int(start), int(stop)

    def __iter__(self):
        import torch
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for step in range(self.start + wid, self.stop, nw):
            b = self.sampler.batch(step)
            yield {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items()}


def _worker_init(worker_id: int) -> None:
    """Data workers ignore SIGINT and SIGTERM: a Ctrl-C, or a SIGTERM sent to the whole process group
    (``timeout``, systemd, Slurm), is handled once, by the training process, which writes its checkpoint;
    a worker killed by it would end the run with no checkpoint."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except (ValueError, OSError):  # pragma: no cover
            pass


def make_loader(sampler: PatchSampler, start: int, stop: int, num_workers: int, pin_memory: bool = False):
    """A DataLoader over :class:`BatchStream` (``batch_size=None``: the stream yields batches)."""
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    class _DS(IterableDataset):
        def __init__(self, stream: BatchStream) -> None:
            self.stream = stream

        def __iter__(self):
            return iter(self.stream)

    g = torch.Generator()
    g.manual_seed(int(sampler.seed))
    kw: Dict[str, Any] = {}
    if num_workers > 0:
        kw.update(prefetch_factor=4, persistent_workers=False, worker_init_fn=_worker_init)
    return DataLoader(_DS(BatchStream(sampler, start, stop)), batch_size=None, num_workers=int(num_workers),
                      generator=g, pin_memory=pin_memory, **kw)


# ---------------------------------------------------------------------------------------------
# data licences (for the model card)
# ---------------------------------------------------------------------------------------------
def licences_from_readme(data_dir: Optional[Union[str, Path]]) -> Dict[str, Dict[str, str]]:
    """``{file pattern: {"licence", "source", "description"}}`` parsed from the shared data README."""
    out: Dict[str, Dict[str, str]] = {}
    if data_dir is None:
        return out
    readme = Path(data_dir) / "README.md"
    if not readme.exists():
        return out
    for line in readme.read_text(encoding="utf-8", errors="replace").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 6 or cells[0] in ("file", "") or set(cells[0]) <= set("-: "):
            continue
        out[cells[0]] = {"licence": cells[-1], "source": cells[-2], "description": cells[1]}
    return out


def licence_for(path: str, table: Dict[str, Dict[str, str]]) -> Dict[str, str]:
    """Match a data path (relative or absolute) against the README table."""
    norm = str(path).replace("\\", "/")
    for key, row in table.items():
        pattern = re.escape(key).replace("NNNN", r"\d+")
        folder = key.rsplit("/", 1)[0] if "NNNN" in key else None
        if re.search(pattern + "$", norm) or (folder and (norm.rstrip("/").endswith(folder))):
            return row
    return {}
