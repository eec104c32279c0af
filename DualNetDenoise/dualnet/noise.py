"""Modality noise models: Rician (MRI), Poisson-Gaussian low-dose (CT), Gamma speckle (US).

Arrays are numpy, (z, y, x) for volumes and (y, x) for 2D images; intensities are in the
file's units (MRI arbitrary units, CT Hounsfield units, US grey levels 0..255). Every random
function takes ``rng: np.random.Generator | int | None`` (a generator, a seed, or fresh entropy).

Models
------
MRI (Rician magnitude)
    ``M = sqrt((A + s n1)^2 + (s n2)^2)`` with ``n1, n2 ~ N(0, 1)`` independent, ``A`` the clean
    magnitude and ``s`` the per-channel Gaussian sigma (same units as ``A``). ``E[M^2] = A^2 + 2 s^2``.
    ``add_noise`` level: ``s`` as a fraction of the clean maximum (0.05 = 5 %).

CT (image-domain Poisson-Gaussian low-dose model)
    The HU value is mapped to a photon-equivalent count proportional to the linear attenuation,
    ``q = N_full * (HU + 1000) / 1000`` (water = ``N_full`` counts at full dose, air = 0). A scan
    at dose fraction ``d`` keeps each count with probability ``d`` (binomial thinning of a Poisson
    count is Poisson), so ``c ~ Poisson(d q) + N(0, sigma_e^2)`` where ``sigma_e`` is the
    electronic (detector read-out) noise in counts, independent of dose. The count is mapped back
    with the dose-corrected scale, ``HU' = 1000 c / (d N_full) - 1000``. The noise is zero-mean
    around the clean value: below -1000 HU (air of a reconstructed scan, often -1024), where the
    expected count is 0, the clean value is kept and only the electronic term is added (raising it
    to -1000 first would bias the noisy air by up to +24 HU). In the shifted domain
    ``y = HU + 1000`` the noise is exactly Poisson-Gaussian, ``y' = g Poisson(y / g) + N(0, s^2)``,
    with gain ``g = 1000 / (d N_full)`` (HU per count) and ``s = g sigma_e`` (HU), which is what
    :func:`dualnet.vst.gat_forward` and :func:`dualnet.estimate.poisson_gaussian_fit` use.
    Noise std at water is ``1000 / sqrt(d N_full)`` HU plus the electronic term: with the defaults
    (``N_full = 5000``, ``sigma_e = 10``) about 29 HU at 25 % dose and 47 HU at 10 % dose.
    This is a voxel-wise model, not a projection-domain (sinogram + FBP) simulation: the added
    noise is white and its variance grows with attenuation; real low-dose CT noise is spatially
    correlated and depends on the whole ray path. ``add_noise`` level: the dose fraction ``d``.

US (multiplicative Gamma speckle)
    ``y = x n`` with ``n ~ Gamma(L, 1/L)`` (mean 1, variance ``1/L``), ``L`` the number of looks.
    Values are not clipped to 0..255. ``add_noise`` level: ``L``.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import numpy as np

from .errors import InputError

RngLike = Union[np.random.Generator, int, None]

MODALITIES: Tuple[str, ...] = ("mri", "ct", "us")

#: Default noise level per modality in ``add_noise`` units (MRI sigma / clean max, CT dose
#: fraction, US looks).
DEFAULT_LEVELS: Dict[str, float] = {"mri": 0.05, "ct": 0.25, "us": 4.0}

#: Sensible (inclusive) ranges of the level per modality, used to sample training noise.
#: For CT a LOWER dose is noisier; for US FEWER looks are noisier.
LEVEL_RANGES: Dict[str, Tuple[float, float]] = {
    "mri": (0.01, 0.15),
    "ct": (0.10, 0.50),
    "us": (1.0, 16.0),
}

#: Version of each modality's simulated noise (part of the evaluation study's cache keys). CT 2:
#: the noise is zero-mean around clean values below -1000 HU (version 1 raised them to -1000).
NOISE_MODEL_VERSION: Dict[str, int] = {"mri": 1, "ct": 2, "us": 1}

#: Offset that maps HU to the non-negative attenuation-proportional domain (air = 0).
CT_OFFSET_HU: float = 1000.0
#: Photon-equivalent count of a water voxel at full dose (CT model, see module docstring).
CT_FULL_DOSE_PHOTONS: float = 5000.0
#: Electronic (read-out) noise standard deviation in counts (CT model).
CT_ELECTRONIC_SIGMA: float = 10.0


def as_generator(rng: RngLike) -> np.random.Generator:
    """Return ``rng`` if it is a Generator, else ``np.random.default_rng(rng)`` (seed or None)."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _as_float(clean: np.ndarray) -> np.ndarray:
    arr = np.asarray(clean)
    if arr.dtype == np.float64:
        return arr
    return arr.astype(np.float32 if arr.dtype.itemsize <= 4 or arr.dtype == np.float32 else np.float64)


