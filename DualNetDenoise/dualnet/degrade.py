"""Simulate a low-resolution noisy acquisition from a clean high-resolution image.

Pipeline: Gaussian anti-alias blur (FWHM = the downsampling factor, in HR voxels, per axis)
-> block averaging by integer factors per axis -> modality noise (:func:`dualnet.noise.add_noise`)
on the low-resolution clean image. Arrays are (z, y, x) or (y, x); spacings in mm.

Per-axis factors are ``lr_factor * anisotropy`` (each may be an int or a per-axis tuple), so
``lr_factor=2`` gives (2, 2, 2), ``lr_factor=1, anisotropy=(2, 1, 1)`` gives thick slices only
and ``lr_factor=2, anisotropy=(2, 1, 1)`` gives (4, 2, 2). The HR image is cropped at the far
end of each axis to a multiple of the factor, so ``clean_hr.shape == clean_lr.shape * factors``.
LR voxel ``i`` covers HR voxels ``[i f, (i + 1) f)`` and its centre lies at HR index
``i f + (f - 1) / 2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from .errors import InputError
from .io import Volume
from .noise import DEFAULT_LEVELS, MODALITIES, RngLike, add_noise, as_generator, mri_sigma_from_level

#: CT values below this (scanner fill values outside the field of view, e.g. -2048 or -3024 HU)
#: are set to it before simulating: the Poisson-Gaussian model cannot represent less than air,
#: so the clean reference would otherwise differ from any denoised result by thousands of HU there.
CT_FLOOR_HU: float = -1024.0

FactorLike = Union[int, Sequence[int]]
_FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


@dataclass
class Degraded:
    """Result of :func:`degrade` (arrays (z, y, x) or (y, x), float32).

    Attributes:
        noisy_lr: low-resolution noisy image (network input).
        clean_lr: low-resolution clean image (denoising target).
        clean_hr: the clean input cropped to ``clean_lr.shape * factors`` (SR target).
        spacing_lr_zyx: LR voxel size in mm, array axis order (None when no spacing was given:
            then it is in HR voxel units, i.e. the factors).
        level: noise level used (add_noise units).
        modality: ``"mri"``, ``"ct"`` or ``"us"``.
        factors: integer downsampling factor per array axis.
        sigma: absolute noise size: MRI Rician sigma (a.u.), CT gain-model std at water (HU),
            US relative speckle std ``1 / sqrt(L)``.
    """

    noisy_lr: np.ndarray
    clean_lr: np.ndarray
    clean_hr: np.ndarray
    spacing_lr_zyx: Tuple[float, ...]
    level: float
    modality: str = "mri"
    factors: Tuple[int, ...] = ()
    sigma: float = float("nan")


def _per_axis(value, ndim: int, name: str) -> Tuple[float, ...]:
    if np.isscalar(value):
        return (float(value),) * ndim
    vals = tuple(float(v) for v in value)
    if len(vals) == 3 and ndim == 2:  # a 3D setting applied to a 2D image: keep (y, x)
        vals = vals[1:]
    if len(vals) != ndim:
        raise InputError(f"{name} needs {ndim} values (one per axis), got {len(vals)}")
    return vals


def lr_factors(ndim: int, lr_factor: FactorLike = 2, anisotropy: Optional[FactorLike] = None) -> Tuple[int, ...]:
    """Integer downsampling factor per array axis: ``lr_factor * anisotropy``."""
    f = _per_axis(lr_factor, ndim, "lr_factor")
    an = _per_axis(1 if anisotropy is None else anisotropy, ndim, "anisotropy")
    out = []
    for a, b in zip(f, an):
        p = a * b
        if p < 1 or abs(p - round(p)) > 1e-6:
            raise InputError(f"downsampling factors must be positive integers, got lr_factor={lr_factor}, anisotropy={anisotropy}")
        out.append(int(round(p)))
    return tuple(out)


def downsample(
    clean: np.ndarray, factors: Sequence[int], blur_fwhm: Optional[Union[float, Sequence[float]]] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """Blur then block-average ``clean`` by integer ``factors`` (per array axis).

    Args:
        clean: HR image, (z, y, x) or (y, x).
        factors: integer factor per axis.
        blur_fwhm: Gaussian FWHM in HR voxels per axis (scalar or tuple); ``None`` = the factor
            (no blur on axes with factor 1).

    Returns:
        ``(clean_lr, clean_hr_cropped)``, float32.
    """
    from scipy.ndimage import gaussian_filter

    a = np.asarray(clean, dtype=np.float32)
    nd = a.ndim
    f = tuple(int(v) for v in factors)
    if any(n < fi for n, fi in zip(a.shape, f)):
        raise InputError(f"image of shape {a.shape} is smaller than the downsampling factors {f}")
    hr = a[tuple(slice(0, (n // fi) * fi) for n, fi in zip(a.shape, f))]
    fwhm = tuple(float(v) if v > 1 else 0.0 for v in f) if blur_fwhm is None else _per_axis(blur_fwhm, nd, "blur_fwhm")
    sig = tuple(w * _FWHM_TO_SIGMA for w in fwhm)
    blurred = gaussian_filter(hr, sigma=sig, mode="nearest") if any(s > 0 for s in sig) else hr
    shape = []
    for n, fi in zip(hr.shape, f):
        shape += [n // fi, fi]
    lr = blurred.reshape(shape).mean(axis=tuple(range(1, 2 * nd, 2)))
    return lr.astype(np.float32), hr


def degrade(
    clean: np.ndarray,
    modality: str,
    level: Optional[float] = None,
    *,
    lr_factor: FactorLike = 2,
    anisotropy: Optional[FactorLike] = None,
    spacing_zyx: Optional[Sequence[float]] = None,
    blur_fwhm: Optional[Union[float, Sequence[float]]] = None,
    rng: RngLike = None,
) -> Degraded:
    """Simulate a low-resolution noisy acquisition of ``clean`` (see the module docstring).

    Args:
        clean: HR clean image, (z, y, x) or (y, x), file units (MRI a.u., CT HU, US 0..255);
            CT values below :data:`CT_FLOOR_HU` (fill values) are raised to it first.
        modality: ``"mri"``, ``"ct"`` or ``"us"``.
        level: noise level in :func:`dualnet.noise.add_noise` units (``None`` = default).
            For MRI the sigma is ``level * clean_lr.max()``.
        lr_factor: downsampling factor (int or per-axis tuple).
        anisotropy: extra per-axis factor, e.g. ``(2, 1, 1)`` for thick slices.
        spacing_zyx: HR voxel size in mm ((z, y, x) order); the LR spacing is this times the factors.
        blur_fwhm: anti-alias FWHM in HR voxels per axis (``None`` = the factor).
        rng: generator or seed.
    """
    m = str(modality).lower()
    if m not in MODALITIES:
        raise InputError(f"unknown modality {modality!r}; use one of {', '.join(MODALITIES)}")
    arr = np.asarray(clean)
    if arr.ndim not in (2, 3):
        raise InputError(f"degrade needs a 2D or 3D image, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputError("degrade needs finite voxel values (found NaN or Inf)")
    lev = DEFAULT_LEVELS[m] if level is None else float(level)
    if m == "ct":  # fill values outside the scan field (-2048, -3024) are not attenuation: air
        arr = np.maximum(arr, np.asarray(CT_FLOOR_HU, dtype=arr.dtype))
    f = lr_factors(arr.ndim, lr_factor, anisotropy)
    clean_lr, clean_hr = downsample(arr, f, blur_fwhm)
    noisy = add_noise(clean_lr, m, lev, as_generator(rng)).astype(np.float32)
    if spacing_zyx is not None:
        sp = _per_axis(spacing_zyx, arr.ndim, "spacing_zyx")
        spacing_lr = tuple(s * fi for s, fi in zip(sp, f))
    else:
        spacing_lr = tuple(float(fi) for fi in f)
    if m == "mri":
        sigma = mri_sigma_from_level(clean_lr, lev)
    elif m == "ct":
        from .noise import CT_OFFSET_HU, ct_noise_parameters

        g, s = ct_noise_parameters(lev)
        sigma = float(np.sqrt(g * CT_OFFSET_HU + s * s))
    else:
        sigma = float(1.0 / np.sqrt(lev))
    return Degraded(noisy, clean_lr, clean_hr, spacing_lr, lev, m, f, float(sigma))


def lr_geometry(volume: Volume, factors_zyx: Sequence[int]) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Spacing and origin ((x, y, z) ITK order, mm, LPS) of the LR grid of ``volume``.

    The origin moves to the centre of the first LR voxel: ``origin + D (spacing * (f - 1) / 2)``
    with ``D`` the direction matrix.
    """
    f_xyz = tuple(reversed(tuple(int(v) for v in factors_zyx)))
    nd = volume.ndim
    sp = np.asarray(volume.spacing, dtype=np.float64)
    D = np.asarray(volume.direction, dtype=np.float64).reshape(nd, nd)
    shift = D @ (sp * (np.asarray(f_xyz, dtype=np.float64) - 1.0) / 2.0)
    spacing = tuple(float(v) for v in sp * np.asarray(f_xyz))
    origin = tuple(float(v) for v in np.asarray(volume.origin) + shift)
    return spacing, origin


