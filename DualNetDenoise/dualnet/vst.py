"""Variance-stabilising transforms (VST) and their unbiased inverses, one per noise model.

A denoiser built for additive white Gaussian noise (BM4D, BM3D, ...) is applied in the
transformed domain, where the noise std is constant; its output estimates the MEAN of the
transformed data, so the inverse must be the *exact unbiased* inverse (the map from the clean
value to that mean), not the algebraic inverse. Arrays are any shape ((z, y, x) or (y, x)).

- Rician (MRI): :func:`rician_forward` / :func:`rician_inverse`. A numerically optimised VST
  (in the spirit of Foi, "Noise estimation and removal in MR imaging: the variance-stabilization
  approach", ISBI 2011, derived here independently): a first-order VST ``f' = 1 / std(nu(m))``
  refined twice so that ``std f(M) = 1 +- 6 %`` for every SNR, tabulated once for sigma = 1 and
  scaled (``f_s(m) = f_1(m / s)``); the inverse maps ``E[f(M) | nu]`` back to ``nu``, computed by
  quadrature over the Rician density, so it is unbiased down to zero signal. The simple bias
  correction ``sqrt(max(M^2 - 2 s^2, 0))`` is :func:`rician_bias_correct`.
- Poisson-Gaussian (CT): generalized Anscombe :func:`gat_forward` and the closed-form
  approximation of its exact unbiased inverse :func:`gat_inverse_exact_unbiased` (Makitalo & Foi,
  IEEE TIP 2013).
- Gamma speckle (US): :func:`log_forward` (log with the bias ``psi(L) - ln L`` removed, noise
  std ``sqrt(psi'(L))``, see :func:`log_noise_std`) and :func:`log_inverse` (``exp``).
"""

from __future__ import annotations

import functools
from typing import Tuple

import numpy as np

from .errors import InputError

# ----------------------------------------------------------------------------- Rician

_NU_MAX = 40.0  # table end, in units of sigma; beyond it f(m) = m + const is exact enough


@functools.lru_cache(maxsize=1)
def _rician_tables() -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tables for sigma = 1: (m grid, f(m), nu grid, E[f(M) | nu]). Built once (~1 s)."""
    from scipy.integrate import cumulative_trapezoid
    from scipy.special import i0e

    from .noise import rician_mean, rician_std

    nu = np.concatenate([np.linspace(0.0, 12.0, 481), np.linspace(12.5, _NU_MAX, 56)])
    mu = rician_mean(nu, 1.0)
    sd = rician_std(nu, 1.0)
    m = np.linspace(0.0, _NU_MAX + 10.0, 10001)

    def moments(fgrid: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        mean = np.empty_like(nu)
        std = np.empty_like(nu)
        for i, v in enumerate(nu):
            sel = (m >= max(0.0, v - 9.0)) & (m <= v + 9.0)
            mm = m[sel]
            p = mm * np.exp(-0.5 * (mm - v) ** 2) * i0e(mm * v)  # Rician pdf, sigma = 1
            w = p / np.trapezoid(p, mm)
            fv = fgrid[sel]
            e = np.trapezoid(w * fv, mm)
            mean[i] = e
            std[i] = np.sqrt(np.trapezoid(w * (fv - e) ** 2, mm))
        return mean, std

    # First-order VST: slope 1 / std of the Rician whose mean is m (Rayleigh std below).
    slope = 1.0 / np.interp(m, mu, sd, left=sd[0], right=1.0)
    f = cumulative_trapezoid(slope, m, initial=0.0)
    mean, std = moments(f)
    for _ in range(2):  # flatten the residual std(nu) (first order: 0.89..1.06 -> ~0.97..1.05)
        slope = slope / np.interp(m, mu, std, left=std[0], right=1.0)
        f = cumulative_trapezoid(slope, m, initial=0.0)
        mean, std = moments(f)
    mean = np.maximum.accumulate(mean)  # monotone for the inverse
    for a in (m, f, nu, mean):  # shared by every caller (cached)
        a.setflags(write=False)
    return m, f, nu, mean


def rician_tables() -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The VST's tables for sigma = 1, read-only: ``(m, f(m), nu, E[f(M) | nu])``. ``f`` is
    increasing on the magnitude grid ``m``; ``E[f(M) | nu]`` is non-decreasing on the grid ``nu``.
    Beyond the ends both are the identity plus a constant (what :func:`rician_forward` and
    :func:`rician_inverse` use); the torch twins in :mod:`dualnet.training.losses` read these."""
    return _rician_tables()