def _check_modality(modality: str) -> str:
    m = str(modality).lower()
    if m not in MODALITIES:
        raise InputError(f"unknown modality {modality!r}; use one of {', '.join(MODALITIES)}")
    return m


def check_level(modality: str, level) -> float:
    """The noise ``level`` of ``modality`` as a float, or InputError: every level is finite and
    > 0 (MRI sigma / max, US looks); a CT dose fraction is also at most 1 (full dose)."""
    m = _check_modality(modality)
    try:
        lev = float(level)
    except (TypeError, ValueError):
        raise InputError(f"noise level {level!r} is not a number") from None
    if not np.isfinite(lev) or lev <= 0 or (m == "ct" and lev > 1):
        rule = "in (0, 1] (dose fraction; 1 = full dose)" if m == "ct" else "a positive number"
        raise InputError(f"{m} noise level {level!r} must be {rule}")
    return lev


def add_rician(clean: np.ndarray, sigma: float, rng: RngLike = None) -> np.ndarray:
    """Rician magnitude noise ``sqrt((A + s n1)^2 + (s n2)^2)``.

    Args:
        clean: noise-free magnitude ``A`` (any shape, e.g. (z, y, x)); negative values are
            treated as their magnitude.
        sigma: per-channel Gaussian standard deviation ``s``, absolute (same units as ``clean``).
        rng: generator or seed.

    Returns:
        Noisy magnitude, float (float32 unless ``clean`` is float64), same shape.
    """
    if sigma < 0:
        raise InputError(f"Rician sigma must be >= 0, got {sigma}")
    a = _as_float(clean)
    g = as_generator(rng)
    n1 = g.standard_normal(a.shape, dtype=a.dtype)
    n2 = g.standard_normal(a.shape, dtype=a.dtype)
    return np.hypot(a + a.dtype.type(sigma) * n1, a.dtype.type(sigma) * n2).astype(a.dtype, copy=False)


def ct_noise_parameters(
    dose: float,
    *,
    electronic_sigma: float = CT_ELECTRONIC_SIGMA,
    full_dose_photons: float = CT_FULL_DOSE_PHOTONS,
) -> Tuple[float, float]:
    """Poisson-Gaussian parameters ``(gain, sigma)`` of the CT model in the ``HU + 1000`` domain.

    ``gain = 1000 / (dose * full_dose_photons)`` (HU per count) and ``sigma = gain *
    electronic_sigma`` (HU), so that ``var(HU') = gain * (HU + 1000) + sigma^2``.
    """
    if not 0 < dose <= 1:
        raise InputError(f"CT dose fraction must be in (0, 1], got {dose}")
    if full_dose_photons <= 0 or electronic_sigma < 0:
        raise InputError("CT full_dose_photons must be > 0 and electronic_sigma >= 0")
    gain = CT_OFFSET_HU / (dose * full_dose_photons)
    return gain, gain * electronic_sigma


def add_poisson_gaussian(
    clean_hu: np.ndarray,
    dose: float,
    rng: RngLike = None,
    *,
    electronic_sigma: float = CT_ELECTRONIC_SIGMA,
    full_dose_photons: float = CT_FULL_DOSE_PHOTONS,
) -> np.ndarray:
    """Simulate a low-dose CT scan from a (full-dose) image in HU (model in the module docstring).

    Args:
        clean_hu: clean image in Hounsfield units, (z, y, x) or (y, x).
        dose: dose fraction in (0, 1] (0.25 = quarter dose).
        rng: generator or seed.
        electronic_sigma: electronic noise standard deviation in counts (dose independent).
        full_dose_photons: photon-equivalent count of a water voxel at full dose.

    Returns:
        Noisy image in HU (float32 unless ``clean_hu`` is float64), same shape.
    """
    a = _as_float(clean_hu)
    g = as_generator(rng)
    gain, _ = ct_noise_parameters(dose, electronic_sigma=electronic_sigma, full_dose_photons=full_dose_photons)
    # Expected counts at this dose: proportional to the attenuation (air and below -> 0).
    a64 = a.astype(np.float64)
    lam = np.maximum(a64 + CT_OFFSET_HU, 0.0) / gain
    # The noise is added around the clean value (zero mean, as in a linear reconstruction): for
    # HU >= -1000 this is exactly gain * counts - 1000; below -1000 (air in a reconstructed scan,
    # often -1024) the clean value is kept instead of being raised to -1000 before the noise.
    out = g.poisson(lam).astype(np.float64)
    out -= lam
    del lam
    out *= gain
    if electronic_sigma > 0:
        out += (gain * electronic_sigma) * g.standard_normal(a.shape)
    out += a64
    return out.astype(a.dtype, copy=False)