def degrade_volume(
    volume: Volume,
    modality: str,
    level: Optional[float] = None,
    lr_factor: FactorLike = 2,
    anisotropy: Optional[FactorLike] = None,
    seed: RngLike = None,
    *,
    blur_fwhm: Optional[Union[float, Sequence[float]]] = None,
) -> Tuple[Volume, Volume]:
    """:func:`degrade` on a :class:`Volume`; returns ``(noisy_lr, clean_lr)`` Volumes on the LR grid.

    ``anisotropy`` and ``lr_factor`` tuples are in array (z, y, x) order; the returned volumes
    carry the LR spacing (ITK (x, y, z) order), the origin shifted to the centre of the first
    LR voxel, the input's direction and metadata (plus ``dualnet_degrade`` describing the run).
    """
    d = degrade(
        volume.array, modality, level, lr_factor=lr_factor, anisotropy=anisotropy,
        spacing_zyx=volume.spacing_zyx, blur_fwhm=blur_fwhm, rng=seed,
    )
    spacing, origin = lr_geometry(volume, d.factors)
    meta = dict(volume.metadata)
    meta["dualnet_degrade"] = f"modality={d.modality} level={d.level:g} factors_zyx={'x'.join(map(str, d.factors))}"
    noisy = Volume(d.noisy_lr, spacing, origin, volume.direction, dict(meta), None)
    clean = Volume(d.clean_lr, spacing, origin, volume.direction, dict(meta), None)
    return noisy, clean
