"""Frozen classical segmenters for a downstream-Dice comparison of denoisers.

These are deliberately simple, deterministic classifiers FITTED ONCE on a clean image and its
reference labels, then frozen (all parameters in :meth:`Segmenter.to_dict`) and applied
identically to the clean low-resolution reference and to every method's denoised output. The
Dice between the two predictions measures how far a denoiser moves a downstream segmentation
away from what the clean image gives. They are not meant to be good segmenters and are used
only to compare methods with each other.

Kinds (``fit_segmenter(kind, clean_array, labels)``):

* ``"mri_wm"`` -- brain tissue on T1: one Gaussian per class (1 = white matter, 2 = grey matter,
  3 = other brain voxels, mostly CSF) on intensity smoothed with a Gaussian of ``smooth_sigma``
  voxels; means, standard deviations and priors estimated from the labelled clean voxels;
  voxels classified by the largest posterior inside a region of interest (ROI). Labels: an int
  map with those class values (0 = outside the ROI).
* ``"ct_liver"`` -- liver on CT: smoothed HU inside an interval [lo, hi] (chosen on the clean
  volume by a grid search over liver-HU quantiles that maximises Dice against the given liver
  mask), inside the body (HU > -500), opened with a 3x3x3 cross and reduced to the largest
  connected component. Labels: liver mask (1).
* ``"us_nerve_vessel"`` -- ultrasound: one grey-level interval per structure on frames smoothed
  in-plane with a Gaussian of ``smooth_sigma`` pixels, each interval chosen on the clean frames by
  the same Dice-maximising grid search as for CT (vessel = 2 first, as the anechoic lumen is the
  more specific; then nerve = 1 among the remaining pixels), inside the image sector ROI, opened
  in-plane with a 3x3 cross. Labels: int map (0, 1, 2). Works on 2D frames (y, x) or stacks
  (n, y, x) of frames (all operations per frame).

Arrays are (z, y, x) or (y, x); intensities in the file's units (MRI a.u., CT HU, US 0..255).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from .errors import InputError
from .metrics import largest_component

KINDS = ("mri_wm", "ct_liver", "us_nerve_vessel")

#: Target labels whose Dice the study reports for each kind.
TARGET_LABELS = {"mri_wm": (1, 2), "ct_liver": (1,), "us_nerve_vessel": (1, 2)}
LABEL_NAMES = {
    "mri_wm": {1: "WM", 2: "GM", 3: "other"},
    "ct_liver": {1: "liver"},
    "us_nerve_vessel": {1: "nerve", 2: "vessel"},
}


def _smooth(x: np.ndarray, sigma: float, in_plane_only: bool = False) -> np.ndarray:
    from scipy import ndimage

    x = np.asarray(x, dtype=np.float64)
    if sigma <= 0:
        return x
    if in_plane_only and x.ndim == 3:
        return ndimage.gaussian_filter(x, (0.0, sigma, sigma))
    return ndimage.gaussian_filter(x, sigma)


def _gauss_fit(values: np.ndarray, labels: np.ndarray, classes: Sequence[int]) -> Dict[str, list]:
    """Per-class Gaussian of ``values``; classes with < 2 labelled voxels are left out (never predicted)."""
    means, stds, priors, kept = [], [], [], []
    total = float(sum(int((labels == c).sum()) for c in classes))
    for c in classes:
        v = values[labels == c]
        if v.size < 2:
            continue
        kept.append(int(c))
        means.append(float(v.mean()))
        stds.append(float(max(v.std(), 1e-6 * (abs(v.mean()) + 1.0))))
        priors.append(float(v.size / total))
    if len(kept) < 2:
        raise InputError(f"fewer than two of the classes {list(classes)} have labelled voxels; cannot fit the segmenter")
    return {"classes": kept, "means": means, "stds": stds, "priors": priors}


def _gauss_predict(values: np.ndarray, p: Dict[str, Any]) -> np.ndarray:
    best = None
    out = np.zeros(values.shape, dtype=np.uint8)
    for c, m, s, pr in zip(p["classes"], p["means"], p["stds"], p["priors"]):
        logp = -0.5 * ((values - m) / s) ** 2 - np.log(s) + np.log(pr)
        if best is None:
            best = logp
            out[...] = c
        else:
            better = logp > best
            out[better] = c
            best = np.where(better, logp, best)
    return out


@dataclass
class Segmenter:
    """A frozen segmenter: ``kind`` plus every fitted parameter in ``params`` (JSON-able).

    Call :meth:`predict` with an image in the same units as the clean image it was fitted on.
    """

    kind: str
    params: Dict[str, Any] = field(default_factory=dict)

    def predict(self, array: np.ndarray, roi: Optional[np.ndarray] = None) -> np.ndarray:
        """Label map (uint8, same shape as ``array``) of an image ((z, y, x) or (y, x)).

        Args:
            array: image in the fitting units.
            roi: optional bool mask; voxels outside get label 0. ``"mri_wm"`` needs one (the
                brain region, the same for every method); for the other kinds it is optional.
        """
        x = np.asarray(array, dtype=np.float64)
        if roi is not None:
            roi = np.asarray(roi, dtype=bool)
            if roi.shape != x.shape:
                raise InputError(f"ROI shape {roi.shape} differs from image shape {x.shape}")
        p = self.params
        if self.kind == "mri_wm":
            if roi is None:
                raise InputError("the mri_wm segmenter needs the brain ROI")
            lab = _gauss_predict(_smooth(x, p["smooth_sigma"]), p)
            lab[~roi] = 0
            return lab
        if self.kind == "ct_liver":
            from scipy import ndimage

            s = _smooth(x, p["smooth_sigma"])
            body = x > -500.0
            m = (s >= p["lo"]) & (s <= p["hi"]) & body
            if roi is not None:
                m &= roi
            m = ndimage.binary_opening(m, ndimage.generate_binary_structure(x.ndim, 1))
            return largest_component(m).astype(np.uint8)
        if self.kind == "us_nerve_vessel":
            from scipy import ndimage

            sm = _smooth(x, p["smooth_sigma"], in_plane_only=True)
            struct = ndimage.generate_binary_structure(2, 1)
            if x.ndim == 3:
                struct = struct[None]
            lab = np.zeros(x.shape, dtype=np.uint8)
            free = np.ones(x.shape, dtype=bool) if roi is None else roi.copy()
            for key in p["order"]:
                lo, hi = p["intervals"][str(key)]
                m = ndimage.binary_opening((sm >= lo) & (sm <= hi) & free, struct)
                lab[m] = int(key)
                free &= ~m
            return lab
        raise InputError(f"unknown segmenter kind {self.kind!r}; use one of {', '.join(KINDS)}")

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able frozen form."""
        return {"kind": self.kind, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Segmenter":
        kind = data.get("kind")
        if kind not in KINDS:
            raise InputError(f"unknown segmenter kind {kind!r}")
        return cls(str(kind), dict(data.get("params", {})))


def _fit_interval(values: np.ndarray, target: np.ndarray, region: np.ndarray) -> Tuple[float, float, float]:
    """Interval [lo, hi] of ``values`` maximising Dice with ``target`` inside ``region``.

    Grid search: lo over the 0..37.5 % and hi over the 62.5..100 % quantiles (2.5 % steps) of the
    target's values. Returns (dice, lo, hi).
    """
    tv = values[target & region]
    if tv.size < 2:
        raise InputError("the structure to segment has fewer than 2 labelled voxels in the region")
    q = np.quantile(tv, np.linspace(0.0, 1.0, 41))
    v = values[region]
    t = target[region]
    n_t = int(t.sum())
    best = (-1.0, float(q[0]), float(q[-1]))
    for lo in q[:16]:
        above = v >= lo
        for hi in q[25:]:
            m = above & (v <= hi)
            d = 2.0 * np.logical_and(m, t).sum() / (m.sum() + n_t)
            if d > best[0]:
                best = (float(d), float(lo), float(hi))
    return best


def fit_segmenter(
    kind: str,
    clean_array: np.ndarray,
    labels: np.ndarray,
    *,
    roi: Optional[np.ndarray] = None,
    smooth_sigma: Optional[float] = None,
) -> Segmenter:
    """Fit a frozen segmenter on a clean image and its reference labels.

    Args:
        kind: one of :data:`KINDS` (see the module docstring for the label convention).
        clean_array: clean image, (z, y, x) / (y, x), or (n, y, x) frames for ultrasound.
        labels: integer label map on the same grid.
        roi: optional bool mask of the region the segmenter works in (ultrasound: image sector).
        smooth_sigma: Gaussian pre-smoothing in voxels (default 1.0 for MRI/CT, 2.0 for US).

    Returns:
        A :class:`Segmenter` whose parameters no longer depend on the data.
    """
    x = np.asarray(clean_array, dtype=np.float64)
    lab = np.asarray(labels)
    if lab.shape != x.shape:
        raise InputError(f"labels shape {lab.shape} differs from image shape {x.shape}")
    lab = lab.astype(np.int64)
    if kind == "mri_wm":
        sig = 1.0 if smooth_sigma is None else float(smooth_sigma)
        p = _gauss_fit(_smooth(x, sig)[lab > 0], lab[lab > 0], (1, 2, 3))
        p["smooth_sigma"] = sig
        return Segmenter(kind, p)
    if kind == "ct_liver":
        sig = 1.0 if smooth_sigma is None else float(smooth_sigma)
        s = _smooth(x, sig)
        liver = lab > 0
        if liver.sum() < 10:
            raise InputError("the liver mask has fewer than 10 voxels; cannot fit the CT segmenter")
        body = x > -500.0
        if roi is not None:
            body &= np.asarray(roi, dtype=bool)
        d, lo, hi = _fit_interval(s, liver, body)
        return Segmenter(kind, {"lo": lo, "hi": hi, "smooth_sigma": sig, "fit_dice": d})
    if kind == "us_nerve_vessel":
        sig = 2.0 if smooth_sigma is None else float(smooth_sigma)
        s = _smooth(x, sig, in_plane_only=True)
        free = np.ones(x.shape, dtype=bool) if roi is None else np.asarray(roi, dtype=bool).copy()
        intervals: Dict[str, list] = {}
        order, fit_dice = [], {}
        for key in (2, 1):
            target = lab == key
            if int((target & free).sum()) < 2:
                continue
            d, lo, hi = _fit_interval(s, target, free)
            intervals[str(key)] = [lo, hi]
            order.append(key)
            fit_dice[str(key)] = d
            free &= ~((s >= lo) & (s <= hi))
        if not order:
            raise InputError("no nerve or vessel pixels in the ultrasound labels; cannot fit the segmenter")
        return Segmenter(kind, {"intervals": intervals, "order": order, "smooth_sigma": sig, "fit_dice": fit_dice})
    raise InputError(f"unknown segmenter kind {kind!r}; use one of {', '.join(KINDS)}")


def resample_labels(labels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resample an integer label map onto a grid of ``shape`` covering the same extent.

    Each label's indicator is interpolated linearly (``scipy.ndimage.zoom``, order 1, grid
    mode) and every voxel takes the label with the largest interpolated value (0 wins ties).
    Used to bring reference labels / ROIs onto the low-resolution grid.
    """
    from scipy import ndimage

    lab = np.asarray(labels).astype(np.int64)
    shape = tuple(int(s) for s in shape)
    if lab.shape == shape:
        return lab.astype(np.uint8 if lab.max(initial=0) < 256 else np.int32)
    factors = [t / s for t, s in zip(shape, lab.shape)]
    values = np.unique(lab)
    best = np.full(shape, -1.0)
    out = np.zeros(shape, dtype=np.int64)
    for v in values:
        ind = ndimage.zoom((lab == v).astype(np.float32), factors, order=1, mode="nearest", grid_mode=True)
        ind = ind[tuple(slice(0, s) for s in shape)]
        if ind.shape != shape:  # pragma: no cover - zoom rounding
            pad = [(0, t - s) for t, s in zip(shape, ind.shape)]
            ind = np.pad(ind, pad, mode="edge")
        better = ind > best
        out[better] = v
        best = np.where(better, ind, best)
    return out.astype(np.uint8 if out.max(initial=0) < 256 else np.int32)
