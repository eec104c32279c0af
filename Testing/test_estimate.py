"""Noise estimation recovers the simulated parameters on real scans (MRI, CT, US)."""

from __future__ import annotations

import numpy as np
import pytest

from dualnet import estimate, noise
from dualnet.errors import InputError


def test_wavelet_mad_gaussian_sigma(mri_crop):
    s = 0.06 * float(mri_crop.max())
    noisy = mri_crop + s * np.random.default_rng(0).standard_normal(mri_crop.shape)
    # the real scan's own noise and texture add a little (measured +7 %)
    assert estimate.sigma_gaussian_mad(noisy) == pytest.approx(s, rel=0.12)
    # the clean real crop itself is much quieter than the added noise
    assert estimate.sigma_gaussian_mad(mri_crop) < 0.5 * s
    # 2D works too
    assert estimate.sigma_gaussian_mad(noisy[20]) == pytest.approx(s, rel=0.15)


@pytest.mark.parametrize("level", [0.02, 0.05])
def test_rician_background_sigma_on_real_head(mri_volume, level):
    head = mri_volume.array[::2, ::2, ::2].astype(np.float32)  # keeps the zero background
    noisy = noise.add_noise(head, "mri", level, 1)
    s_true = level * float(head.max())
    s = estimate.sigma_rician_background(noisy)
    assert s == pytest.approx(s_true, rel=0.10)
    est = estimate.estimate_noise(noisy, "mri")
    assert est.method == "rician-background"
    assert est.sigma == pytest.approx(s_true, rel=0.10)
    # the clean max is estimated as max(noisy) - 2 sigma: looser than sigma (measured +8..16 %)
    assert est.level == pytest.approx(level, rel=0.22)
    assert float(est) == est.level


@pytest.mark.parametrize("level", [0.05, 0.10])
def test_rician_sigma_is_not_pulled_up_by_dim_tissue(shared_data, level):
    """A skull-stripped brain slab (its dark CSF and edges near the noise floor; 16 x 80 x 80 at 2 mm,
    like the evaluation study's cases): the raw Rayleigh mode read 1.07-1.33x the simulated sigma at
    10 %; the local-moment mode must be within 3 %, and its background must read as Rayleigh."""
    from scipy.ndimage import zoom

    from dualnet.io import read_volume

    brain = read_volume(shared_data / "mri" / "voxelmorph_brain_t1.nii.gz").array.astype(np.float32)
    slab = zoom(brain[80:112], 0.5, order=1)[:, 8:88, :80]
    noisy = noise.add_noise(slab, "mri", level, 5)
    s_true = noise.mri_sigma_from_level(slab, level)
    s, ratio = estimate.rician_background(noisy)
    assert s == pytest.approx(s_true, rel=0.03)
    assert estimate.RAYLEIGH_RATIO_BAND[0] < ratio < estimate.RAYLEIGH_RATIO_BAND[1]
    est = estimate.estimate_noise(noisy, "mri")
    assert est.method == "rician-background" and est.sigma == s
    assert est.params["background_rayleigh_ratio"] == ratio  # reported by `dualnet estimate`


def test_a_background_with_signal_in_it_is_not_read_as_rayleigh(mri_volume):
    """An offset in the background (signal the scanner left there) raises its local moments; the
    moment ratio leaves the Rayleigh band and the foreground MAD is taken where it is lower."""
    head = mri_volume.array[::2, ::2, ::2].astype(np.float32)
    s_true = 0.02 * float(head.max())
    noisy = noise.add_noise(head + 3.0 * s_true, "mri", 0.02, 6)  # the clean max moves a little
    s, ratio = estimate.rician_background(noisy)
    assert ratio > estimate.RAYLEIGH_RATIO_BAND[1] and s > 1.5 * s_true
    est = estimate.estimate_noise(noisy, "mri")
    assert est.method == "wavelet-mad-foreground" and est.sigma < s
    assert est.params["background_rayleigh_ratio"] == ratio