def _check_sigma(sigma: float) -> float:
    s = float(sigma)
    if not np.isfinite(s) or s <= 0:
        raise InputError(f"noise sigma must be a positive number, got {sigma}")
    return s


def rician_forward(x: np.ndarray, sigma: float) -> np.ndarray:
    """Rician VST: noisy magnitude (same units as ``sigma``) -> domain with noise std ~1.

    Args:
        x: noisy magnitude image, any shape; negative values are treated as 0.
        sigma: Rician (per-channel Gaussian) sigma, absolute.

    Returns:
        float64 array, same shape; noise std 1 +- 6 % at every SNR.
    """
    s = _check_sigma(sigma)
    m, f, _, _ = _rician_tables()
    z = np.maximum(np.asarray(x, dtype=np.float64) / s, 0.0)
    out = np.atleast_1d(np.interp(z, m, f))
    z = np.atleast_1d(z)
    hi = z > m[-1]
    if np.any(hi):
        out[hi] = f[-1] + (z[hi] - m[-1])
    return out.reshape(np.shape(x))


def rician_inverse(y: np.ndarray, sigma: float) -> np.ndarray:
    """Exact unbiased inverse of :func:`rician_forward`: ``E[f(M) | nu] -> nu`` (times sigma).

    Args:
        y: denoised image in the VST domain (an estimate of ``E[f(M)]``).
        sigma: the sigma given to :func:`rician_forward`.

    Returns:
        Estimate of the clean magnitude (float64, >= 0), same units as ``sigma``.
    """
    s = _check_sigma(sigma)
    m, f, nu, mean = _rician_tables()
    d = np.atleast_1d(np.asarray(y, dtype=np.float64))
    out = np.interp(d, mean, nu, left=0.0)
    hi = d > mean[-1]
    if np.any(hi):
        # Beyond the table f is the identity plus a constant, so E[M] = m_end + (d - f_end)
        # and E[M] ~ sqrt(nu^2 + sigma^2) at high SNR.
        e_m = m[-1] + (d[hi] - f[-1])
        out[hi] = np.sqrt(np.maximum(e_m**2 - 1.0, 0.0))
    return (out * s).reshape(np.shape(y))


def rician_bias_correct(m: np.ndarray, sigma: float) -> np.ndarray:
    """Moment-based Rician bias correction ``sqrt(max(M^2 - 2 sigma^2, 0))``.

    Unbiased for ``E[M^2]`` (``E[M^2] = A^2 + 2 sigma^2``), meant for a smoothed magnitude or
    its local second moment; used when no VST is wanted. Same units as the input.
    """
    s = float(sigma)
    a = np.asarray(m, dtype=np.float64)
    return np.sqrt(np.maximum(a**2 - 2.0 * s**2, 0.0))


# ------------------------------------------------------------------ Poisson-Gaussian

def _check_pg(gain: float, sigma: float) -> Tuple[float, float]:
    g, s = float(gain), float(sigma)
    if not np.isfinite(g) or g <= 0:
        raise InputError(f"Poisson gain must be a positive number, got {gain}")
    if not np.isfinite(s) or s < 0:
        raise InputError(f"Gaussian sigma must be >= 0, got {sigma}")
    return g, s


