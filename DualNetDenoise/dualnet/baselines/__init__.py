"""Classical denoising baselines with the right noise transform for each modality.

One entry point, :func:`denoise`. Every method runs in a domain where the noise is (close to)
additive white Gaussian with a known std, then maps back with an unbiased inverse:

- MRI (Rician): :func:`dualnet.vst.rician_forward` (noise std 1) and the exact unbiased
  :func:`dualnet.vst.rician_inverse` (removes the Rician bias, including in the background).
- CT (Poisson-Gaussian): generalized Anscombe in ``HU + 1024`` (counts from the lowest air a
  scanner stores, so that the inverse, >= 0, does not raise air below -1000 HU) with estimated (or
  given) ``(gain, sigma)`` and the Makitalo-Foi exact unbiased inverse. Voxels below -1100 HU
  (out-of-field padding) are left out of the fit and returned unchanged.
- US (Gamma speckle): log transform with the ``psi(L) - ln L`` bias removed, ``exp`` back.

The transformed image is normalised to [0, 1] (the noise std divided by the same range) before
BM4D / BM3D / NLM, and mapped back afterwards. Arrays are (z, y, x) or (y, x).

``bm4d`` and ``bm3d`` (Tampere University, free for non-commercial use only) are optional and
imported lazily inside the functions that need them.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import DualNetError, InputError
from ..progress import CancelToken, ProgressFn, check_cancel, report, scaled

METHODS: Tuple[str, ...] = ("bm4d", "bm3d", "nlm", "gaussian", "median", "diffusion")
MODALITIES: Tuple[str, ...] = ("mri", "ct", "us")

_LICENCE_NOTE = (
    "is not installed; install it with `pip install {pkg}` (free for non-commercial use only, "
    "Tampere University licence) or choose another method (nlm, gaussian, median, diffusion)"
)


class MissingDependencyError(DualNetError):
    """An optional package (bm4d / bm3d) needed by the chosen method is not installed."""


def _import_optional(name: str):
    """Import ``bm4d`` or ``bm3d`` lazily, with a one-line error naming the fix and the licence."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise MissingDependencyError(f"the '{name}' package " + _LICENCE_NOTE.format(pkg=name)) from None


# --------------------------------------------------------------------------- transforms

class _Transform:
    """Forward map to a Gaussian-noise domain (noise std ``std``) and its unbiased inverse."""

    def __init__(self, forward: np.ndarray, std: float, inverse: Callable[[np.ndarray], np.ndarray], info: dict):
        self.data = forward
        self.std = float(std)
        self.inverse = inverse
        self.info = info


def _transform(a: np.ndarray, modality: str, sigma: Optional[float], stabilize: bool) -> _Transform:
    from .. import estimate, vst
    from ..degrade import CT_FLOOR_HU

    if modality == "mri":
        s = float(sigma) if sigma is not None else estimate.estimate_noise(a, "mri").sigma
        if s <= 0:
            raise InputError(f"noise sigma must be positive, got {s}")
        if not stabilize:
            return _Transform(a, s, lambda d: d, {"sigma": s, "transform": "none"})
        return _Transform(
            vst.rician_forward(a, s), 1.0, lambda d: vst.rician_inverse(d, s), {"sigma": s, "transform": "rician-vst"}
        )
    if modality == "ct":
        # Counts from the lowest air of a reconstructed scan (-1024 HU), not from -1000: the
        # unbiased GAT inverse is >= 0, so an offset of 1000 would raise the air below -1000 HU.
        # Above -1000 HU the fit absorbs the shift into the electronic term (var = gain (HU +
        # 1024) + e^2 with e^2 = s^2 - 24 gain, s the electronic std in HU); the air between is close.
        off = -CT_FLOOR_HU
        y = a + off
        pad = a < estimate.CT_PADDING_HU  # out-of-field fill values: excluded, restored after
        gain, e = estimate.poisson_gaussian_fit(y, mask=~pad if pad.any() else None)
        water = float(np.sqrt(gain * off + e * e))
        if sigma is not None:  # sigma = noise std at water (HU): keep the fitted shape, rescale
            gain, e = estimate.scale_ct_noise_to_water(gain, e, float(sigma), off)
            water = float(sigma)
        info = {"gain": gain, "electronic_sigma": e, "sigma": water}
        if not stabilize or gain <= 0:
            std = water if water > 0 else estimate.sigma_gaussian_mad(a)
            info.update(sigma=std, transform="none")
            return _Transform(a, std, lambda d: d, info)
        e_eff = max(e, 1e-6 * gain)
        info["transform"] = "gat"
        return _Transform(
            vst.gat_forward(y, gain, e_eff), 1.0,
            lambda d: vst.gat_inverse_exact_unbiased(d, gain, e_eff) - off, info,
        )
    # ultrasound
    looks = 1.0 / float(sigma) ** 2 if sigma is not None else estimate.speckle_looks(a)
    peak = float(np.max(a)) if a.size else 0.0
    floor = 1e-3 * peak if peak > 0 else 1e-6
    info = {"looks": looks, "sigma": 1.0 / np.sqrt(looks)}
    if not stabilize:
        std = estimate.sigma_gaussian_mad(a)
        info.update(transform="none")
        return _Transform(a, std, lambda d: d, info)
    info["transform"] = "log"
    return _Transform(
        vst.log_forward(a, looks, floor=floor), vst.log_noise_std(looks), lambda d: vst.log_inverse(d, looks), info
    )