def test_rician_without_background_falls_back_to_mad(mri_crop):
    noisy = noise.add_noise(mri_crop, "mri", 0.05, 2)  # crop inside the brain: no background
    est = estimate.estimate_noise(noisy, "mri")
    assert est.method == "wavelet-mad-foreground"
    assert est.sigma == pytest.approx(0.05 * mri_crop.max(), rel=0.15)
    assert est.level == pytest.approx(0.05, rel=0.2)


@pytest.mark.parametrize("dose", [0.1, 0.25, 0.5])
def test_poisson_gaussian_fit_recovers_ct_dose(ct_volume, dose):
    from scipy.ndimage import gaussian_filter

    # Smooth the real CT so its own (correlated) scanner noise does not add to the fit.
    clean = gaussian_filter(ct_volume.array.astype(np.float32), 1.0)
    noisy = noise.add_noise(clean, "ct", dose, 3)
    gain_true, sigma_true = noise.ct_noise_parameters(dose)
    gain, sigma = estimate.poisson_gaussian_fit(noisy + noise.CT_OFFSET_HU)
    assert gain == pytest.approx(gain_true, rel=0.08)
    assert sigma == pytest.approx(sigma_true, rel=0.15)
    est = estimate.estimate_noise(noisy, "ct")
    assert est.level == pytest.approx(dose, rel=0.10)
    assert est.sigma == pytest.approx(np.sqrt(gain_true * 1000 + sigma_true**2), rel=0.08)


def test_ct_estimate_on_raw_scan_orders_doses(ct_volume):
    clean = ct_volume.array.astype(np.float32)
    levels = [estimate.estimate_noise(noise.add_noise(clean, "ct", d, 4), "ct").level for d in (0.1, 0.25, 0.5)]
    # The raw scan's own noise adds to the simulated noise: estimates are low but ordered.
    assert levels[0] < levels[1] < levels[2]
    assert 0.05 < levels[0] <= 0.11 and levels[2] <= 0.5


def test_own_noise_of_a_reference_adds_to_the_simulated_noise(ct_volume):
    """A "clean" reference that carries noise of its own (here: 50 % dose noise put on the smoothed
    real CT): own_noise_std_map finds it, and the estimate on a simulated input made from it matches
    the simulated and the own noise together, not the simulated noise alone."""
    from scipy.ndimage import gaussian_filter

    from dualnet.training.data import noise_variance_model

    smooth = gaussian_filter(ct_volume.array.astype(np.float32), 1.0)
    reference = noise.add_noise(smooth, "ct", 0.5, 7)
    fg = reference > -500
    own = estimate.own_noise_std_map(reference, "ct")
    truth_own = noise.noise_std_map(smooth, "ct", 0.5)
    assert own.shape == reference.shape and np.all(np.isfinite(own))
    assert own[fg].mean() == pytest.approx(truth_own[fg].mean(), rel=0.1)
    noisy = noise.add_noise(reference, "ct", 1.0, 8)
    sim = noise.noise_std_map(reference, "ct", 1.0)
    coef, _ = noise_variance_model(noisy, "ct")
    est = np.sqrt(coef[0] + coef[1] * reference)
    total = estimate.input_noise_std_map(sim, reference, "ct")
    np.testing.assert_allclose(total, np.sqrt(sim ** 2 + own ** 2), rtol=1e-5)
    assert est[fg].mean() == pytest.approx(total[fg].mean(), rel=0.1)
    assert est[fg].mean() > 1.3 * sim[fg].mean()
    # ultrasound: the reference's speckle is the signal, not noise
    assert not estimate.own_noise_std_map(np.full((8, 9), 50.0, np.float32), "us").any()


@pytest.mark.parametrize("looks,tol", [(1.0, 0.4), (4.0, 0.15), (10.0, 0.15)])
def test_speckle_looks_on_real_ultrasound(us_image, looks, tol):
    noisy = noise.add_noise(us_image.array.astype(np.float32), "us", looks, 5)
    est = estimate.estimate_noise(noisy, "us")
    assert est.level == pytest.approx(looks, rel=tol)
    assert est.sigma == pytest.approx(1 / np.sqrt(est.level))