def gat_forward(x: np.ndarray, gain: float, sigma: float) -> np.ndarray:
    """Generalized Anscombe transform for ``x = gain * Poisson(u / gain) + N(0, sigma^2)``.

    ``f(x) = 2 sqrt(x / gain + 3/8 + (sigma / gain)^2)`` (0 where the argument is negative),
    so the noise std is ~1. ``x`` and ``sigma`` in the same units (e.g. ``HU + 1000``);
    ``gain`` in units per count. Returns float64, same shape.
    """
    g, s = _check_pg(gain, sigma)
    arg = np.asarray(x, dtype=np.float64) / g + 0.375 + (s / g) ** 2
    return 2.0 * np.sqrt(np.maximum(arg, 0.0))


def gat_inverse_exact_unbiased(d: np.ndarray, gain: float, sigma: float) -> np.ndarray:
    """Closed-form approximation of the exact unbiased inverse of :func:`gat_forward`.

    Makitalo & Foi (2013): ``I(D) = D^2/4 + sqrt(3/2)/(4 D) - 11/(8 D^2) + 5 sqrt(3/2)/(8 D^3)
    - 1/8 - (sigma/gain)^2``, 0 below ``D = 2 sqrt(3/8)`` and clipped at 0, then multiplied
    by ``gain``. ``d`` estimates
    ``E[f(x)]``. Returns the clean-signal estimate in the units of ``x`` (float64).
    """
    g, s = _check_pg(gain, sigma)
    # Below D0 = 2 sqrt(3/8) (the GAT of a zero count) the closed form is not valid (its
    # negative powers blow up) and the clean signal is 0.
    d0 = 2.0 * np.sqrt(0.375)
    dd = np.maximum(np.asarray(d, dtype=np.float64), d0)
    r = np.sqrt(1.5)
    inv = 0.25 * dd**2 + 0.25 * r / dd - 1.375 / dd**2 + 0.625 * r / dd**3 - 0.125 - (s / g) ** 2
    return g * np.maximum(inv, 0.0)


def gat_inverse_algebraic(d: np.ndarray, gain: float, sigma: float) -> np.ndarray:
    """Plain algebraic inverse of :func:`gat_forward` (biased at low counts; for reference)."""
    g, s = _check_pg(gain, sigma)
    dd = np.asarray(d, dtype=np.float64)
    return g * ((dd / 2.0) ** 2 - 0.375 - (s / g) ** 2)


# ---------------------------------------------------------------------------- speckle

def _check_looks(looks: float) -> float:
    L = float(looks)
    if not np.isfinite(L) or L <= 0:
        raise InputError(f"speckle looks must be a positive number, got {looks}")
    return L


def log_bias(looks: float) -> float:
    """``E[ln n] = psi(L) - ln L`` for ``n ~ Gamma(L, 1/L)`` (negative)."""
    from scipy.special import digamma

    L = _check_looks(looks)
    return float(digamma(L) - np.log(L))


def log_noise_std(looks: float) -> float:
    """Noise std in the log domain, ``sqrt(psi'(L))`` (trigamma), constant over intensity."""
    from scipy.special import polygamma

    return float(np.sqrt(polygamma(1, _check_looks(looks))))


def log_forward(x: np.ndarray, looks: float, *, floor: float = 1e-3) -> np.ndarray:
    """Log transform for Gamma speckle with the bias removed: ``ln(max(x, floor)) - (psi(L) - ln L)``.

    For ``x = u n`` the result is ``ln u`` plus zero-mean noise of std :func:`log_noise_std`.
    ``floor`` (same units as ``x``) keeps zero-valued voxels finite. Returns float64.
    """
    b = log_bias(looks)
    return np.log(np.maximum(np.asarray(x, dtype=np.float64), float(floor))) - b


def log_inverse(y: np.ndarray, looks: float) -> np.ndarray:
    """Inverse of :func:`log_forward` for a denoised log image (an estimate of ``ln u``): ``exp(y)``.

    ``looks`` is accepted for symmetry (the bias was removed in :func:`log_forward`).
    """
    _check_looks(looks)
    return np.exp(np.asarray(y, dtype=np.float64))
