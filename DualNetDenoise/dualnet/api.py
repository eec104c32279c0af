"""One entry point for denoising a volume: used by the CLI, the Slicer modules and scripts.

``denoise_volume`` takes a :class:`~dualnet.io.Volume` (array (z, y, x) or (y, x) plus
geometry) and returns a new Volume on the same grid; the input is never modified.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

from .errors import InputError, ModelError
from .io import Volume
from .modality import MODALITIES, check_modality, choose_modality  # noqa: F401 - check_modality is public here too
from .orthoviews import VIEW_CHOICES
from .progress import CancelToken, ProgressFn, check_cancel, report

MODALITY_NAMES = {"mri": "MRI (Rician)", "ct": "CT (Poisson-Gaussian low dose)", "us": "ultrasound (speckle)"}
NETWORK_METHODS = ("dualnet",)


def classical_methods() -> tuple:
    """Names of the classical baselines (``dualnet.baselines.METHODS``)."""
    from .baselines import METHODS

    return tuple(METHODS)


def all_methods() -> tuple:
    return NETWORK_METHODS + classical_methods()


@dataclass
class DenoiseResult:
    """Output of :func:`denoise_volume`.

    Attributes:
        volume: denoised image, float32, same grid (shape, spacing, origin, direction) as the input.
        uncertainty: per-voxel standard deviation of Monte Carlo dropout passes (same units as
            the image) when requested, else None.
        info: provenance: method, modality, noise level, model card summary, device, seconds.
        noise_map: the network's noise branch (NEB): per-voxel noise standard deviation it
            estimated (image units), when requested (``neb_maps``), else None.
        confidence: the NEB's confidence in [0, 1] (how close its blind-spot estimate is
            expected to be to the noise-free image), when requested, else None.
    """

    volume: Volume
    uncertainty: Optional[Volume] = None
    info: Dict[str, Any] = field(default_factory=dict)
    noise_map: Optional[Volume] = None
    confidence: Optional[Volume] = None


def validate_input(volume: Volume) -> np.ndarray:
    """Check a volume is a finite scalar 2D/3D image and return it as float32 (a copy)."""
    arr = np.asarray(volume.array)
    src = volume.path or "input volume"
    if arr.ndim not in (2, 3):
        raise InputError(f"{src}: a scalar 2D or 3D image is needed, got shape {arr.shape}")
    if arr.size == 0 or min(arr.shape) == 0:
        raise InputError(f"{src}: image has a zero-size axis {arr.shape}")
    out = arr.astype(np.float32, copy=True)
    if not np.isfinite(out).all():
        raise InputError(f"{src}: {int((~np.isfinite(out)).sum())} voxels are NaN or Inf")
    return out


def denoise_volume(
    volume: Volume,
    *,
    method: str = "dualnet",
    modality: str = "auto",
    sigma: Optional[float] = None,
    model: Optional[Union[str, Path]] = None,
    device: str = "auto",
    tta: Union[bool, int, None] = None,
    uncertainty: bool = False,
    mc_samples: int = 8,
    tile: Optional[int] = None,
    seed: int = 0,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
    guard: Optional[bool] = None,
    views: Optional[int] = None,
    neb_maps: bool = False,
    precision: str = "auto",
) -> DenoiseResult:
    """Denoise one volume with DUAL-NET or a classical baseline.

    Args:
        volume: input image; array (z, y, x) or (y, x), intensities as in the file (MRI
            arbitrary units, CT Hounsfield units, ultrasound grey levels).
        method: ``"dualnet"`` or one of :func:`classical_methods`.
        modality: ``"mri"``, ``"ct"`` or ``"us"``; selects the noise model, transform and model.
            ``"auto"``: from the DICOM Modality in ``volume.metadata``, else from the intensities
            (:func:`dualnet.modality.choose_modality`); ``info`` records the choice and its reason.
        sigma: the noise level, in the units of ``dualnet estimate``'s ``sigma`` (None: estimated):
            MRI the Rician sigma (image units); CT the noise std at water (HU; the scan's own
            Poisson-Gaussian fit keeps how it grows with the signal); US the relative speckle std
            ``1 / sqrt(L)``. The classical methods and the network (its noise map and SURE guard) use it
            alike (:func:`dualnet.training.data.noise_variance_model`).
        model: DUAL-NET model file (.safetensors with its .json card); None: the shipped model
            for the modality.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"`` (network only).
        tta: test-time augmentation (network only): 1 (none), 4 (quarter turns) or 8 (and their
            mirror images) transforms averaged in every view; True = 8, False = 1; None = the model's
            default where one view runs (the card's ``test_time_augmentation``: 4 for the shipped
            ultrasound and CT models, 1 for MRI) and none with three views.
        uncertainty: also return a Monte Carlo dropout standard-deviation map (network only).
        mc_samples: number of dropout passes for the uncertainty map.
        tile: tile edge in voxels for sliding-window inference (None: chosen from memory).
        progress: ``progress(fraction, message)`` callback.
        cancel: token checked between slices / tiles.
        guard: the network's SURE guard (:mod:`dualnet.sure_guard`: the result blended with the
            input where SURE estimates it would otherwise be worse); None = on for MRI and CT.
        views: the network run along 1 (z) or 3 (z, y, x; averaged, three times the time)
            orthogonal slice orientations (:mod:`dualnet.orthoviews`); None = 3 where the model was
            trained for it (the card's ``orthogonal_views``: MRI and CT) and the voxels are near-isotropic, else 1.
        neb_maps: also return the noise branch's noise-std and confidence maps (network only; no
            extra pass: they come from the same inference).
        precision: ``"auto"``, ``"float32"`` or ``"bfloat16"``: the network's CPU arithmetic
            (:mod:`dualnet.precision`; auto = bf16 where the CPU has AMX bf16, with the intensity
            layers, or those the card names, in fp32; else fp32). ``info["inference_precision"]``
            says which ran, ``info["inference_fp32_layers"]`` which layers stayed in fp32 in bf16.

    Returns:
        A :class:`DenoiseResult`; the input volume is not modified.
    """
    method = str(method).lower()
    arr = validate_input(volume)
    choice = choose_modality(modality, arr, volume.metadata)
    modality = choice.modality
    src = volume.path or "input volume"
    check_options(arr, src, method=method, modality=modality, sigma=sigma, tile=tile,
                  uncertainty=uncertainty, mc_samples=mc_samples, tta=tta, guard=guard, views=views,
                  neb_maps=neb_maps, precision=precision, model=model, device=device)
    check_cancel(cancel)
    start = time.perf_counter()
    info: Dict[str, Any] = {"method": method, **choice.info(), "input_shape_zyx": list(arr.shape)}
    unc_volume = None
    maps: Dict[str, Volume] = {}
    if method == "dualnet":
        coef = None
        if sigma is not None:
            from .training.data import noise_variance_model

            coef, given_noise = noise_variance_model(arr, modality, sigma)
        out, unc, net_info, neb = _denoise_network(
            arr, modality, model, device, tta, uncertainty, mc_samples, tile, seed, progress, cancel, coef, guard,
            views, volume.spacing_zyx, precision,
        )
        info.update(net_info)
        if coef is not None:  # as the network's own estimate is recorded
            info.update(sigma=float(sigma), inference_noise_model=given_noise)
        else:  # the level the network was given, in --sigma's units, where every face reads it
            estimated = info.get("inference_noise_model")
            level = estimated.get("sigma") if isinstance(estimated, dict) else None
            if isinstance(level, (int, float)) and not isinstance(level, bool) and np.isfinite(level):
                info.update(sigma=float(level), sigma_estimated=True)
        if unc is not None:
            unc_volume = volume.with_array(unc.astype(np.float32))
        if neb_maps:
            if any(v is None for v in neb.values()):
                raise ModelError(f"{info.get('model', 'model')} has no noise-estimation branch (NEB): "
                                 "no noise map or confidence map to give")
            maps = {k: volume.with_array(np.asarray(v, dtype=np.float32)) for k, v in neb.items()}
    else:
        from . import baselines

        if method not in baselines.METHODS:
            raise InputError(f"unknown method {method!r}; choose one of {', '.join(all_methods())}")
        if sigma is None:
            try:
                sigma = _estimate_sigma(arr, modality)
            except InputError as err:
                raise InputError(f"{src}: {err}") from None
            info["sigma_estimated"] = True
        info["sigma"] = float(sigma)
        out = baselines.denoise(
            arr, method, modality, sigma=sigma, spacing_zyx=volume.spacing_zyx, progress=progress, cancel=cancel
        )
    _check_result(out, src, method, info)
    if unc_volume is not None:
        _check_result(unc_volume.array, src, method, info, what="uncertainty map")
    for key, vol in maps.items():
        _check_result(vol.array, src, method, info, what=key.replace("_", " "))
    info["seconds"] = round(time.perf_counter() - start, 3)
    report(progress, 1.0, "done")
    return DenoiseResult(volume.with_array(np.asarray(out, dtype=np.float32)), unc_volume, info,
                         maps.get("noise_map"), maps.get("confidence"))


#: Smallest ``tile``: smaller tiles are mostly overlap (minutes for a tiny volume).
MIN_TILE = 16


def _asks_tta(tta: Union[bool, int, None]) -> bool:
    """Whether a ``tta`` option asks for test-time augmentation (None = the model's default).

    Raises:
        InputError: not a ``tta`` option (:func:`dualnet.inference.normalise_tta`).
    """
    from .inference import normalise_tta

    n = normalise_tta(tta)
    return n is not None and n > 1


def result_warnings(info: Dict[str, Any]) -> List[str]:
    """The warnings in a result's ``info`` that every face shows: a model trained for another modality
    (``warning``), a doubtful noise estimate (``inference_noise_warning``)."""
    return [str(info[key]) for key in ("warning", "inference_noise_warning") if info.get(key)]


def network_only_options(method: str, *, model: Any = None, tile: Any = None, device: str = "auto",
                         tta: Any = None, uncertainty: bool = False, neb_maps: bool = False,
                         guard: Optional[bool] = None, views: Optional[int] = None,
                         precision: str = "auto") -> List[str]:
    """The network's options that were given a value although ``method`` is a classical one, by their
    command-line names (empty for ``"dualnet"``). ``tta`` counts when it asks for transforms; ``device``
    when it names an accelerator (the classical methods run on the CPU)."""
    if str(method).lower() == "dualnet":
        return []
    given = {"--model": model is not None, "--tile": tile is not None,
             "--device": str(device or "auto").lower() not in ("auto", "cpu"),
             "--tta": bool(_asks_tta(tta)), "--uncertainty": bool(uncertainty),
             "--noise-map / --confidence (the noise branch's maps)": bool(neb_maps), "--no-guard": guard is False,
             "--views": views is not None, "--precision": str(precision or "auto").lower() != "auto"}
    return [name for name, on in given.items() if on]


def refuse_network_options(method: str, src: Optional[str] = None, **options: Any) -> None:
    """Raise :class:`InputError` (prefixed with ``src`` when given) naming the network's options that
    ``options`` gives a classical ``method`` (:func:`network_only_options`'s keywords)."""
    given = network_only_options(method, **options)
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        prefix = f"{src}: " if src else ""
        raise InputError(f"{prefix}{' and '.join(given)} {verb} to the network only, not to {method}")


def check_options(arr: np.ndarray, src: str, *, method: str, modality: str, sigma: Optional[float] = None,
                  tile: Any = None, uncertainty: bool = False, mc_samples: int = 8,
                  tta: Union[bool, int, None] = None,
                  guard: Optional[bool] = None, views: Optional[int] = None, neb_maps: bool = False,
                  precision: str = "auto", model: Any = None, device: str = "auto") -> None:
    """Refuse option values that would give no result, a meaningless one or take hours, before any work;
    and the network's options given to a classical method (:func:`network_only_options`)."""
    from .precision import check_precision

    try:
        asks_tta = _asks_tta(tta)
        precision = check_precision(precision)
    except InputError as err:
        raise InputError(f"{src}: {err}") from None
    refuse_network_options(method, src, model=model, tile=tile, device=device, tta=asks_tta, uncertainty=uncertainty,
                           neb_maps=neb_maps, guard=guard, views=views, precision=precision)
    if views is not None and views not in VIEW_CHOICES:
        raise InputError(f"{src}: --views must be one of {', '.join(map(str, VIEW_CHOICES))}, got {views!r}")
    if tile is not None:
        sides = [tile] if np.isscalar(tile) else list(tile)
        if any(not isinstance(t, (int, np.integer)) or isinstance(t, bool) or t < MIN_TILE for t in sides):
            raise InputError(f"{src}: --tile must be whole voxels >= {MIN_TILE}, got {tile!r}")
    if uncertainty and (not isinstance(mc_samples, (int, np.integer)) or mc_samples < 2):
        raise InputError(f"{src}: --uncertainty needs --mc-samples >= 2 (the map is their spread), got {mc_samples!r}")
    if sigma is not None:
        from .estimate import check_sigma

        try:
            check_sigma(sigma, modality, arr)
        except InputError as err:
            raise InputError(f"{src}: --sigma: {err}") from None


def _check_result(out: np.ndarray, src: str, method: str, info: Dict[str, Any], what: str = "result") -> None:
    """Refuse a result holding NaN / Inf, naming the cause, so it is never written."""
    arr = np.asarray(out)
    finite = np.isfinite(arr)
    if finite.all():
        return
    bad = int(arr.size - np.count_nonzero(finite))
    if method == "dualnet":
        raise ModelError(f"{info.get('model', 'model')}: the network gave {bad} NaN or Inf voxels in the {what} "
                         f"for {src} (broken weights or a degenerate normalisation in its card)")
    raise InputError(f"{src}: {method} gave {bad} NaN or Inf voxels in the {what} "
                     f"(sigma {info.get('sigma', 'auto')}); try another --sigma or method")


def _estimate_sigma(arr: np.ndarray, modality: str) -> float:
    """The noise level the classical methods take (``estimate_noise(...).sigma``): MRI the Rician sigma
    (image units), CT the noise std at water (HU), US the relative speckle std 1/sqrt(looks)."""
    from .estimate import estimate_noise

    est = estimate_noise(arr, modality)
    return float(getattr(est, "sigma", est))


def resolve_model_path(model: Optional[Union[str, Path]], modality: str) -> Path:
    """The model file to use: ``model`` if given, else the shipped default for ``modality``."""
    from . import modelfile

    if model is not None:
        path = Path(model)
        if not path.exists():
            raise ModelError(f"{path}: model file not found")
        return path
    path = Path(modelfile.default_model_path(modality))
    if not path.exists():
        raise ModelError(
            f"no shipped DUAL-NET model for modality {modality!r} yet ({path.name} missing); "
            "pass --model PATH or use a classical method such as --method bm4d"
        )
    return path


def _denoise_network(arr, modality, model, device, tta, uncertainty, mc_samples, tile, seed, progress, cancel,
                     noise_coef=None, guard=None, views=None, spacing_zyx=None, precision="auto"):
    from . import inference, modelfile

    path = resolve_model_path(model, modality)
    report(progress, 0.0, f"loading model {path.name}")
    net, card = modelfile.load_for_inference(path, device, mc=bool(uncertainty and mc_samples), precision=precision)
    card_modality = card.get("modality")
    info: Dict[str, Any] = {"model": str(path), "model_version": card.get("version"), "model_modality": card_modality}
    if card_modality and card_modality != modality:
        info["warning"] = f"model trained for {card_modality}, applied to {modality}"
    res = inference.denoise_array(
        arr,
        net,
        card,
        device=device,
        tile=tile,
        tta=tta,
        mc_samples=mc_samples if uncertainty else 0,
        seed=seed,
        progress=progress,
        cancel=cancel,
        modality=modality,
        noise_coef=noise_coef,
        guard=guard,
        views=views,
        spacing_zyx=spacing_zyx,
        precision=precision,
    )
    info.update({f"inference_{k}": v for k, v in (res.info or {}).items()})
    neb = {"noise_map": res.sigma_map, "confidence": res.alpha_map}
    return res.denoised, (res.uncertainty if uncertainty else None), info, neb


def denoise_dicom(input_path: Union[str, Path], output_dir: Union[str, Path], **kwargs: Any):
    """Denoise every CT / MR series of a DICOM folder (or file) into new derived DICOM series.

    The DICOM counterpart of :func:`denoise_volume`: each source series is read with SimpleITK's
    GDCM reader, denoised with :func:`denoise_volume` (modality from the DICOM Modality tag unless
    ``modality=`` is given) and written with pydicom as a new series of the same study
    (``DERIVED\\SECONDARY``, provenance, source references, per-slice geometry of the source).
    Keyword arguments are those of :func:`dualnet.dicom_out.denoise_dicom_folder` (``method``,
    ``modality``, ``sigma``, ``model``, ``device``, ``uncertainty_dir``, ``rescale``, ``layout``...).

    Returns:
        A :class:`dualnet.dicom_out.DicomRunReport` (per-series outcomes and skipped objects).
    """
    from .dicom_out import denoise_dicom_folder

    return denoise_dicom_folder(input_path, output_dir, **kwargs)