def add_speckle(clean: np.ndarray, looks: float, rng: RngLike = None) -> np.ndarray:
    """Multiplicative speckle ``y = x n`` with ``n ~ Gamma(shape=L, scale=1/L)`` (mean 1).

    Args:
        clean: clean intensities (e.g. US grey levels 0..255), (y, x) or (z, y, x).
        looks: number of looks ``L`` > 0 (smaller = stronger speckle; variance of n is 1/L).
        rng: generator or seed.

    Returns:
        Noisy intensities (float32 unless ``clean`` is float64), not clipped.
    """
    if looks <= 0:
        raise InputError(f"speckle looks must be > 0, got {looks}")
    a = _as_float(clean)
    g = as_generator(rng)
    n = g.gamma(shape=float(looks), scale=1.0 / float(looks), size=a.shape)
    return (a * n).astype(a.dtype, copy=False)


def mri_sigma_from_level(clean: np.ndarray, level: float) -> float:
    """Absolute Rician sigma for an MRI level (fraction of the clean maximum)."""
    peak = float(np.max(np.abs(clean))) if np.size(clean) else 0.0
    return float(level) * peak


def add_noise(clean: np.ndarray, modality: str, level: Optional[float] = None, rng: RngLike = None) -> np.ndarray:
    """Add the noise of ``modality`` at ``level`` (``None`` = :data:`DEFAULT_LEVELS`).

    Levels: MRI Rician sigma as a fraction of ``clean.max()``; CT dose fraction (HU input);
    US number of looks. Arrays (z, y, x) or (y, x); returns float, same shape.
    """
    m = _check_modality(modality)
    lev = DEFAULT_LEVELS[m] if level is None else check_level(m, level)
    if m == "mri":
        return add_rician(clean, mri_sigma_from_level(clean, lev), rng)
    if m == "ct":
        return add_poisson_gaussian(clean, lev, rng)
    return add_speckle(clean, lev, rng)


def rician_mean(nu: np.ndarray, sigma: float) -> np.ndarray:
    """Mean of a Rician variable with underlying magnitude ``nu`` and Gaussian ``sigma``.

    ``E[M] = s sqrt(pi/2) L_{1/2}(-nu^2 / (2 s^2))`` evaluated with scaled Bessel functions.
    """
    from scipy.special import i0e, i1e

    nu = np.abs(np.asarray(nu, dtype=np.float64))
    if sigma <= 0:
        return nu
    t = nu**2 / (4.0 * sigma**2)  # half of nu^2 / (2 s^2)
    lag = (1.0 + 2.0 * t) * i0e(t) + 2.0 * t * i1e(t)
    return sigma * np.sqrt(np.pi / 2.0) * lag


def rician_std(nu: np.ndarray, sigma: float) -> np.ndarray:
    """Standard deviation of a Rician variable: ``sqrt(nu^2 + 2 s^2 - E[M]^2)``."""
    nu = np.abs(np.asarray(nu, dtype=np.float64))
    if sigma <= 0:
        return np.zeros_like(nu)
    mean = rician_mean(nu, sigma)
    var = nu**2 + 2.0 * sigma**2 - mean**2
    # Guard the cancellation at high SNR, where the variance tends to sigma^2.
    return np.sqrt(np.clip(var, 0.0, None))


def noise_std_map(clean: np.ndarray, modality: str, level: Optional[float] = None, *, kind: str = "std") -> np.ndarray:
    """Per-voxel noise standard deviation of the simulated model, same units as ``clean``.

    Args:
        clean: the clean image that ``add_noise`` receives ((z, y, x) or (y, x)).
        modality: ``"mri"``, ``"ct"`` or ``"us"``.
        level: as in :func:`add_noise` (``None`` = default).
        kind: ``"std"`` = exact standard deviation of the noisy voxel around its mean (Rician
            std for MRI, ``sqrt(gain max(HU+1000, 0) + s^2)`` for CT, ``x / sqrt(L)`` for US);
            ``"sigma"`` = the model's Gaussian parameter (MRI: the constant Rician sigma;
            identical to ``"std"`` for CT and US).

    Returns:
        float32 array, same shape as ``clean``.
    """
    m = _check_modality(modality)
    lev = DEFAULT_LEVELS[m] if level is None else float(level)
    if kind not in ("std", "sigma"):
        raise InputError(f"kind must be 'std' or 'sigma', got {kind!r}")
    a = np.asarray(clean, dtype=np.float64)
    if m == "mri":
        s = mri_sigma_from_level(a, lev)
        out = np.full(a.shape, s) if kind == "sigma" else rician_std(a, s)
    elif m == "ct":
        gain, s = ct_noise_parameters(lev)
        out = np.sqrt(gain * np.maximum(a + CT_OFFSET_HU, 0.0) + s**2)
    else:
        out = np.abs(a) / np.sqrt(lev)
    return out.astype(np.float32)