# ---------------------------------------------------------------- Gaussian-domain methods

_BM4D_MIN_AXIS = 8

#: Seconds between the "still running" reports during one BM4D pass.
BM4D_HEARTBEAT_S = 1.0

#: Fraction of the BM4D step reported once the hard-thresholding pass is done: its share of the
#: run time was 0.43 to 0.66 on 32^3 to 48^3 real MRI / CT crops ("np" profile, 2-core CPU).
_BM4D_HARD_SHARE = 0.5


def _elapsed(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _run_pass(fn: Callable[[], Any], fraction: float, label: str, progress, cancel,
              heartbeat: float) -> Any:
    """Run one BM4D pass (``fn``, native code that cannot be interrupted) in a worker thread while
    this thread reports ``fraction`` (the work done before the pass: BM4D gives no finer
    progress, so no fraction is invented) with the elapsed time every ``heartbeat`` seconds. A
    cancel request during the pass is shown and honoured when the pass returns."""
    import threading
    import time

    box: dict = {}

    def work() -> None:
        try:
            box["out"] = fn()
        except BaseException as err:  # re-raised in the calling thread
            box["err"] = err

    t0 = time.monotonic()
    worker = threading.Thread(target=work, name="bm4d-pass", daemon=True)
    worker.start()
    while True:
        worker.join(heartbeat)
        if not worker.is_alive():
            break
        stopping = " stopping" if cancel is not None and cancel.cancelled else ""
        report(progress, fraction, f"{label} {_elapsed(time.monotonic() - t0)}{stopping}")
    if "err" in box:
        raise box["err"]
    check_cancel(cancel)
    return box["out"]


def _bm4d(z: np.ndarray, s: float, spacing, opts, progress, cancel) -> np.ndarray:
    """BM4D in its two passes, hard thresholding then Wiener filtering with the first as pilot
    (what the package's one-call ``ALL_STAGES`` does, same result up to the float32 rounding that
    varies between runs of its multi-threaded code), so progress is reported per pass, with the
    elapsed time while a pass runs, and a cancel request is honoured between passes."""
    if z.ndim == 2:
        return _bm3d(z, s, spacing, opts, progress, cancel)
    bm4d = _import_optional("bm4d")
    check_cancel(cancel)
    hard_only = opts.get("stage") == "hard"
    profile = opts.get("profile", "np")
    heartbeat = float(opts.get("heartbeat_s", BM4D_HEARTBEAT_S))
    # BM4D needs every axis at least as long as its block (8 voxels in the default profiles): thin
    # slabs are mirrored to that length and cropped back afterwards.
    pad = [(0, max(0, _BM4D_MIN_AXIS - n)) for n in z.shape]
    zp = np.pad(z, pad, mode="symmetric") if any(p for _, p in pad) else z
    while any(n < _BM4D_MIN_AXIS for n in zp.shape):  # axes shorter than half the block
        zp = np.pad(zp, [(0, max(0, _BM4D_MIN_AXIS - n)) for n in zp.shape], mode="symmetric")
    zp = zp.astype(np.float32)
    n_pass = 1 if hard_only else 2
    report(progress, 0.0, f"BM4D 1/{n_pass} hard thresholding")
    out = _run_pass(lambda: bm4d.bm4d(zp, s, profile=profile, stage_arg=bm4d.BM4DStages.HARD_THRESHOLDING),
                    0.0, f"BM4D 1/{n_pass} hard thr.", progress, cancel, heartbeat)
    if not hard_only:
        pilot = np.asarray(out)
        report(progress, _BM4D_HARD_SHARE, "BM4D 2/2 Wiener filter")
        out = _run_pass(lambda: bm4d.bm4d(zp, s, profile=profile, stage_arg=pilot),
                        _BM4D_HARD_SHARE, "BM4D 2/2 Wiener", progress, cancel, heartbeat)
    report(progress, 1.0, "BM4D done")
    out = np.asarray(out, dtype=np.float64).reshape(zp.shape)
    return out[tuple(slice(0, n) for n in z.shape)]


def _bm3d(z: np.ndarray, s: float, spacing, opts, progress, cancel) -> np.ndarray:
    bm3d = _import_optional("bm3d")
    profile = opts.get("profile", "np")
    stage = bm3d.BM3DStages.HARD_THRESHOLDING if opts.get("stage") == "hard" else bm3d.BM3DStages.ALL_STAGES
    if z.ndim == 2:
        check_cancel(cancel)
        out = np.asarray(bm3d.bm3d(z.astype(np.float32), s, profile=profile, stage_arg=stage), dtype=np.float64)
        check_cancel(cancel)
        return out.reshape(z.shape)
    out = np.empty_like(z)
    n = z.shape[0]
    for k in range(n):  # slice-wise along z (axis 0)
        check_cancel(cancel)
        den = bm3d.bm3d(z[k].astype(np.float32), s, profile=profile, stage_arg=stage)
        out[k] = np.asarray(den, dtype=np.float64).reshape(z[k].shape)
        report(progress, (k + 1) / n, f"BM3D slice {k + 1}/{n}")
    return out


def _nlm(z: np.ndarray, s: float, spacing, opts, progress, cancel) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    check_cancel(cancel)
    two_d = z.ndim == 2
    return denoise_nl_means(
        z,
        patch_size=int(opts.get("patch_size", 5 if two_d else 3)),
        patch_distance=int(opts.get("patch_distance", 6 if two_d else 3)),
        h=float(opts.get("h_factor", 0.8)) * s,
        sigma=s,
        fast_mode=True,
        channel_axis=None,
    )


def _gaussian(z: np.ndarray, s: float, spacing, opts, progress, cancel) -> np.ndarray:
    """Gaussian smoothing, width in mm; by default the width minimising SURE.

    For a linear filter ``H`` and white noise of std ``s`` (any distribution), Stein's unbiased
    risk estimate ``||H y - y||^2 - n s^2 + 2 s^2 tr(H)`` is unbiased for ``||H y - x||^2``;
    ``tr(H) = n h(0)`` with ``h(0)`` the kernel's centre weight. Candidate widths are
    0.3..2 times the finest spacing (in mm), so thick slices are smoothed less in voxels.
    """
    from scipy.ndimage import gaussian_filter

    smin = min(spacing)
    if opts.get("sigma_mm") is not None:
        widths = [float(opts["sigma_mm"])]
    else:
        widths = [f * smin for f in (0.3, 0.4, 0.5, 0.6, 0.7, 0.85, 1.0, 1.3, 1.6, 2.0)]
    best, best_risk = None, np.inf
    n = z.size
    for k, w in enumerate(widths):
        check_cancel(cancel)
        sig = tuple(w / sp for sp in spacing)
        out = gaussian_filter(z, sigma=sig, mode="nearest")
        if len(widths) == 1:
            return out
        delta = np.zeros((9,) * z.ndim)
        delta[(4,) * z.ndim] = 1.0
        h0 = float(gaussian_filter(delta, sigma=sig, mode="constant")[(4,) * z.ndim])
        risk = float(np.sum((out - z) ** 2)) - n * s * s + 2.0 * s * s * n * h0
        if risk < best_risk:
            best, best_risk = out, risk
        report(progress, (k + 1) / len(widths), "gaussian: choosing the width (SURE)")
    return best


def _median(z: np.ndarray, s: float, spacing, opts, progress, cancel) -> np.ndarray:
    """Median filter; default footprint: the 2*ndim+1-voxel cross (face neighbours), without
    the neighbours across thick slices (spacing > 1.5 x the finest); ``size`` gives a box."""
    from scipy.ndimage import median_filter

    check_cancel(cancel)
    smin = min(spacing)
    use = [sp <= 1.5 * smin for sp in spacing]
    if opts.get("size") is not None:
        size = int(opts["size"])
        return median_filter(z, size=tuple(size if u else 1 for u in use), mode="nearest")
    fp = np.zeros((3,) * z.ndim, dtype=bool)
    centre = (1,) * z.ndim
    fp[centre] = True
    for axis, u in enumerate(use):
        if u:
            for off in (0, 2):
                idx = list(centre)
                idx[axis] = off
                fp[tuple(idx)] = True
    return median_filter(z, footprint=fp, mode="nearest")


#: Perona-Malik defaults per modality (iterations, kappa factor), tuned on real crops with
#: simulated noise (MRI 2-5 %, CT 10-25 % dose, US 4 looks).
_DIFFUSION_DEFAULTS = {"mri": (5, 1.5), "ct": (6, 1.5), "us": (15, 3.0)}


def _diffusion(z: np.ndarray, s: float, spacing, opts, progress, cancel) -> np.ndarray:
    """Perona-Malik anisotropic diffusion, conductance ``exp(-(|grad| / K)^2)``, ``K = k s``."""
    it_def, k_def = _DIFFUSION_DEFAULTS.get(opts.get("_modality", "mri"), (6, 1.5))
    iters = int(opts.get("iterations", it_def))
    K = float(opts.get("kappa_factor", k_def)) * s
    if K <= 0:
        return z.copy()
    smin = min(spacing)
    w = [(smin / sp) ** 2 for sp in spacing]  # 1 / h^2 with h in units of the finest spacing
    dt = 0.9 / (2.0 * sum(w))
    u = z.astype(np.float64, copy=True)
    for it in range(iters):
        check_cancel(cancel)
        upd = np.zeros_like(u)
        for axis, wa in enumerate(w):
            g = np.diff(u, axis=axis) * np.sqrt(wa)  # gradient in physical (finest-spacing) units
            flux = np.exp(-((g / K) ** 2)) * g * np.sqrt(wa)
            pad = [(0, 0)] * u.ndim
            pad[axis] = (1, 1)
            fp = np.pad(flux, pad)  # zero flux at the borders
            upd += np.diff(fp, axis=axis)
        u += dt * upd
        report(progress, (it + 1) / iters, f"diffusion iteration {it + 1}/{iters}")
    return u


_IMPL = {"bm4d": _bm4d, "bm3d": _bm3d, "nlm": _nlm, "gaussian": _gaussian, "median": _median, "diffusion": _diffusion}


def denoise(
    array: np.ndarray,
    method: str,
    modality: str,
    *,
    sigma: Optional[float] = None,
    spacing_zyx: Optional[Sequence[float]] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
    stabilize: bool = True,
    options: Optional[Mapping[str, Any]] = None,
) -> np.ndarray:
    """Denoise ``array`` with a classical method and the modality's noise transform.

    Args:
        array: noisy image, (z, y, x) or (y, x), file units (MRI a.u., CT HU, US 0..255).
        method: one of :data:`METHODS` (``"bm4d"`` on a 2D image runs BM3D; ``"bm3d"`` on a
            volume runs slice by slice along z).
        modality: ``"mri"``, ``"ct"`` or ``"us"``.
        sigma: noise size, ``None`` = estimated (:mod:`dualnet.estimate`): MRI Rician sigma
            (a.u.), CT noise std at water (HU), US relative speckle std ``1 / sqrt(L)``.
        spacing_zyx: voxel size in mm, array order; makes gaussian (``sigma_mm``), median and
            diffusion spacing-aware. ``None`` = isotropic.
        progress: ``progress(fraction, message)``. BM4D reports its two passes (hard
            thresholding, Wiener filter) and, while one runs, the same fraction again with the
            elapsed time every ``heartbeat_s`` seconds (the native code reports nothing finer).
        cancel: checked between slices / iterations (BM4D: between its two passes; a pass in
            progress finishes first); raises :class:`CancelledError`.
        stabilize: apply the variance-stabilising transform (False = plain Gaussian denoising
            of the raw intensities with the estimated std, for comparisons).
        options: per-method settings: ``profile`` (bm4d/bm3d, default "np"), ``stage``
            (bm4d/bm3d: "all" = hard thresholding + Wiener, default; "hard" = about twice as
            fast, hard thresholding only), ``heartbeat_s`` (bm4d: seconds between the
            elapsed-time reports during a pass, default 1), ``patch_size``,
            ``patch_distance``, ``h_factor`` (nlm, defaults 5/6/0.8 in 2D, 3/3/0.8 in 3D),
            ``sigma_mm`` (gaussian; default: the width in 0.3..2 x the finest spacing that
            minimises SURE), ``size`` (median box; default the face-neighbour cross),
            ``iterations``, ``kappa_factor`` (diffusion; defaults per modality, MRI 5/1.5,
            CT 6/1.5, US 15/3.0).

    Returns:
        float32 array, same shape, same units as ``array``.

    Raises:
        InputError: unknown method/modality, bad array. MissingDependencyError: bm4d/bm3d
        missing. CancelledError: cancelled.
    """
    m = str(method).lower()
    if m not in METHODS:
        raise InputError(f"unknown denoising method {method!r}; use one of {', '.join(METHODS)}")
    mod = str(modality).lower()
    if mod not in MODALITIES:
        raise InputError(f"unknown modality {modality!r}; use one of {', '.join(MODALITIES)}")
    a = np.asarray(array, dtype=np.float64)
    if a.ndim not in (2, 3):
        raise InputError(f"expected a 2D or 3D image, got shape {a.shape}")
    if a.size == 0 or not np.isfinite(a).all():
        raise InputError("image is empty or has NaN / Inf voxels")
    if sigma is not None and (not np.isfinite(sigma) or sigma <= 0):
        raise InputError(f"sigma must be a positive number, got {sigma}")
    spacing = tuple(float(s) for s in spacing_zyx) if spacing_zyx is not None else (1.0,) * a.ndim
    if len(spacing) != a.ndim or min(spacing) <= 0:
        raise InputError(f"spacing_zyx needs {a.ndim} positive values, got {spacing_zyx}")
    if m in ("bm4d", "bm3d"):  # fail fast, before the (possibly long) estimation
        _import_optional("bm4d" if (m == "bm4d" and a.ndim == 3) else "bm3d")
    check_cancel(cancel)
    report(progress, 0.0, f"{m}: noise model")
    tr = _transform(a, mod, sigma, stabilize)
    lo = float(tr.data.min())
    rng = float(tr.data.max()) - lo
    rng = rng if rng > 0 else 1.0
    z = (tr.data - lo) / rng
    opts = dict(options or {})
    opts.setdefault("_modality", mod)
    out = _IMPL[m](z, tr.std / rng, spacing, opts, scaled(progress, 0.05, 0.95), cancel)
    check_cancel(cancel)
    result = tr.inverse(out * rng + lo)
    if mod == "ct":
        from ..estimate import CT_PADDING_HU

        pad = a < CT_PADDING_HU
        if pad.any():  # keep out-of-field fill values (e.g. -3024) exactly as they were
            result = np.where(pad, a, result)
    report(progress, 1.0, f"{m}: done")
    return np.asarray(result, dtype=np.float32)