def test_estimate_errors():
    with pytest.raises(InputError, match="modality"):
        estimate.estimate_noise(np.zeros((8, 8)), "xray")
    with pytest.raises(InputError):
        estimate.sigma_gaussian_mad(np.zeros(10))
    with pytest.raises(InputError, match="NaN|finite"):
        estimate.sigma_gaussian_mad(np.full((8, 8), np.nan))


def test_masked_background_is_not_taken_for_noise(mri_volume):
    # The real scan's background was zeroed in processing: the estimate must come from the
    # foreground (the scan's own noise, about 30 a.u.), not from the few non-zero dark voxels.
    head = mri_volume.array[::2, ::2, ::2].astype(np.float32)
    with pytest.raises(InputError, match="masked"):
        estimate.sigma_rician_background(head)
    est = estimate.estimate_noise(head, "mri")
    assert est.method == "wavelet-mad-foreground" and 10 < est.sigma < 80


@pytest.mark.parametrize("dose", [0.25, 0.5])
def test_ct_dose_fit_is_not_bent_by_air_below_minus_1000_hu(dose):
    """A phantom half air at -1024 HU: the air carries only the electronic variance (its bins' mean
    lies below the zero of the counts), which must not bend the Poisson-Gaussian line."""
    yy, xx = np.mgrid[0:128, 0:128]
    r = np.hypot(yy - 64, xx - 64)
    clean = np.full((16, 128, 128), -1024.0, np.float32)
    clean[:, r < 40] = (40.0 + 30.0 * np.sin(xx / 5.0))[r < 40]
    clean[:, r < 20] = 700.0
    clean[:, (r >= 40) & (r < 44)] = -300.0
    est = estimate.estimate_noise(noise.add_noise(clean, "ct", dose, 1), "ct")
    assert est.level == pytest.approx(dose, rel=0.02)


def test_a_given_ct_sigma_sets_the_level_at_water_and_keeps_the_fitted_shape():
    """``--sigma`` for CT is the noise std at water (HU), for the classical methods and the network alike:
    the scan's fit keeps how the noise grows with the signal (ratio of the Poisson to the electronic
    part), the given std sets its level; a fit with no signal dependence becomes white noise."""
    from dualnet.baselines import _transform
    from dualnet.training.data import noise_variance_model, variance_at

    gain, e = estimate.scale_ct_noise_to_water(0.8, 8.0, 12.0)
    assert gain * 1000 + e * e == pytest.approx(144.0) and gain / (e * e) == pytest.approx(0.8 / 64.0)
    assert estimate.scale_ct_noise_to_water(0.0, 3.0, 12.0) == (0.0, 12.0)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(InputError, match="positive"):
            estimate.scale_ct_noise_to_water(0.8, 8.0, bad)
    rng = np.random.default_rng(0)
    clean = np.full((6, 64, 64), 40.0, np.float32)
    clean[:, :, :20], clean[:, :, 44:] = -1000.0, 400.0
    noisy = noise.add_noise(clean, "ct", 0.25, rng=rng).astype(np.float32)
    coef, info = noise_variance_model(noisy, "ct", sigma=12.0)  # the network's noise model
    fitted, _ = noise_variance_model(noisy, "ct")
    assert float(variance_at(np.float32(0.0), coef)) == pytest.approx(144.0, rel=1e-5)
    assert coef[1] / coef[0] == pytest.approx(fitted[1] / fitted[0], rel=1e-6)  # same shape as the fit
    assert info["estimated_sigma"] > 20 and info["sigma"] == 12.0
    classical = _transform(noisy, "ct", 12.0, stabilize=True).info  # BM4D's, counted from -1024 HU
    assert classical["gain"] * 1024 + classical["electronic_sigma"] ** 2 == pytest.approx(144.0)
    # MRI and ultrasound: the given level is the whole model (no estimate runs)
    assert noise_variance_model(noisy, "mri", sigma=3.0)[0] == (9.0, 0.0, 0.0)
    assert noise_variance_model(noisy, "us", sigma=0.5)[0] == (0.0, 0.0, 0.25)
    assert _transform(np.abs(noisy) + 1, "us", 0.5, stabilize=True).info["looks"] == pytest.approx(4.0)
    with pytest.raises(InputError, match="positive"):
        noise_variance_model(noisy, "mri", sigma=-1.0)


