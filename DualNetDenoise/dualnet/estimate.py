"""Blind noise-level estimation for each modality model of :mod:`dualnet.noise`.

Arrays are numpy, (z, y, x) or (y, x), intensities in file units (MRI a.u., CT HU, US 0..255).
The building block is the finest diagonal Haar wavelet subband (HH in 2D, HHH in 3D,
orthonormal so white noise keeps its std; it cancels constant and linear trends along each
axis), combined with the median absolute deviation (Donoho: ``sigma = MAD / 0.6745``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from .errors import InputError
from .noise import CT_FULL_DOSE_PHOTONS, CT_OFFSET_HU, MODALITIES

_MAD_TO_SIGMA = 1.0 / 0.6744897501960817
#: HU below which CT voxels are treated as padding outside the field of view (air is -1000).
CT_PADDING_HU = -1100.0


def _as_array(x: np.ndarray) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim not in (2, 3):
        raise InputError(f"noise estimation needs a 2D or 3D array, got shape {a.shape}")
    if a.size == 0 or not np.isfinite(a).all():
        raise InputError("noise estimation needs a non-empty array of finite values")
    return a


def haar_blocks(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Finest Haar decomposition on non-overlapping 2^ndim blocks.

    Returns ``(mean, detail)``: the block mean and the orthonormal diagonal detail coefficient
    (noise std preserved for white noise), both of shape ``floor(shape / 2)``. Odd trailing
    rows/columns/slices are dropped. An axis of length 1 (a one-slice volume) is not paired: its
    blocks are those of the 2D image.
    """
    a = np.asarray(x, dtype=np.float64)
    a = a[_even_crop(a.shape)]
    mean = det = a
    for even, odd in _pairs(a.shape):
        # in place after the first sum / difference: no second half-volume float64 temporary
        m = np.add(mean[even], mean[odd])
        m *= 0.5
        d = np.subtract(det[even], det[odd])
        d /= np.sqrt(2.0)
        mean, det = m, d
    return mean, det


def _block_mask(mask: Optional[np.ndarray], shape: Tuple[int, ...]) -> Optional[np.ndarray]:
    """Blocks entirely inside ``mask`` (shape of the Haar subbands)."""
    if mask is None:
        return None
    m = np.asarray(mask, dtype=bool)
    if m.shape != shape:
        raise InputError(f"mask shape {m.shape} differs from image shape {shape}")
    m = m[_even_crop(m.shape)]
    for even, odd in _pairs(m.shape):
        m = m[even] & m[odd]
    return m


def _paired_axes(shape: Tuple[int, ...]) -> List[int]:
    """The axes the Haar blocks pair voxels along: all but those of length 1."""
    return [axis for axis, n in enumerate(shape) if n > 1]


def _pairs(shape: Tuple[int, ...]) -> List[Tuple[Tuple[slice, ...], Tuple[slice, ...]]]:
    """Per paired axis, the index of the even and of the odd voxels along it (the others whole)."""
    out = []
    for axis in _paired_axes(shape):
        even, odd = [slice(None)] * len(shape), [slice(None)] * len(shape)
        even[axis], odd[axis] = slice(0, None, 2), slice(1, None, 2)
        out.append((tuple(even), tuple(odd)))
    return out


