"""Classical baselines: each improves PSNR on real crops with the modality's simulated noise,
the VST matters for BM4D on Rician data, bm4d/bm3d are optional and imported lazily, cancel works."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from dualnet import baselines, noise
from dualnet.errors import CancelledError, DualNetError, InputError
from dualnet.progress import CancelToken

CHEAP = ("nlm", "gaussian", "median", "diffusion")


def psnr(ref: np.ndarray, test: np.ndarray, data_range: float) -> float:
    """PSNR over the whole crop (no mask), data range given explicitly."""
    return float(10 * np.log10(data_range**2 / np.mean((ref.astype(np.float64) - test) ** 2)))


@pytest.fixture(scope="module")
def mri_small(mri_crop):
    return mri_crop[14:26, 8:56, 8:56].copy()  # 12x48x48 through the brain


@pytest.fixture(scope="module")
def ct_small(ct_volume):
    return ct_volume.array[50:58, 30:78, 40:88].astype(np.float32)  # 8x48x48 abdomen, 3 mm


@pytest.fixture(scope="module")
def us_small(us_image):
    return us_image.array[216:312, 216:312].astype(np.float32)  # 96x96 B-mode


@pytest.mark.parametrize("method", CHEAP + ("bm3d",))
def test_methods_improve_mri(mri_small, method):
    clean = mri_small[:3, 4:44, 4:44] if method == "bm3d" else mri_small  # bm3d: 3 slices, quick
    noisy = noise.add_noise(clean, "mri", 0.05, 0)
    dr = float(mri_small.max())
    opts = {"stage": "hard"} if method == "bm3d" else None  # hard stage only: quicker
    out = baselines.denoise(noisy, method, "mri", spacing_zyx=(1.0, 1.0, 1.0), options=opts)
    assert out.dtype == np.float32 and out.shape == noisy.shape
    assert psnr(clean, out, dr) > psnr(clean, noisy, dr) + 1.0


@pytest.mark.parametrize("method", ("nlm", "gaussian", "diffusion", "bm4d"))
def test_methods_improve_ct(ct_small, method):
    clean = ct_small[:6, 8:40, 8:40] if method == "bm4d" else ct_small  # bm4d: 6x32x32, quick
    noisy = noise.add_noise(clean, "ct", 0.1, 0)
    dr = float(ct_small.max() - ct_small.min())
    opts = {"stage": "hard"} if method == "bm4d" else None
    out = baselines.denoise(noisy, method, "ct", spacing_zyx=(3.0, 3.0, 3.0), options=opts)
    assert psnr(clean, out, dr) > psnr(clean, noisy, dr) + 0.5


def test_median_reduces_noise_inside_liver(ct_volume, shared_data):
    # On 3 mm CT a median removes structure as well as noise (whole-crop PSNR can drop), so the
    # check is made where the tissue is homogeneous: inside the (eroded) liver mask.
    from scipy.ndimage import binary_erosion

    from dualnet.io import read_volume

    liver = binary_erosion(read_volume(shared_data / "ct" / "totalseg_abdomen_masks" / "liver.nii.gz").array > 0, iterations=2)
    clean = ct_volume.array.astype(np.float32)
    noisy = noise.add_noise(clean, "ct", 0.1, 1)
    out = baselines.denoise(noisy, "median", "ct", spacing_zyx=ct_volume.spacing_zyx)
    err_noisy = np.sqrt(np.mean((noisy - clean)[liver] ** 2))
    err_out = np.sqrt(np.mean((out - clean)[liver] ** 2))
    assert liver.sum() > 1000 and err_out < 0.8 * err_noisy


@pytest.mark.parametrize("method", [m for m in baselines.METHODS if m != "bm4d"])
def test_methods_improve_us_2d(us_small, method):
    noisy = noise.add_noise(us_small, "us", 4.0, 0)
    out = baselines.denoise(noisy, method, "us", options={"stage": "hard"} if method == "bm3d" else None)
    assert out.shape == us_small.shape
    assert psnr(us_small, out, 255.0) > psnr(us_small, noisy, 255.0) + 3.0


def test_bm4d_on_2d_runs_bm3d(monkeypatch, us_small):
    import bm3d as bm3d_pkg

    calls = []

    def stub(z, sigma_psd, **kwargs):
        calls.append(sigma_psd)
        return z

    monkeypatch.setattr(bm3d_pkg, "bm3d", stub)
    out = baselines.denoise(us_small, "bm4d", "us", sigma=0.5)
    assert len(calls) == 1 and out.shape == us_small.shape
    # the log-domain noise std (sqrt(trigamma(4)) for sigma 0.5 = 4 looks) scaled to [0, 1]
    assert 0 < calls[0] < 0.533


def test_bm4d_vst_beats_plain_on_low_snr_rician(mri_volume):
    zc, yc = mri_volume.array.shape[0] // 2, mri_volume.array.shape[1] // 2
    clean = mri_volume.array[zc - 3 : zc + 3, yc - 16 : yc + 16, 0:32].astype(np.float32)  # head edge
    bg = clean == 0
    assert bg.mean() > 0.2
    noisy = noise.add_noise(clean, "mri", 0.10, 2)  # low SNR
    sigma = 0.10 * float(clean.max())
    fast = {"stage": "hard"}  # hard-thresholding stage only: half the time, same bias story
    vst_out = baselines.denoise(noisy, "bm4d", "mri", sigma=sigma, options=fast)
    plain = baselines.denoise(noisy, "bm4d", "mri", sigma=sigma, stabilize=False, options=fast)
    # plain BM4D keeps the Rician bias (background mean ~ 1.25 sigma); the VST removes it
    assert plain[bg].mean() > 0.8 * sigma
    assert abs(vst_out[bg].mean()) < 0.3 * abs(plain[bg].mean())
    dr = float(clean.max())
    assert psnr(clean, vst_out, dr) > psnr(clean, plain, dr)
    assert psnr(clean, vst_out, dr) > psnr(clean, noisy, dr) + 3.0


def test_bm4d_bm3d_imported_lazily():
    code = (
        "import sys; sys.path.insert(0, 'DualNetDenoise'); import dualnet.baselines; "
        "assert 'bm4d' not in sys.modules and 'bm3d' not in sys.modules, 'eager import'"
    )
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_missing_bm4d_gives_clear_error(monkeypatch, mri_small):
    monkeypatch.setitem(sys.modules, "bm4d", None)  # makes `import bm4d` raise ImportError
    with pytest.raises(DualNetError, match=r"pip install bm4d.*non-commercial"):
        baselines.denoise(mri_small, "bm4d", "mri", sigma=10.0)


def test_unknown_method_and_bad_input(mri_small):
    with pytest.raises(InputError, match="unknown denoising method 'wavelet'"):
        baselines.denoise(mri_small, "wavelet", "mri")
    with pytest.raises(InputError, match="modality"):
        baselines.denoise(mri_small, "gaussian", "pet")
    with pytest.raises(InputError):
        baselines.denoise(mri_small[0, 0], "gaussian", "mri")
    with pytest.raises(InputError):
        baselines.denoise(mri_small, "gaussian", "mri", sigma=-1.0)
    assert baselines.METHODS == ("bm4d", "bm3d", "nlm", "gaussian", "median", "diffusion")


def test_bm3d_cancel_between_slices_and_progress(mri_small):
    import bm3d as bm3d_pkg

    calls = []
    real = bm3d_pkg.bm3d

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    token = CancelToken()
    seen = []

    def progress(fraction, message):
        seen.append(fraction)
        if "slice 2/" in message:
            token.cancel()

    vol = noise.add_noise(mri_small[:6, :32, :32], "mri", 0.05, 0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bm3d_pkg, "bm3d", counting)
        with pytest.raises(CancelledError):
            baselines.denoise(vol, "bm3d", "mri", sigma=50.0, progress=progress, cancel=token)
    assert len(calls) == 2  # stopped after the slice during which cancel was requested
    assert seen == sorted(seen) and all(0 <= f <= 1 for f in seen)


def test_progress_reaches_one(mri_small):
    seen = []
    baselines.denoise(mri_small, "diffusion", "mri", progress=lambda f, m: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)


def test_ct_padding_kept(ct_small):
    noisy = noise.add_noise(ct_small, "ct", 0.25, 3)
    noisy[:, :, :6] = -3024.0  # scanner fill value outside the field of view
    out = baselines.denoise(noisy, "gaussian", "ct")
    assert np.all(out[:, :, :6] == -3024.0)
    assert np.abs(out[:, :, 8:] - ct_small[:, :, 8:]).mean() < np.abs(noisy[:, :, 8:] - ct_small[:, :, 8:]).mean()


@pytest.mark.parametrize("method", ["gaussian", "bm4d"])
def test_ct_air_below_minus_1000_hu_is_not_raised(ct_small, method):
    """Reconstructed air is at -1024 HU: the variance-stabilised baselines return it there, not at
    -1000 (the unbiased GAT inverse is >= 0 in its count domain, which starts at -1024 HU)."""
    clean = ct_small[:6, 8:40, 8:40].copy() if method == "bm4d" else ct_small.copy()
    clean[:, :, :10] = -1024.0
    noisy = noise.add_noise(clean, "ct", 0.25, 5)
    out = baselines.denoise(noisy, method, "ct", spacing_zyx=(3.0, 3.0, 3.0))
    air = out[:, 2:-2, 2:8]
    assert abs(float(air.mean()) + 1024.0) < 3.0
    assert np.abs(out - clean).mean() < np.abs(noisy - clean).mean()