def test_a_ct_noise_model_with_no_dose_is_strict_json_and_a_given_level_needs_no_fit(monkeypatch):
    """A CT fit with no signal dependence has no dose: its level is recorded as None (cards and
    --info-json are strict JSON), estimated or given; a slab too small to fit a shape takes a given
    std at water as white noise, and without one says why it cannot estimate."""
    import json

    from dualnet.training.data import noise_variance_model

    flat = np.random.default_rng(1).normal(0.0, 5.0, (4, 32, 32)).astype(np.float32)
    monkeypatch.setattr(estimate, "estimate_noise", lambda *a, **k: estimate.NoiseEstimate(
        "ct", float("inf"), 5.0, "poisson-gaussian-fit", {"gain": 0.0, "electronic_sigma": 5.0}))
    for sigma, var in ((None, 25.0), (12.0, 144.0)):
        coef, info = noise_variance_model(flat, "ct", sigma)
        assert coef == pytest.approx((var, 0.0, 0.0)) and info["level"] is None
        json.dumps(info, allow_nan=False)
    monkeypatch.undo()
    tiny = flat[0, :6, :6]
    assert noise_variance_model(tiny, "ct", 12.0)[0] == (144.0, 0.0, 0.0)
    with pytest.raises(InputError, match="too few voxels"):
        noise_variance_model(tiny, "ct")
    with pytest.raises(InputError, match="modality"):  # not taken for a CT slab that is too small
        noise_variance_model(tiny, "xyz", 12.0)


def test_check_sigma_refuses_what_no_image_of_the_modality_could_have():
    assert estimate.check_sigma(0.5, "us") == 0.5
    with pytest.raises(InputError, match="relative speckle"):
        estimate.check_sigma(12.0, "us")  # 1/144 of a look
    span = np.array([0.0, 1000.0], np.float32)
    assert estimate.check_sigma(20, "mri", span) == 20.0 and estimate.check_sigma(5e4, "mri") == 5e4
    with pytest.raises(InputError, match="plausible range"):
        estimate.check_sigma(5e4, "mri", span)
    for bad in ("x", "0.5", None, True, 10 ** 400, -1.0, float("inf")):
        with pytest.raises(InputError, match="positive number"):
            estimate.check_sigma(bad, "ct")
    assert estimate.check_sigma(np.float32(2.0), "US") == 2.0 and estimate.check_sigma(3, "ct", [0, 10]) == 3.0


