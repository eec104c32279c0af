"""Low-resolution degradation: shapes, factors, LR geometry, noise, 2D images."""

from __future__ import annotations

import numpy as np
import pytest

from dualnet import degrade, noise
from dualnet.errors import InputError
from dualnet.io import Volume


def test_shapes_factors_and_crop(mri_crop):
    d = degrade.degrade(mri_crop[:, :63, :], "mri", 0.05, lr_factor=2, rng=0)
    assert d.factors == (2, 2, 2)
    assert d.noisy_lr.shape == d.clean_lr.shape == (20, 31, 32)
    assert d.clean_hr.shape == (40, 62, 64)  # cropped to a multiple of the factor
    assert d.noisy_lr.dtype == np.float32 and d.modality == "mri" and d.level == 0.05
    assert d.spacing_lr_zyx == (2.0, 2.0, 2.0)
    # thick slices only, and the product rule
    assert degrade.degrade(mri_crop, "mri", lr_factor=1, anisotropy=(2, 1, 1), rng=0).clean_lr.shape == (20, 64, 64)
    assert degrade.lr_factors(3, 2, (2, 1, 1)) == (4, 2, 2)
    with pytest.raises(InputError):
        degrade.lr_factors(3, 1.5)
    with pytest.raises(InputError):
        degrade.degrade(mri_crop, "mri", lr_factor=(2, 2), rng=0)


def test_clean_lr_is_blurred_block_mean(mri_crop):
    no_blur = degrade.degrade(mri_crop, "mri", lr_factor=2, blur_fwhm=0, rng=0)
    block = mri_crop.reshape(20, 2, 32, 2, 32, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(no_blur.clean_lr, block, rtol=1e-5, atol=1e-3)
    blurred = degrade.degrade(mri_crop, "mri", lr_factor=2, rng=0)  # FWHM = 2 HR voxels
    # anti-alias blur smooths: less high-frequency energy than plain block averaging
    assert np.abs(np.diff(blurred.clean_lr, axis=2)).mean() < np.abs(np.diff(block, axis=2)).mean()
    assert abs(blurred.clean_lr.mean() - mri_crop.mean()) < 0.01 * mri_crop.mean()  # mean kept


def test_noise_applied_at_lr_with_level(mri_crop):
    d = degrade.degrade(mri_crop, "mri", 0.05, lr_factor=2, rng=1)
    bright = d.clean_lr > 0.5 * d.clean_lr.max()
    resid = (d.noisy_lr - d.clean_lr)[bright]
    assert resid.std() == pytest.approx(0.05 * d.clean_lr.max(), rel=0.08)
    assert d.sigma == pytest.approx(0.05 * d.clean_lr.max())
    again = degrade.degrade(mri_crop, "mri", 0.05, lr_factor=2, rng=1)
    np.testing.assert_array_equal(d.noisy_lr, again.noisy_lr)


def test_ct_and_us_2d(ct_volume, us_image):
    ct = ct_volume.array[40:60, 10:90, 10:90].astype(np.float32)
    d = degrade.degrade(ct, "ct", 0.25, lr_factor=2, spacing_zyx=(3.0, 3.0, 3.0), rng=2)
    assert d.spacing_lr_zyx == (6.0, 6.0, 6.0)
    water = np.abs(d.clean_lr) < 60
    std = (d.noisy_lr - d.clean_lr)[water].std()
    assert std == pytest.approx(noise.noise_std_map(np.zeros(1), "ct", 0.25)[0], rel=0.15)
    img = us_image.array.astype(np.float32)
    d2 = degrade.degrade(img, "us", None, lr_factor=2, anisotropy=(1, 1, 1), spacing_zyx=us_image.spacing_zyx, rng=3)
    assert d2.noisy_lr.shape == (256, 256) and d2.level == 4.0 and d2.spacing_lr_zyx == (2.0, 2.0)
    pos = d2.clean_lr > 30
    assert (d2.noisy_lr[pos] / d2.clean_lr[pos]).var() == pytest.approx(0.25, rel=0.1)


def test_degrade_volume_geometry(mri_crop):
    import SimpleITK as sitk

    theta = np.deg2rad(30)
    direction = (np.cos(theta), -np.sin(theta), 0.0, np.sin(theta), np.cos(theta), 0.0, 0.0, 0.0, 1.0)
    vol = Volume(mri_crop, spacing=(0.9, 1.1, 1.3), origin=(10.0, -20.0, 5.0), direction=direction,
                 metadata={"0008|0060": "MR"})
    noisy, clean = degrade.degrade_volume(vol, "mri", 0.05, lr_factor=2, anisotropy=(2, 1, 1), seed=0)
    # factors (z, y, x) = (4, 2, 2) -> spacing (x, y, z) = (1.8, 2.2, 5.2)
    assert noisy.spacing == pytest.approx((1.8, 2.2, 5.2))
    assert noisy.array.shape == (10, 32, 32) and clean.same_grid(noisy)
    assert noisy.direction == pytest.approx(direction) and noisy.metadata["0008|0060"] == "MR"
    # the centre of LR voxel (0,0,0) is the centre of its HR block, in physical space
    hr = vol.to_sitk()
    lr = noisy.to_sitk()
    want = hr.TransformContinuousIndexToPhysicalPoint((0.5, 0.5, 1.5))  # (x, y, z) index
    got = lr.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, 0.0))
    assert got == pytest.approx(want, abs=1e-6)
    far = lr.TransformContinuousIndexToPhysicalPoint((31.0, 31.0, 9.0))
    assert far == pytest.approx(hr.TransformContinuousIndexToPhysicalPoint((62.5, 62.5, 37.5)), abs=1e-6)


def test_degrade_rejects_bad_input():
    with pytest.raises(InputError, match="modality"):
        degrade.degrade(np.zeros((8, 8)), "pet")
    with pytest.raises(InputError):
        degrade.degrade(np.zeros(8), "mri")
    with pytest.raises(InputError, match="smaller"):
        degrade.degrade(np.ones((1, 8, 8)), "mri", lr_factor=2)


def test_degrade_volume_2d_png(us_image):
    vol = Volume(us_image.array.astype(np.float32), spacing=(0.5, 0.25), origin=(1.0, 2.0))
    noisy, clean = degrade.degrade_volume(vol, "us", 4.0, lr_factor=(2, 4), seed=1)
    assert noisy.array.shape == (256, 128) and noisy.ndim == 2
    assert noisy.spacing == pytest.approx((2.0, 0.5))  # x: 0.5 * 4, y: 0.25 * 2
    assert noisy.origin == pytest.approx((1.0 + 0.5 * 1.5, 2.0 + 0.25 * 0.5))
    assert clean.same_grid(noisy) and "dualnet_degrade" in noisy.metadata
