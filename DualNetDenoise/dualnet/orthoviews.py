"""Orthogonal views: a 2D (2.5D) model run along each of a volume's three axes, the results averaged.

A slice-wise network sees a volume through one stack of slices; run along z, y and x it makes three
estimates whose errors are only partly shared, and their mean is closer to the truth (measured on
the MRI validation volumes at Rician 5 %: +0.3 to +0.5 dB over one view, ``docs/design_sweep.md``).
This is the cheapest way to give a 2.5D network the 3D redundancy BM4D uses; it costs three passes.

By default it is done where the network was checked for it: a card that says so
(``orthogonal_views: true``, set for the shipped MRI and CT models from their validation; the CT model
was trained on axial slices only, yet gained 1.3 dB on the isotropic 3 mm abdomen CT) or, without
that key, one whose training cut slices along all three axes (``config.slice_axes``); and a volume
that is near-isotropic (the largest voxel spacing at most :data:`MAX_ANISOTROPY` times the smallest)
and at least :data:`MIN_SIZE` voxels along every axis. Each view runs the whole single-view path
(noise map, SURE guard), so the mean is never estimated worse than the input either (the squared
error of a mean is at most the mean of the squared errors). Arrays are (z, y, x); spacings (z, y, x)
in mm.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .errors import InputError

#: orthogonal views: largest / smallest voxel spacing at most this, or the slices along y and x
#: would be stretched in a way the network never saw
MAX_ANISOTROPY = 1.5
#: fewest voxels along every axis for three views by default (measured: +1.0 dB on 12-slice slabs of
#: the 6 mm abdomen CT; thinner volumes: one view)
MIN_SIZE = 12
VIEW_CHOICES = (1, 3)


def parse_views(text: Any) -> Optional[int]:
    """A ``views`` option as the faces take it: ``"auto"`` -> None (the automatic choice), ``"1"`` /
    ``"3"`` -> the number.

    Raises:
        InputError: anything else.
    """
    word = str(text).strip().lower()
    if word == "auto":
        return None
    if word not in {str(v) for v in VIEW_CHOICES}:
        raise InputError(f"must be auto or one of {', '.join(map(str, VIEW_CHOICES))}, got {text!r}")
    return int(word)


def model_allows(card: Optional[Dict[str, Any]]) -> bool:
    """Whether the model is meant to run along y and x too: the card's ``orthogonal_views``, else
    whether its training cut slices along all three axes."""
    card = card or {}
    if isinstance(card.get("orthogonal_views"), bool):
        return bool(card["orthogonal_views"])
    axes = (card.get("config") or {}).get("slice_axes") or [0]
    return sorted({int(a) for a in axes}) == [0, 1, 2]


def choose_views(views: Optional[int], shape: Sequence[int], dim: int, card: Optional[Dict[str, Any]],
                 spacing_zyx: Optional[Sequence[float]] = None) -> int:
    """How many orthogonal views to run: ``views`` when given (1 or 3; 3 is then run even where it
    is not the default), else 3 where the model and the volume allow it (see the module docstring),
    1 otherwise. ``spacing_zyx`` None = isotropic.

    Raises:
        InputError: ``views`` is not 1 or 3, or 3 was asked of a 3D model or a 2D image.
    """
    if views is not None and int(views) not in VIEW_CHOICES:
        raise InputError(f"views must be 1 or 3, got {views}")
    if views is None:
        return 1 if _why_not(shape, dim, card, spacing_zyx) else 3
    if int(views) == 3 and (dim != 2 or len(shape) != 3):
        raise InputError("three orthogonal views need a 2D (slice-wise) model and a 3D (z, y, x) volume")
    return int(views)


def _why_not(shape: Sequence[int], dim: int, card: Optional[Dict[str, Any]],
             spacing_zyx: Optional[Sequence[float]]) -> str:
    """Why three views are not the default here ("" = they are)."""
    if dim != 2:
        return "a 3D model sees the volume in 3D already"
    if len(shape) != 3:
        return "a 2D image has one view"
    if min(shape) < MIN_SIZE:
        return f"fewer than {MIN_SIZE} voxels along an axis"
    if not model_allows(card):
        return "the model is not meant for slices along y and x"
    if spacing_zyx is not None:
        sp = [float(s) for s in spacing_zyx]
        if min(sp) <= 0 or max(sp) / min(sp) > MAX_ANISOTROPY:
            return f"anisotropic voxels {tuple(round(s, 3) for s in sp)} mm"
    return ""


def denoise_views(array: np.ndarray, run: Any, progress: Any = None, spread: bool = False) -> Dict[str, Any]:
    """Run ``run(view_array, view_index, progress)`` (a single-view :func:`dualnet.inference.denoise_array`
    returning an ``InferenceResult``) on the (z, y, x) volume seen along z, y and x, and average.

    The uncertainty map, if any, is the first view's (one MC pass set instead of three; the shipped
    cards' calibration scale is fitted for it: the first view's std against the error of the mean).
    A map that only some views return (``sigma_map`` / ``alpha_map`` where the other views read
    the first view's NEB maps) is the mean of those that do.
    Returns the averaged maps (``denoised``, ``sigma_map``, ``alpha_map``, ``uncertainty``) and
    ``infos``, the three views' info dicts; with ``spread``, also ``spread``: the per-voxel variance
    of the three denoised views about their mean (a running mean and sum of squared deviations, so
    large intensities lose no precision to cancellation).
    """
    sums: Dict[str, Optional[np.ndarray]] = {}
    counts: Dict[str, int] = {}
    infos = []
    sq_dev: Optional[np.ndarray] = None
    for a in range(3):
        view = np.ascontiguousarray(np.moveaxis(array, a, 0)) if a else array
        res = run(view, a, _view_progress(progress, a))
        del view
        for key in ("denoised", "sigma_map", "alpha_map"):
            val = getattr(res, key)
            if val is None:  # a map the view does not make (the NEB maps: the first view's only)
                sums.setdefault(key, None)
            elif a == 0:  # the first view's own array (z first already) becomes the sum
                sums[key] = np.asarray(val, dtype=np.float32)
                counts[key] = 1
                if key == "denoised" and spread:
                    sq_dev = np.zeros_like(sums[key])
            elif key == "denoised" and sq_dev is not None:  # a running mean: its count stays 1
                _add_to_mean(sums[key], sq_dev, np.moveaxis(val, 0, a), a + 1)  # type: ignore[arg-type]
            elif sums.get(key) is not None:
                sums[key] += np.moveaxis(val, 0, a)  # type: ignore[operator]
                counts[key] += 1
        if a == 0:
            sums["uncertainty"] = res.uncertainty
        infos.append(res.info)
        del res
    for key in ("denoised", "sigma_map", "alpha_map"):
        if sums.get(key) is not None and counts[key] > 1:
            sums[key] /= np.float32(counts[key])  # type: ignore[operator]
    if sq_dev is not None:
        sums["spread"] = sq_dev / np.float32(3)
    return {**sums, "infos": infos}


def _add_to_mean(mean: np.ndarray, sq_dev: np.ndarray, x: np.ndarray, n: int) -> None:
    """Welford's update, in place: ``mean`` of ``n - 1`` arrays and ``sq_dev``, their summed squared
    deviations from it, take in ``x`` as the ``n``-th (no large sums of squares to cancel)."""
    delta = x - mean
    mean += delta / np.float32(n)
    delta *= x - mean
    sq_dev += delta


def _view_progress(progress: Any, a: int) -> Any:
    """Progress of view ``a`` as its third of the whole, its messages prefixed with the view."""
    from .progress import scaled

    sub = scaled(progress, a / 3, (a + 1) / 3)
    if sub is None:
        return None
    return lambda fraction, message="": sub(fraction, f"view {a + 1}/3 (slices along {'zyx'[a]}): {message}")


def merge_info(infos: List[Dict[str, Any]], seconds: float) -> Dict[str, Any]:
    """One info dict for the three views: the first view's, with ``views``, the passes and seconds
    of all three, and the guard's weights per view (``guard.weight``: their mean, the network's
    share in the result)."""
    info = dict(infos[0])
    info.update(views=3, view_axes=["z", "y", "x"], passes=sum(int(i.get("passes", 1)) for i in infos),
                seconds=seconds)
    guards = [i.get("guard") for i in infos]
    if any(g is not None for g in guards):
        weights = [float((g or {}).get("weight", 1.0)) for g in guards]
        info["guard"] = {"weight": float(np.mean(weights)), "views": guards}
    return info
