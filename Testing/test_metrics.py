"""Tests of dualnet.metrics: PSNR/SSIM/RMSE with explicit data range and masks, Dice."""

from __future__ import annotations

import numpy as np
import pytest

from dualnet import metrics
from dualnet.errors import InputError
from dualnet.io import Volume


def _pair(shape=(24, 32, 32), sigma=0.1, seed=0):
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    ref = np.sin(4 * grids[-1]) * np.cos(3 * grids[-2]) + (grids[0] if len(shape) == 3 else 0)
    return ref, ref + rng.normal(0, sigma, shape)


def test_psnr_hand_value_and_required_range():
    ref = np.zeros((4, 4))
    test = ref.copy()
    test[0, 0] = 2.0  # MSE = 4 / 16 = 0.25
    assert metrics.psnr(ref, test, data_range=1.0) == pytest.approx(10 * np.log10(1 / 0.25))
    assert metrics.rmse(ref, test) == pytest.approx(0.5)
    with pytest.raises(TypeError):
        metrics.psnr(ref, test)  # data_range has no default
    with pytest.raises(InputError):
        metrics.psnr(ref, test, data_range=0)
    assert metrics.psnr(ref, ref, data_range=1.0) == float("inf")


def test_psnr_mask_selects_voxels():
    ref = np.zeros((4, 4))
    test = ref.copy()
    test[0, 0] = 2.0
    mask = np.zeros_like(ref, dtype=bool)
    mask[2:, 2:] = True  # error outside the mask -> identical inside
    assert metrics.psnr(ref, test, data_range=1.0, mask=mask) == float("inf")
    mask[0, 0] = True  # 5 voxels, one with squared error 4
    assert metrics.rmse(ref, test, mask) == pytest.approx(np.sqrt(4 / 5))
    with pytest.raises(InputError):
        metrics.psnr(ref, test, data_range=1.0, mask=np.zeros_like(mask))


def test_psnr_matches_skimage():
    from skimage.metrics import peak_signal_noise_ratio

    ref, test = _pair()
    assert metrics.psnr(ref, test, data_range=2.0) == pytest.approx(
        peak_signal_noise_ratio(ref, test, data_range=2.0)
    )


@pytest.mark.parametrize("shape", [(48, 40), (16, 24, 20)])
def test_ssim_matches_skimage_without_mask(shape):
    from skimage.metrics import structural_similarity

    ref, test = _pair(shape)
    want = structural_similarity(
        ref, test, data_range=2.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert metrics.ssim(ref, test, data_range=2.0) == pytest.approx(want, rel=1e-9)
    assert metrics.ssim(ref, ref, data_range=2.0) == pytest.approx(1.0)


def test_ssim_mask_and_monotone_in_noise():
    ref, noisy = _pair(sigma=0.05)
    _, noisier = _pair(sigma=0.3)
    assert metrics.ssim(ref, noisy, data_range=2.0) > metrics.ssim(ref, noisier, data_range=2.0)
    # noise only in one half: the clean half's mask gives SSIM 1
    test = ref.copy()
    test[:, :, 16:] = noisier[:, :, 16:]
    mask = np.zeros(ref.shape, bool)
    mask[:, :, :8] = True
    assert metrics.ssim(ref, test, data_range=2.0, mask=mask) == pytest.approx(1.0)
    assert metrics.ssim(ref, test, data_range=2.0) < 0.99
    with pytest.raises(InputError):
        metrics.ssim(ref[:5], test[:5], data_range=2.0)  # window does not fit


def test_foreground_masks():
    img = np.zeros((20, 40, 40))
    img[4:16, 10:30, 10:30] = 100.0
    img[8:12, 18:22, 18:22] = 0.0  # a hole inside
    img[0, 0, 0] = 100.0  # a speck outside
    fg = metrics.foreground_mask(img, "mri")
    assert fg[10, 20, 20] and not fg[0, 0, 0] and fg.sum() == 12 * 20 * 20
    ct = np.full((10, 30, 30), -1000.0)
    ct[:, 5:25, 5:25] = 40.0
    ct[:, 10:15, 10:15] = -850.0  # lung inside the body
    body = metrics.foreground_mask(ct, "ct")
    assert body.sum() == 10 * 20 * 20
    us = np.zeros((30, 30))
    us[5:25, 5:25] = 60.0
    assert metrics.foreground_mask(us, "us").sum() == 400
    with pytest.raises(InputError):
        metrics.foreground_mask(us, "pet")


def test_foreground_mask_real_mri(mri_crop):
    fg = metrics.foreground_mask(mri_crop, "mri")
    assert 0.2 < fg.mean() < 1.0


def test_dice_values_and_empty():
    a = np.zeros((10, 10), int)
    b = np.zeros((10, 10), int)
    a[:5] = 1
    b[:, :5] = 1  # overlap 25, sizes 50 + 50
    assert metrics.dice(a, b) == pytest.approx(0.5)
    assert metrics.dice(a, a) == 1.0
    assert metrics.dice(np.zeros(4), np.zeros(4)) == 1.0  # empty both -> 1.0 by definition
    assert metrics.dice(a, np.zeros_like(a)) == 0.0


def test_dice_per_label_arrays_and_labels():
    a = np.array([[0, 1, 1, 2], [2, 2, 0, 0]])
    b = np.array([[0, 1, 2, 2], [2, 0, 0, 0]])
    res = metrics.dice_per_label(a, b)
    assert set(res) == {1, 2}
    assert res[1] == pytest.approx(2 * 1 / 3)
    assert res[2] == pytest.approx(2 * 2 / 6)
    assert metrics.dice_per_label(a, b, labels=[7]) == {7: 1.0}


def test_dice_per_label_volume_geometry_checked():
    arr = np.zeros((4, 5, 6), np.uint8)
    arr[1:3, 1:3, 1:3] = 1
    va = Volume(arr, (1.0, 1.0, 2.0))
    assert metrics.dice_per_label(va, Volume(arr.copy(), (1.0, 1.0, 2.0))) == {1: 1.0}
    for other, word in [
        (Volume(arr, (1.0, 1.0, 3.0)), "spacing"),
        (Volume(arr, (1.0, 1.0, 2.0), (5.0, 0.0, 0.0)), "origin"),
        (Volume(arr, (1.0, 1.0, 2.0), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1)), "direction"),
        (Volume(arr[:3], (1.0, 1.0, 2.0)), "shape"),
    ]:
        with pytest.raises(InputError, match=word):
            metrics.dice_per_label(va, other)
    with pytest.raises(InputError):
        metrics.dice_per_label(np.full((2, 2), 0.5), np.zeros((2, 2)))