@pytest.mark.parametrize("modality", ["mri", "ct", "us"])
def test_a_one_slice_volume_is_estimated_as_its_2d_image(modality, shared_data):
    """A 2D slice stored as a one-slice volume (a NIfTI of 512 x 512 x 1, a Slicer node of a PNG) was
    refused ("too few voxels") by `dualnet estimate` and the panel's Estimate button for every
    modality, while denoising squeezed it."""
    from dualnet.io import read_volume

    path = {"mri": "mri/voxelmorph_brain_t1.nii.gz", "ct": "ct/covid19_ny_sbu_axial/A072894_19001203.nii.gz",
            "us": "us/images/0001.png"}[modality]
    arr = read_volume(shared_data / path).array.astype(np.float32)
    img = arr[arr.shape[0] // 2] if arr.ndim == 3 and arr.shape[0] > 1 else arr.reshape(arr.shape[-2:])
    if modality == "mri":
        img = img + np.random.default_rng(0).normal(0, 0.02 * img.max(), img.shape).astype(np.float32)
    flat = estimate.estimate_noise(img, modality)
    one = estimate.estimate_noise(img[None], modality)
    assert float(one.sigma) == pytest.approx(float(flat.sigma)) and float(one.sigma) > 0


def test_ct_fill_values_do_not_inflate_the_noise_estimate(shared_data):
    """A real chest CT stores exactly -1024 HU outside its field of view (22 % of these slices).
    Blocks of one repeated value have zero variance; their bin's 1e24 weight pinned the fit through
    (0, 0): 59.5 HU at water where the scan's own noise is about 14-16 HU (the Haar detail's robust
    std in soft tissue, below)."""
    from dualnet.io import read_volume

    v = read_volume(shared_data / "ct" / "chest_ct.nii.gz").array[60:76].astype(np.float32)
    assert (v == -1024).mean() > 0.2
    est = estimate.estimate_noise(v, "ct")
    mean, det = estimate.haar_blocks(v)
    tissue = (mean > -50) & (mean < 80)
    robust = float(np.median(np.abs(det[tissue])) * 1.4826)
    assert 0.8 * robust < est.sigma < 1.3 * robust, (est.sigma, robust)
    # a known Poisson-Gaussian model with a constant fill region is still recovered
    rng = np.random.default_rng(0)
    clean = np.full((16, 96, 96), 40.0)
    clean[:, :, :48] = 1000.0
    noisy = clean + rng.normal(0, 1, clean.shape) * np.sqrt(0.8 * clean + 64.0)
    noisy[:, :20] = 0.0
    gain, sigma = estimate.poisson_gaussian_fit(noisy)
    assert gain == pytest.approx(0.8, rel=0.1) and sigma == pytest.approx(8.0, rel=0.1)


def test_classical_methods_take_a_one_slice_volume(shared_data):
    """(1, y, x) volumes (single-slice NIfTI / DICOM, as the project's own clinical CT slices): the
    Haar blocks cropped the slice axis to 0 and the CT transform refused them, even given --sigma."""
    from dualnet import api
    from dualnet.io import read_volume

    one = read_volume(shared_data / "ct" / "covid19_ny_sbu_axial" / "A072894_19001203.nii.gz")
    crop = one.with_array(one.array[:, 200:296, 200:296].astype(np.float32))
    assert crop.array.shape == (1, 96, 96)
    for sigma in (None, 20.0):
        out = api.denoise_volume(crop, method="gaussian", modality="ct", sigma=sigma).volume.array
        assert out.shape == (1, 96, 96) and np.isfinite(out).all()
    speckle = np.random.default_rng(0).gamma(4.0, 25.0, (1, 96, 96))
    assert estimate.speckle_looks(speckle) == pytest.approx(4.0, rel=0.3)


def test_no_measurable_speckle_is_said_and_a_png_frame_round_trips(shared_data, tmp_path):
    """A real B-mode frame reads as no speckle (128 looks, the estimate's maximum): the network then
    leaves it almost as it is, which is now said, with the way out (--sigma). Its result could hold
    values below 0, and a PNG output was refused; the ultrasound card now floors the output at 0."""
    from dualnet import api
    from dualnet.io import read_volume, write_volume

    frame = read_volume(shared_data / "us" / "images" / "0001.png")
    assert estimate.speckle_looks(frame.array.astype(np.float32)) == pytest.approx(estimate.LOOKS_RANGE[1])
    res = api.denoise_volume(frame, method="dualnet", modality="us", device="cpu", tta=1)
    assert "no speckle was measured" in res.info["inference_noise_warning"]
    assert float(res.volume.array.min()) >= 0.0
    write_volume(res.volume, tmp_path / "out.png", inputs=[frame.path])
    given = api.denoise_volume(frame, method="dualnet", modality="us", device="cpu", tta=1, sigma=0.5)
    assert "inference_noise_warning" not in given.info  # the level is the user's
    assert estimate.speckle_caution({"modality": "us", "method": "log-haar-mad", "looks": 4.0}) is None
