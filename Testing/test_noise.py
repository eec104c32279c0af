"""Noise models: moments, seeding, level conventions, per-voxel std maps (real MRI/CT/US crops)."""

from __future__ import annotations

import numpy as np
import pytest

from dualnet import noise
from dualnet.errors import InputError


def test_rician_second_moment_and_background(mri_crop):
    s = 0.05 * float(mri_crop.max())
    reps = np.stack([noise.add_rician(mri_crop[:8], s, seed) for seed in range(6)])
    assert reps.dtype == np.float32 and reps.shape[1:] == mri_crop[:8].shape
    # E[M^2] = A^2 + 2 s^2, averaged over the crop
    lhs = float(np.mean(reps.astype(np.float64) ** 2))
    rhs = float(np.mean(mri_crop[:8].astype(np.float64) ** 2) + 2 * s * s)
    assert lhs == pytest.approx(rhs, rel=0.005)
    # zero signal -> Rayleigh with mean s sqrt(pi/2)
    bg = noise.add_rician(np.zeros(200_000, np.float32), s, 1)
    assert bg.mean() == pytest.approx(s * np.sqrt(np.pi / 2), rel=0.01)
    assert bg.min() >= 0


def test_seeding_reproducible_and_generator_accepted(mri_crop):
    a = noise.add_noise(mri_crop, "mri", 0.05, 7)
    b = noise.add_noise(mri_crop, "mri", 0.05, np.random.default_rng(7))
    c = noise.add_noise(mri_crop, "mri", 0.05, 8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_mri_level_is_fraction_of_max(mri_crop):
    n = noise.add_noise(mri_crop, "mri", 0.05, 0)
    bright = mri_crop > 0.5 * mri_crop.max()  # high SNR: Rician ~ Gaussian(A, s)
    resid = (n - mri_crop)[bright]
    assert resid.std() == pytest.approx(0.05 * mri_crop.max(), rel=0.05)


def test_ct_poisson_gaussian_moments(ct_volume):
    clean = ct_volume.array[40:56, 20:80, 20:80].astype(np.float32)
    dose = 0.25
    reps = np.stack([noise.add_poisson_gaussian(clean, dose, s) for s in range(8)]).astype(np.float64)
    body = clean > -900
    # unbiased in HU where the attenuation is positive
    assert abs(float((reps.mean(0) - clean)[body].mean())) < 1.0
    # per-voxel variance follows gain * (HU + 1000) + sigma^2
    gain, s = noise.ct_noise_parameters(dose)
    assert gain == pytest.approx(1000 / (dose * noise.CT_FULL_DOSE_PHOTONS))
    expected = noise.noise_std_map(clean, "ct", dose).astype(np.float64) ** 2
    measured = reps.var(0, ddof=1)
    assert measured[body].mean() / expected[body].mean() == pytest.approx(1.0, abs=0.04)
    air = clean < -990
    assert measured[air].mean() == pytest.approx(s * s + gain * np.maximum(clean[air] + 1000, 0).mean(), rel=0.15)
    # lower dose is noisier (at water about 28 HU at 25 %, 45 HU at 10 %)
    assert noise.noise_std_map(np.zeros(1), "ct", 0.10)[0] > noise.noise_std_map(np.zeros(1), "ct", 0.25)[0] > 25


def test_ct_noise_is_zero_mean_below_minus_1000_hu():
    """Air of a reconstructed scan (-1024 HU) keeps its value: only the electronic noise is added."""
    dose = 0.25
    gain, s = noise.ct_noise_parameters(dose)
    air = np.full((64, 64), -1024.0, dtype=np.float32)
    noisy = noise.add_poisson_gaussian(air, dose, 3).astype(np.float64)
    assert abs(noisy.mean() + 1024.0) < 4 * s / 64  # the old model raised it to -1000 first
    assert noisy.std() == pytest.approx(s, rel=0.05)
    # at and above -1000 HU the model is the Poisson-Gaussian count model, draw for draw
    clean = np.linspace(-1000.0, 1500.0, 4096).reshape(64, 64)
    lam = (clean + 1000.0) / gain
    g = np.random.default_rng(7)
    counts = g.poisson(lam) + noise.CT_ELECTRONIC_SIGMA * g.standard_normal(clean.shape)
    np.testing.assert_allclose(noise.add_poisson_gaussian(clean, dose, 7), counts * gain - 1000.0, atol=1e-9)


def test_speckle_gamma_moments(us_image):
    clean = us_image.array.astype(np.float32)
    n = np.stack([noise.add_speckle(clean, 4.0, s) for s in range(4)]).astype(np.float64)
    pos = clean > 20
    ratio = n[:, pos] / clean[pos]
    assert ratio.mean() == pytest.approx(1.0, abs=0.01)
    assert ratio.var() == pytest.approx(1 / 4.0, rel=0.03)
    assert np.all(n[:, clean == 0] == 0)  # multiplicative: black stays black


def test_add_noise_dispatch_and_defaults(mri_crop):
    assert noise.DEFAULT_LEVELS == {"mri": 0.05, "ct": 0.25, "us": 4.0}
    for m, (lo, hi) in noise.LEVEL_RANGES.items():
        assert lo < hi and m in noise.MODALITIES
    a = noise.add_noise(mri_crop, "mri", None, 3)
    b = noise.add_noise(mri_crop, "MRI", 0.05, 3)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError, match="modality"):
        noise.add_noise(mri_crop, "pet", 0.1, 0)
    with pytest.raises(InputError):
        noise.add_noise(mri_crop, "mri", -0.1, 0)
    with pytest.raises(InputError, match="dose"):
        noise.add_noise(mri_crop, "ct", 1.5, 0)
    with pytest.raises(InputError):
        noise.add_speckle(mri_crop, 0, 0)


def test_noise_std_map_matches_simulation(mri_crop):
    clean = mri_crop[:6]
    level = 0.08
    reps = np.stack([noise.add_noise(clean, "mri", level, s) for s in range(40)]).astype(np.float64)
    measured = reps.std(0, ddof=1)
    pmap = noise.noise_std_map(clean, "mri", level)
    assert pmap.shape == clean.shape and pmap.dtype == np.float32
    predicted = pmap.astype(np.float64)
    sigma = level * clean.max()
    # Rician std is sigma at high SNR and sqrt(2 - pi/2) sigma at zero signal
    z = noise.rician_std(np.array([0.0, 100.0]), 1.0)
    assert z[0] == pytest.approx(np.sqrt(2 - np.pi / 2), rel=1e-6) and z[1] == pytest.approx(1.0, rel=1e-3)
    assert np.median(measured / predicted) == pytest.approx(1.0, abs=0.03)
    sig = noise.noise_std_map(clean, "mri", level, kind="sigma")
    assert np.allclose(sig, sigma, rtol=1e-5)
    us = noise.noise_std_map(np.array([0.0, 100.0]), "us", 4.0)
    assert np.allclose(us, [0.0, 50.0])