def _even_crop(shape: Tuple[int, ...]) -> Tuple[slice, ...]:
    """Drop the odd trailing row / column / slice of every paired axis."""
    return tuple(slice(0, (n // 2) * 2) if n > 1 else slice(None) for n in shape)


def _constant_blocks(x: np.ndarray) -> np.ndarray:
    """Blocks (as :func:`haar_blocks`) whose voxels are all equal: no noise to measure there (fill
    values such as -1024 HU outside a CT's field of view, clipped or masked regions)."""
    a = np.asarray(x)
    a = a[_even_crop(a.shape)]
    lo = hi = a
    for even, odd in _pairs(a.shape):
        lo = np.minimum(lo[even], lo[odd])
        hi = np.maximum(hi[even], hi[odd])
    return lo == hi


def sigma_gaussian_mad(x: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """Additive white Gaussian noise sigma by the wavelet MAD rule (Donoho), same units as ``x``.

    Args:
        x: image, (z, y, x) or (y, x).
        mask: optional boolean array, same shape; only 2^ndim blocks fully inside are used.
    """
    a = _as_array(x)
    _, det = haar_blocks(a)
    bm = _block_mask(mask, a.shape)
    d = det[bm] if bm is not None else det.ravel()
    if d.size < 16:
        raise InputError("too few voxels to estimate the noise level")
    return float(np.median(np.abs(d)) * _MAD_TO_SIGMA)


def sigma_from_repeats(frames: np.ndarray, mask: Optional[np.ndarray] = None) -> Tuple[float, List[float]]:
    """Gaussian noise std from repeated acquisitions of a still object, same units as the frames.

    ``frames`` (t, z, y, x) or (t, y, x), t >= 2: e.g. the volumes of a 4D fMRI or repeated
    series. For each consecutive pair, the std of ``a - b`` over ``mask`` (default: the
    Otsu foreground of the mean frame, where Rician noise is Gaussian) without the voxels beyond 5
    robust (MAD) stds, divided by ``sqrt(2)``; the smallest over the pairs: motion, drift or a
    volume not yet at steady state only add to a difference, and over ~1e5 voxels the pairs' own
    scatter (about 0.2 %) makes the minimum's downward bias negligible. Unlike a single-image
    estimate it cannot mistake fine anatomy or a ghosted background for noise.

    Returns ``(sigma, per-pair sigmas)``.
    """
    from skimage.filters import threshold_otsu

    f = np.asarray(frames, dtype=np.float32)
    if f.ndim < 3 or f.shape[0] < 2:
        raise InputError(f"need at least 2 repeated frames (t, ...), got shape {f.shape}")
    if mask is None:
        mean = f.mean(0)
        mask = mean > threshold_otsu(mean) if np.ptp(mean) > 0 else np.ones(mean.shape, bool)
    mask = np.asarray(mask, dtype=bool)
    if int(mask.sum()) < 100:
        raise InputError("too few voxels to estimate the noise level from the repeats")
    pairs = []
    for a, b in zip(f[:-1], f[1:]):
        d = (a - b)[mask].astype(np.float64)
        d -= np.median(d)
        mad = float(np.median(np.abs(d))) * _MAD_TO_SIGMA  # coarse on integer data: only the outlier bound
        inl = d[np.abs(d) <= 5.0 * mad] if mad > 0 else d
        pairs.append(float(np.std(inl) / np.sqrt(2.0)))
    return float(min(pairs)), pairs


def _hist_mode(values: np.ndarray, hi: float, bins: int = 200) -> float:
    """Location of the highest peak of a lightly smoothed histogram of ``values`` in [0, hi]."""
    from scipy.ndimage import gaussian_filter1d

    hist, edges = np.histogram(values, bins=bins, range=(0.0, hi))
    h = gaussian_filter1d(hist.astype(np.float64), 2.0)
    k = int(np.argmax(h[1:])) + 1  # skip the first bin: exact zeros (masked / clipped voxels)
    width = edges[1] - edges[0]
    if 0 < k < bins - 1:  # parabolic refinement
        den = h[k - 1] - 2 * h[k] + h[k + 1]
        off = 0.5 * (h[k - 1] - h[k + 1]) / den if den != 0 else 0.0
    else:
        off = 0.0
    return float(edges[0] + (k + 0.5 + np.clip(off, -0.5, 0.5)) * width)


#: A Rayleigh (pure noise) background has mean(r) / sqrt(mean(r^2)) = sqrt(pi / 4).
RAYLEIGH_MOMENT_RATIO = float(np.sqrt(np.pi / 4.0))
#: Band of that ratio within which a background is taken as pure Rician noise.
RAYLEIGH_RATIO_BAND = (0.85, 0.92)


def looks_rayleigh(ratio: float) -> bool:
    """Whether :func:`rician_background`'s moment ``ratio`` is within :data:`RAYLEIGH_RATIO_BAND`
    (False for NaN: too few background windows to tell)."""
    return RAYLEIGH_RATIO_BAND[0] <= ratio <= RAYLEIGH_RATIO_BAND[1]


def sigma_rician_background(x: np.ndarray, *, min_fraction: float = 0.02) -> float:
    """Rician sigma from the background of a magnitude image; same units as ``x``.

    See :func:`rician_background` (this is its sigma).

    Raises:
        InputError: fewer than ``min_fraction`` of the voxels look like background, or more
            than 5 % of the voxels are exactly 0 (a masked background is not Rayleigh noise).
    """
    return rician_background(x, min_fraction=min_fraction)[0]


def rician_background(x: np.ndarray, *, min_fraction: float = 0.02) -> Tuple[float, float]:
    """Rician sigma from the background of a magnitude image, and how Rayleigh that background is.

    The background (no signal) of a magnitude MR image is Rayleigh distributed with mode ``sigma``.
    A first estimate is the mode of the low-intensity histogram (coarse below the Otsu threshold,
    then fine in [0, 4 mode]) refined by the Rayleigh maximum-likelihood estimate on the voxels
    below ``2 sigma``. Dim tissue near the noise floor (CSF, a skull-stripped brain's edge) pulls
    that estimate up as the noise grows (measured up to 1.33x at 10 % of the maximum), so the
    result is the mode of the LOCAL second moments instead (Aja-Fernandez et al. 2009): in the
    background the mean of ``r^2`` over a window of ``n`` voxels is Gamma distributed about
    ``2 sigma^2`` with a narrow peak (relative width ``1 / sqrt(n)``), which tissue only a little
    above the noise cannot shift; ``sigma^2 = mode * n / (n - 1) / 2``. Windows: 5^3 voxels in 3D
    (fewer slices when the volume is thinner: then 7x7 in-plane), 7x7 in 2D.

    Returns:
        ``(sigma, ratio)``: ``ratio`` is ``mean(r) / sqrt(mean(r^2))`` over the windows in the
        peak, :data:`RAYLEIGH_MOMENT_RATIO` (0.886) for pure Rayleigh noise; a background holding
        signal (ghosts, an offset) reads higher.

    Raises:
        InputError: as :func:`sigma_rician_background`.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    arr = _as_array(x)
    a = arr.ravel()
    if np.mean(a == 0) > 0.05:
        # Rician magnitudes are never exactly 0: a zeroed background was masked in processing.
        raise InputError("background is masked (many exact zeros); no Rayleigh background to measure")
    a = a[a > 0]  # the odd exact zero is a clipped voxel, not a Rayleigh sample
    if a.size < 1000:
        raise InputError("too few non-zero voxels to estimate a Rician background")
    t = float(threshold_otsu(a))
    low = a[a < t]
    if low.size < min_fraction * a.size:
        raise InputError("image has too little background to estimate the Rician sigma")
    mode = _hist_mode(low, t, bins=256)
    mode = _hist_mode(low[low < 4 * mode], 4 * mode, bins=200)
    # Truncated Rayleigh ML on [0, c s]: solve E[r^2 | r < c s] = mean(r^2) by fixed point.
    s = mode
    c = 2.0
    for _ in range(20):
        r = low[low < c * s]
        if r.size < 100:
            break
        m2 = float(np.mean(r**2))
        # E[r^2 | r < c s] = 2 s^2 * g(c) with g(c) = 1 - (c^2/2) e^{-c^2/2} / (1 - e^{-c^2/2})
        e = np.exp(-0.5 * c * c)
        g = 1.0 - 0.5 * c * c * e / (1.0 - e)
        s_new = np.sqrt(m2 / (2.0 * g))
        if abs(s_new - s) < 1e-4 * s:
            s = s_new
            break
        s = s_new
    bg_fraction = float(np.mean(a < 3.0 * s))
    if bg_fraction < min_fraction:
        raise InputError("image has too little background to estimate the Rician sigma")
    del a, low

    # Local second moments, searched below 4x the first estimate's 2 sigma^2.
    window = _moment_window(arr.shape)
    n = int(np.prod(window))
    f = arr.astype(np.float32)
    m2 = ndimage.uniform_filter(f * f, size=window, mode="reflect")
    hi = 8.0 * s * s
    v = m2[m2 < hi]
    if v.size < 100:
        return float(s), float("nan")
    peak = _hist_mode(v, hi, bins=400)
    peak = _hist_mode(v[v < 3.0 * peak], 3.0 * peak, bins=300)
    sigma = float(np.sqrt(peak * n / (n - 1) / 2.0))
    in_peak = (m2 > 0.8 * peak) & (m2 < 1.25 * peak)
    m1 = ndimage.uniform_filter(f, size=window, mode="reflect")
    ratio = float(np.mean(m1[in_peak]) / np.sqrt(np.mean(m2[in_peak]))) if in_peak.any() else float("nan")
    return sigma, ratio


def _moment_window(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """Window (per axis, same order as ``shape``) of :func:`rician_background`'s local moments."""
    if len(shape) == 2 or shape[0] == 1:
        return (1,) * (len(shape) - 2) + (7, 7)
    if shape[0] >= 5:
        return (5, 5, 5)
    return (shape[0], 7, 7)


def background_caution(noise_info: Dict[str, object]) -> Optional[str]:
    """A warning for an MRI noise sigma taken from a background that is not pure Rayleigh noise.

    ``noise_info`` is an estimate's description (:func:`dualnet.training.data.noise_variance_model`'s
    info: ``method``, ``sigma``, ``background_rayleigh_ratio``). Ghosts or an offset in the background
    raise the estimate, so the network may smooth too much; ``None`` when there is nothing to say.
    """
    ratio = noise_info.get("background_rayleigh_ratio")
    if noise_info.get("method") != "rician-background" or not isinstance(ratio, float) or looks_rayleigh(ratio):
        return None
    return (f"the image background does not look like pure noise (moment ratio {ratio:.3f}, "
            f"{RAYLEIGH_MOMENT_RATIO:.3f} for pure noise: ghosts or an offset), so the estimated noise sigma "
            f"{float(noise_info.get('sigma', float('nan'))):.4g} may be too high and the result too smooth; "
            "set the sigma yourself, or for a 4D series take it from the frames (dualnet: --sigma, --frame)")


def speckle_caution(noise_info: Dict[str, object]) -> Optional[str]:
    """A warning for an ultrasound estimate of no measurable speckle (:data:`LOOKS_RANGE`'s maximum).

    Real B-mode frames are log-compressed and their speckle is spatially correlated (grains larger
    than a pixel): the finest-scale estimate of multiplicative Gamma speckle then reads none, and the
    network, told so, leaves the frame almost as it is. ``None`` when there is nothing to say."""
    looks = noise_info.get("looks")
    if noise_info.get("modality") != "us" or noise_info.get("method") == "given" or not isinstance(looks, float):
        return None
    if looks < 0.99 * LOOKS_RANGE[1]:
        return None
    return ("no speckle was measured in this image, as on log-compressed B-mode frames whose speckle is "
            "correlated over several pixels, so the result is close to the input; --sigma sets the speckle level "
            "(the relative speckle std: 0.5 for L = 4 looks), but the shipped ultrasound model was trained on "
            "pixel-wise speckle and changes such frames little even then")


def estimate_caution(noise_info: Dict[str, object]) -> Optional[str]:
    """The warning for a doubtful estimated noise model, if any: :func:`background_caution` (MRI),
    :func:`speckle_caution` (ultrasound)."""
    return background_caution(noise_info) or speckle_caution(noise_info)


def poisson_gaussian_fit(
    x: np.ndarray, *, mask: Optional[np.ndarray] = None, n_bins: int = 40, min_count: int = 200
) -> Tuple[float, float]:
    """Fit ``var = gain * max(mean, 0) + sigma^2`` to local (mean, variance) pairs (Foi-style).

    Local means are 2^ndim block means (blocks of one repeated value left out: no noise there);
    local variances are robust (MAD) variances of the
    orthonormal diagonal Haar detail pooled over quantile bins of the block mean; the affine
    model is fitted by weighted least squares (weights ``n / var^2``), constrained to
    ``gain >= 0`` and ``sigma^2 >= 0``.

    Args:
        x: image in a domain where the noise is Poisson-Gaussian (CT: ``HU + 1000``).
        mask: optional boolean array of voxels to use.
        n_bins: number of intensity bins.
        min_count: fewest blocks per bin.

    Returns:
        ``(gain, sigma)`` in the units of ``x`` (gain per count, sigma absolute).
    """
    a = _as_array(x)
    mean, det = haar_blocks(a)
    # Blocks of one repeated value carry no noise: counted, a bin of them has zero variance and a
    # weight of 1e24 that pins the fit (a CT's -1024 HU fill outside its field of view read 4x the noise).
    keep = ~_constant_blocks(a)
    bm = _block_mask(mask, a.shape)
    if bm is not None:
        keep &= bm
    mean, det = mean[keep], det[keep]
    if mean.size < 2 * min_count:
        flat = " that vary (the rest is one repeated value)" if not keep.all() else ""
        raise InputError(f"too few voxels{flat} to fit a Poisson-Gaussian noise model")
    order = np.argsort(mean, kind="stable")
    nb = int(max(2, min(n_bins, mean.size // min_count)))
    groups = np.array_split(order, nb)
    mu, var, cnt = [], [], []
    for idx in groups:
        d = det[idx]
        m = mean[idx]
        mu.append(float(np.mean(m)))
        var.append(float((np.median(np.abs(d)) * _MAD_TO_SIGMA) ** 2))
        cnt.append(idx.size)
    # The Poisson term of a count is never negative: a bin whose mean lies below 0 (CT air under
    # -1000 HU, down to -1024) carries the signal-independent variance only.
    mu_a = np.maximum(np.array(mu), 0.0)
    var_a, n_a = np.array(var), np.array(cnt, dtype=np.float64)
    w = n_a / np.maximum(var_a, 1e-12) ** 2
    gain, s2 = _wls_affine(mu_a, var_a, w)
    # One reweighting pass with the fitted variances (less sensitive to noisy bins).
    fitted = np.maximum(gain * mu_a + s2, 1e-12)
    gain, s2 = _wls_affine(mu_a, var_a, n_a / fitted**2)
    return float(gain), float(np.sqrt(s2))


#: Plausible given noise levels: this fraction of the image's intensity span (MRI, CT) ...
SIGMA_SPAN = (1e-6, 10.0)
#: ... and, for ultrasound, the relative speckle std 1 / sqrt(looks).
SIGMA_US = (1e-3, 10.0)


def check_sigma(sigma: float, modality: str, array: Optional[np.ndarray] = None) -> float:
    """A given noise level (``--sigma``, in the units :func:`estimate_noise` reports) checked for
    ``modality``: a positive number, and within the plausible range: US :data:`SIGMA_US` of the
    relative speckle std; MRI and CT :data:`SIGMA_SPAN` of the intensity span of ``array`` (not checked
    without one, or for a constant image). Returns it as a float; :class:`InputError` says why not."""
    s = float("nan")
    if not isinstance(sigma, (bool, np.bool_, str, bytes)):
        try:
            s = float(sigma)
        except (TypeError, ValueError, OverflowError):
            pass
    if not np.isfinite(s) or s <= 0:
        raise InputError(f"the noise sigma must be a positive number, got {sigma!r}")
    modality = str(modality).lower()
    array = None if array is None else np.asarray(array)
    if modality == "us":
        lo, hi, unit = SIGMA_US[0], SIGMA_US[1], "relative speckle std 1/sqrt(looks)"
    elif array is None or not array.size:
        return s
    else:
        span = float(np.max(array)) - float(np.min(array))
        if not (np.isfinite(span) and span > 0):
            return s
        what = "HU at water" if modality == "ct" else "image units"
        lo, hi, unit = SIGMA_SPAN[0] * span, SIGMA_SPAN[1] * span, f"{what}; intensity span {span:.4g}"
    if not lo <= s <= hi:
        raise InputError(f"{s:g} is outside the plausible range {lo:.3g} to {hi:.3g} ({unit})")
    return s


def ct_dose(gain: float) -> float:
    """The dose fraction of the :mod:`dualnet.noise` CT model whose Poisson gain (HU per count) is
    ``gain``; inf for no signal-dependent noise (``gain <= 0``)."""
    return CT_OFFSET_HU / (float(gain) * CT_FULL_DOSE_PHOTONS) if gain > 0 else float("inf")


def scale_ct_noise_to_water(gain: float, electronic_sigma: float, sigma_water: float,
                            offset_hu: float = CT_OFFSET_HU) -> Tuple[float, float]:
    """A CT Poisson-Gaussian noise model ``var(HU) = gain (HU + offset_hu) + electronic_sigma^2``
    scaled so that its std at water (0 HU) is ``sigma_water`` (HU), its shape (the ratio of the
    signal-dependent to the electronic part) kept.

    This is what a given CT ``--sigma`` means everywhere: the noise std a user measures in water or
    homogeneous soft tissue sets the level; the scan's own fit sets how it grows with the signal. A
    fit with no signal dependence (``gain <= 0``) becomes white noise of that std.

    Returns:
        ``(gain, electronic_sigma)`` scaled (gain in HU per count, sigma in HU).
    """
    s = check_sigma(sigma_water, "ct")
    g, e = max(float(gain), 0.0), float(electronic_sigma)
    water = float(np.sqrt(g * offset_hu + e * e))
    if g <= 0 or not water > 0:
        return 0.0, s
    k = s / water
    return g * k * k, e * k


def _wls_affine(xv: np.ndarray, yv: np.ndarray, w: np.ndarray) -> Tuple[float, float]:
    """Weighted least squares ``y = a x + b`` with ``a, b >= 0``."""
    W = np.sum(w)
    mx, my = np.sum(w * xv) / W, np.sum(w * yv) / W
    sxx = np.sum(w * (xv - mx) ** 2)
    a = np.sum(w * (xv - mx) * (yv - my)) / sxx if sxx > 0 else 0.0
    b = my - a * mx
    if a < 0:  # no signal dependence: pure Gaussian
        return 0.0, max(float(my), 0.0)
    if b < 0:  # no signal-independent part: pure Poisson through the origin
        sxx0 = np.sum(w * xv**2)
        return (float(np.sum(w * xv * yv) / sxx0) if sxx0 > 0 else 0.0), 0.0
    return float(a), float(b)


#: The range of speckle looks :func:`speckle_looks` can tell apart; its maximum means "no measurable speckle".
LOOKS_RANGE = (0.5, 128.0)


@functools.lru_cache(maxsize=4)
def _log_mad_table(ndim: int) -> Tuple[np.ndarray, np.ndarray]:
    """Monte-Carlo table (fixed seed) of the MAD-based std of the Haar detail of ``ln Gamma(L, 1/L)``
    against ``L``: log-Gamma noise is skewed, so ``MAD / 0.6745`` differs from ``sqrt(psi'(L))``."""
    looks = np.geomspace(LOOKS_RANGE[0], LOOKS_RANGE[1], 40)
    rng = np.random.default_rng(12345)
    n = 2**ndim
    vals = np.empty_like(looks)
    signs = np.array([np.prod([1 if (k >> b) & 1 == 0 else -1 for b in range(ndim)]) for k in range(n)])
    for i, L in enumerate(looks):
        g = np.log(rng.gamma(L, 1.0 / L, size=(200000, n)))
        d = (g @ signs) / np.sqrt(n)
        vals[i] = np.median(np.abs(d)) * _MAD_TO_SIGMA
    return looks, vals  # vals decreases with looks


def speckle_looks(x: np.ndarray, *, mask: Optional[np.ndarray] = None, floor: Optional[float] = None) -> float:
    """Number of looks ``L`` of multiplicative Gamma speckle (``y = x n``, ``n ~ Gamma(L, 1/L)``).

    The robust std of the diagonal Haar detail of ``ln y`` is matched against a Monte-Carlo
    table of the same statistic for pure log-Gamma noise. Blocks containing voxels at or below
    ``floor`` (default 1 % of the 99th percentile) are ignored. Texture of the underlying image
    adds to the measured std, so ``L`` is biased low on strongly textured images. The result
    is clamped to [0.5, 128] (the table range; 128 means "no measurable speckle").
    """
    a = _as_array(x)
    fl = float(floor) if floor is not None else 0.01 * float(np.percentile(a, 99))
    valid = a > fl if mask is None else (np.asarray(mask, dtype=bool) & (a > fl))
    _, det = haar_blocks(np.log(np.maximum(a, max(fl, 1e-12))))
    bm = _block_mask(valid, a.shape)
    d = det[bm]
    if d.size < 100:
        raise InputError("too few non-zero pixels to estimate speckle looks")
    s = float(np.median(np.abs(d)) * _MAD_TO_SIGMA)
    looks, vals = _log_mad_table(len(_paired_axes(a.shape)))  # the blocks' dimension (a one-slice volume: 2)
    # interp needs increasing x: vals decrease with looks.
    return float(np.exp(np.interp(s, vals[::-1], np.log(looks[::-1]))))


@dataclass
class NoiseEstimate:
    """Result of :func:`estimate_noise`.

    Attributes:
        modality: ``"mri"``, ``"ct"`` or ``"us"``.
        level: the level in :func:`dualnet.noise.add_noise` units (MRI sigma / clean-max
            estimate, CT dose fraction, US looks).
        sigma: absolute noise size: MRI Rician sigma (a.u.), CT noise std at water (HU),
            US relative std of the speckle ``1 / sqrt(L)`` (unitless).
        method: how it was estimated.
        params: model parameters (e.g. CT ``gain``, ``electronic_sigma`` in HU; MRI ``peak`` and, where
            a background was measured, ``background_rayleigh_ratio``: 0.886 for pure Rayleigh noise).
    """

    modality: str
    level: float
    sigma: float
    method: str
    params: Dict[str, float] = field(default_factory=dict)

    def __float__(self) -> float:
        return float(self.level)


def _robust_peak(a: np.ndarray, sigma: float) -> float:
    """Estimate of the clean maximum from a noisy image: ``max(x) - 2 sigma``.

    The brightest noisy voxel overshoots the clean maximum by about two noise stds on brain
    MRI (measured 4-8 % error on the ADNI T1 at 2-10 % noise); never below half the max.
    """
    top = float(np.max(a))
    return float(max(top - 2.0 * sigma, 0.5 * top))


def estimate_noise(x: np.ndarray, modality: str, *, mask: Optional[np.ndarray] = None) -> NoiseEstimate:
    """Estimate the noise level of a noisy image for ``modality``.

    - MRI: Rician sigma from the background (:func:`sigma_rician_background`) when there is
      enough background, else wavelet MAD on the voxels above the Otsu threshold (high SNR,
      where Rician ~ Gaussian). ``level = sigma / peak`` with ``peak`` the max of a 3-voxel
      ``max(x) - 2 sigma`` (an estimate of the clean maximum that add_noise uses). The
      background estimate is rejected (MAD used instead) when it exceeds twice the
      foreground MAD estimate (no real background, e.g. a crop inside the brain), or when the
      background is not Rayleigh (:func:`rician_background`'s moment ratio outside
      :data:`RAYLEIGH_RATIO_BAND`: ghosts or an offset, which only raise it) and the MAD is lower.
    - CT (HU): :func:`poisson_gaussian_fit` on ``HU + 1000`` (voxels below
      :data:`CT_PADDING_HU` left out); ``level = 1000 / (gain * N_full)``
      (dose fraction of the :mod:`dualnet.noise` model), ``sigma`` = std at water.
    - US: :func:`speckle_looks`; ``level = L``, ``sigma = 1 / sqrt(L)``.

    ``float(result)`` gives the level. Arrays (z, y, x) or (y, x); a one-slice volume (1, y, x), as
    a 2D slice stored in a 3D file or a Slicer node, is estimated as the 2D image it is.
    """
    m = str(modality).lower()
    if m not in MODALITIES:
        raise InputError(f"unknown modality {modality!r}; use one of {', '.join(MODALITIES)}")
    a = _as_array(x)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
        if mask is not None and np.ndim(mask) == 3:
            mask = np.asarray(mask)[0]
    if m == "mri":
        from skimage.filters import threshold_otsu

        fg = a > threshold_otsu(a)
        s_mad = sigma_gaussian_mad(a, mask=fg if mask is None else (fg & np.asarray(mask, bool)))
        extra: Dict[str, float] = {}
        try:
            s, ratio = rician_background(a)
            if np.isfinite(ratio):
                extra["background_rayleigh_ratio"] = ratio
            method = "rician-background"
            # signal in the background (ghosts, an offset) can only raise its estimate
            if s > 2.0 * s_mad or (not looks_rayleigh(ratio) and s > s_mad):
                s, method = s_mad, "wavelet-mad-foreground"
        except InputError:
            s, method = s_mad, "wavelet-mad-foreground"
        peak = _robust_peak(a, s)
        level = s / peak if peak > 0 else float("nan")
        return NoiseEstimate("mri", float(level), float(s), method, {"peak": peak, **extra})
    if m == "ct":
        fov = a > CT_PADDING_HU  # leave out-of-field padding (-1024 .. -3024 fill values) out
        if mask is not None:
            fov &= np.asarray(mask, dtype=bool)
        # HU + 1000 in place when ``a`` is our own float64 copy (not the caller's array)
        y = a.copy() if np.may_share_memory(a, x) else a
        y += CT_OFFSET_HU
        del a
        gain, s = poisson_gaussian_fit(y, mask=fov if not fov.all() else None)
        sig = s if gain <= 0 else float(np.sqrt(gain * CT_OFFSET_HU + s**2))
        return NoiseEstimate(
            "ct", ct_dose(gain), sig, "poisson-gaussian-fit",
            {"gain": float(gain), "electronic_sigma": float(s)},
        )
    L = speckle_looks(a, mask=mask)
    return NoiseEstimate("us", L, float(1.0 / np.sqrt(L)), "log-haar-mad", {"looks": L})


def own_noise_std_map(reference: np.ndarray, modality: str) -> np.ndarray:
    """Per-voxel std (image units) of the noise a real "clean" reference scan already carries,
    estimated from the reference itself with :func:`estimate_noise` (its acquisition noise, plus
    whatever fine structure the estimator mistakes for noise: an upper estimate).

    A simulation adds noise on top of it, so the noise of the simulated input is
    ``sqrt(simulated std^2 + own std^2)``. On real CT references it matters at high dose
    fractions: their own quantum noise can exceed the simulated full-dose noise. Ultrasound: zero
    (the reference's speckle is the signal the speckle model multiplies). Arrays (z, y, x) or (y, x).
    """
    from .training.data import noise_variance_model, variance_at

    a = np.asarray(reference, dtype=np.float32)
    if str(modality).lower() == "us":
        return np.zeros(a.shape, np.float32)
    coef, _ = noise_variance_model(a, modality)
    return np.sqrt(variance_at(a, coef))


def input_noise_std_map(simulated_std: np.ndarray, reference: np.ndarray, modality: str) -> np.ndarray:
    """Per-voxel std (image units) of all the noise in an input simulated from a real reference:
    ``sqrt(simulated_std^2 + own^2)`` with ``own`` from :func:`own_noise_std_map` (independent
    noises add in variance). Arrays of the reference's shape, (z, y, x) or (y, x)."""
    own = own_noise_std_map(reference, modality)
    return np.sqrt(np.square(np.asarray(simulated_std, dtype=np.float32)) + np.square(own))
