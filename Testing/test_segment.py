"""Tests of dualnet.segment: frozen, deterministic downstream segmenters."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dualnet import metrics, segment
from dualnet.errors import InputError


def _phantom(seed=0, noise=0.0):
    """Three nested tissue classes on a (24, 40, 40) grid: 1 inner (bright), 2 shell, 3 outer."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:24, :40, :40]
    r = np.sqrt(((z - 12) / 1.0) ** 2 + (y - 20) ** 2 + (x - 20) ** 2)
    lab = np.zeros((24, 40, 40), np.uint8)
    lab[r < 11] = 3
    lab[r < 8] = 2
    lab[r < 5] = 1
    img = np.select([lab == 1, lab == 2, lab == 3], [300.0, 200.0, 80.0], 0.0)
    return img + rng.normal(0, noise, img.shape), lab


def test_mri_segmenter_recovers_classes_and_freezes():
    img, lab = _phantom(noise=10.0)
    seg = segment.fit_segmenter("mri_wm", img, lab)
    roi = lab > 0
    pred = seg.predict(img, roi)
    assert pred.dtype == np.uint8 and pred.shape == img.shape
    assert metrics.dice(pred == 1, lab == 1) > 0.9
    frozen = segment.Segmenter.from_dict(json.loads(json.dumps(seg.to_dict())))
    assert np.array_equal(frozen.predict(img, roi), pred)  # deterministic and JSON round trip
    # noisier input -> worse agreement with the clean prediction (what the study measures)
    noisy, _ = _phantom(seed=1, noise=60.0)
    assert metrics.dice(seg.predict(noisy, roi) == 1, pred == 1) < metrics.dice(pred == 1, pred == 1)
    with pytest.raises(InputError):
        seg.predict(img)  # needs the ROI


def test_ct_liver_interval_fit():
    rng = np.random.default_rng(0)
    ct = np.full((20, 48, 48), -1000.0)
    ct[:, 4:44, 4:44] = -100.0  # fat
    ct[:, 10:30, 10:30] = 60.0  # liver
    ct[:, 34:40, 34:40] = 400.0  # bone
    liver = np.zeros(ct.shape, np.uint8)
    liver[:, 10:30, 10:30] = 1
    ct += rng.normal(0, 5, ct.shape)
    seg = segment.fit_segmenter("ct_liver", ct, liver)
    assert -100 < seg.params["lo"] <= 60 <= seg.params["hi"] < 400
    pred = seg.predict(ct)
    assert metrics.dice(pred, liver) > 0.9
    again = segment.Segmenter.from_dict(seg.to_dict()).predict(ct)
    assert np.array_equal(again, pred)


def test_us_segmenter_2d_and_stack():
    rng = np.random.default_rng(0)
    img = np.full((64, 64), 90.0)
    lab = np.zeros((64, 64), np.uint8)
    lab[10:25, 10:25] = 1
    img[10:25, 10:25] = 160.0  # hyperechoic nerve
    lab[40:55, 40:55] = 2
    img[40:55, 40:55] = 10.0  # anechoic vessel
    img = img * rng.gamma(8.0, 1 / 8.0, img.shape)
    seg = segment.fit_segmenter("us_nerve_vessel", img, lab)
    pred = seg.predict(img)
    d = metrics.dice_per_label(pred, lab, labels=[1, 2])
    assert d[1] > 0.7 and d[2] > 0.7
    stack = np.stack([img, img])
    assert np.array_equal(seg.predict(stack)[1], pred)  # per-frame (2D) smoothing


def test_errors_and_resample():
    img, lab = _phantom()
    with pytest.raises(InputError):
        segment.fit_segmenter("pet", img, lab)
    with pytest.raises(InputError):
        segment.fit_segmenter("mri_wm", img, lab[:-1])
    with pytest.raises(InputError):
        segment.Segmenter.from_dict({"kind": "nope"})
    small = segment.resample_labels(lab, (12, 20, 20))
    assert small.shape == (12, 20, 20)
    assert set(np.unique(small)) <= {0, 1, 2, 3}
    # volume fractions are kept roughly
    for v in (1, 2, 3):
        assert (small == v).mean() == pytest.approx((lab == v).mean(), abs=0.02)
