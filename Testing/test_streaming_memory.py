"""Streamed 2D inference: the same values as a straightforward whole-volume reference, and no
whole-volume temporaries beyond the returned maps.

The reference below is the textbook algorithm (whole-volume normalisation and noise map,
edge-repeated 2.5D context, Gaussian-weighted blending in whole-volume accumulators, division,
de-normalisation), run on a crop of the real chest CT with the shipped CT model (2.5D context 5
+ noise map), with test-time augmentation and MC-dropout uncertainty.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dualnet import inference  # noqa: E402
from dualnet.degrade import CT_FLOOR_HU  # noqa: E402
from dualnet.estimate import CT_PADDING_HU  # noqa: E402
from dualnet.inference import (apply_tta, denoise_array, denormalise, gaussian_weight,  # noqa: E402
                               invert_tta, normalise, tile_starts, tta_transforms)
from dualnet.modelfile import default_model_path, load_model  # noqa: E402
from dualnet.models import enable_mc_dropout  # noqa: E402
from dualnet.training.data import variance_map  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def reference(vol, model, card, *, tile, overlap, tta, mc_samples, seed, batch, coef):
    """Whole-volume reference of 2D (slice-wise, 2.5D + noise-map) tiled inference; the card's
    ``output_floor`` floors every pass (TTA, MC) and then the result, fill values excepted."""
    vol = np.asarray(vol)
    fill = vol < CT_PADDING_HU if card.get("modality") == "ct" else np.zeros(vol.shape, bool)
    xn, params = normalise(np.where(fill, np.float32(CT_FLOOR_HU), vol).astype(np.float32),
                           card["normalisation"])
    nmap = np.sqrt(variance_map(xn, coef, (-params["offset"], params["scale"]), smooth=(0.0, 1.0, 1.0)))
    floor = card.get("output_floor")
    floor_n = -np.inf if floor is None else (floor - params["offset"]) / params["scale"]
    k = int(model.config.get("context", 1)) // 2
    padded = np.pad(xn, ((k, k), (0, 0), (0, 0)), mode="edge")
    z_n, y_n, x_n = vol.shape
    tiles = [(z, y, x) for z in range(z_n) for y in tile_starts(y_n, tile, overlap)
             for x in tile_starts(x_n, tile, overlap)]
    ty, tx = min(tile, y_n), min(tile, x_n)
    weight = gaussian_weight((ty, tx))
    acc, wsum = {}, np.zeros(vol.shape, np.float32)
    transforms = tta_transforms(8 if tta else 1)
    with torch.inference_mode(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(tiles), batch):
            group = tiles[i:i + batch]
            x = torch.from_numpy(np.stack([np.concatenate(
                [padded[z:z + 2 * k + 1, y:y + ty, xx:xx + tx], nmap[None, z, y:y + ty, xx:xx + tx]])
                for z, y, xx in group]))
            x = x.contiguous(memory_format=torch.channels_last)
            model.eval()
            sums = {}
            for q, flip in transforms:
                res = model(apply_tta(x, q, flip))
                res["out"] = res["out"].clamp_min(floor_n)
                for key in ("out", "sigma", "alpha"):
                    if res.get(key) is not None:
                        val = invert_tta(res[key].float(), q, flip)
                        sums[key] = val if key not in sums else sums[key] + val
            preds = {key: v / len(transforms) for key, v in sums.items()}
            if mc_samples:
                enable_mc_dropout(model)
                mc = torch.stack([model(x)["out"].float().clamp_min(floor_n) for _ in range(mc_samples)])
                preds["unc"] = mc.std(0, unbiased=True)
                model.eval()
            for key, val in preds.items():
                val = (val[:, 0] * torch.from_numpy(weight)).numpy()
                acc.setdefault(key, np.zeros(vol.shape, np.float32))
                for j, (z, y, xx) in enumerate(group):
                    acc[key][z, y:y + ty, xx:xx + tx] += val[j]
            for z, y, xx in group:
                wsum[z, y:y + ty, xx:xx + tx] += weight
    maps = {key: val / wsum for key, val in acc.items()}
    out = denormalise(maps["out"], params)
    if floor is not None:
        out = np.maximum(out, np.float32(floor))
    out[fill] = vol[fill]
    return {"denoised": out, "sigma_map": maps["sigma"] * params["scale"], "alpha_map": maps["alpha"],
            "uncertainty": maps["unc"] * params["scale"] if "unc" in maps else None}


@pytest.fixture(scope="module")
def ct_model():
    path = default_model_path("ct")
    if not path.exists():
        pytest.skip("shipped CT model missing")
    return load_model(path, device="cpu")


@pytest.fixture(scope="module")
def ct_crop(shared_data):
    from dualnet.io import read_volume

    arr = read_volume(shared_data / "ct" / "chest_ct.nii.gz").array  # int16 HU, real scanner noise
    crop = arr[60:67, 150:222, 200:264].astype(np.float32)  # 7 x 72 x 64 through the chest
    crop[:, :, :5] = -3024.0  # a scanner fill border: kept in the output, air for the network
    return crop


@pytest.mark.parametrize("tta,mc", [(False, 0), (True, 2)])
def test_streamed_blend_matches_whole_volume_reference(ct_model, ct_crop, tta, mc):
    net, card = ct_model
    assert net.config["dim"] == 2 and net.config["context"] == 5 and net.config["noise_map"]
    coef = (120.0, 0.3, 0.0)
    # 40-voxel tiles: 3 x 2 tiles per slice, so batches (up to 16 tiles) end inside slices
    res = denoise_array(ct_crop, net, card, device="cpu", tile=40, overlap=0.25, tta=tta,
                        mc_samples=mc, seed=4, noise_coef=coef, guard=False)  # the blending alone
    assert res.info["batch"] % 6 != 0 or res.info["batch"] == 1
    ref = reference(ct_crop, net, card, tile=40, overlap=0.25, tta=tta, mc_samples=mc, seed=4,
                    batch=res.info["batch"], coef=coef)
    if ref["uncertainty"] is not None:  # the card's MC-dropout calibration, applied after blending
        ref["uncertainty"] = ref["uncertainty"] * np.float32(res.info["uncertainty_scale"])
    for name, want in ref.items():
        got = getattr(res, name)
        if want is None:
            assert got is None, name
            continue
        assert got.dtype == np.float32 and got.shape == ct_crop.shape, name
        # a few float32 roundings of the largest value: the convolution kernels round differently
        # on different CPUs (1.06e-6 of the maximum was seen on an AVX2 EPYC); a wrong blend or a
        # tile counted twice is off by far more
        tol = 4e-6 * float(np.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=name)
    assert np.all(res.denoised[:, :, :5] == -3024.0)
    if mc:
        assert float(res.uncertainty.mean()) > 0


def test_2d_image_and_estimated_noise_model(ct_model, ct_crop):
    """A single 2D slice, the noise model estimated from the input: same as the reference."""
    net, card = ct_model
    img = ct_crop[3]
    # tta=1: the CT card's x4 default for one-view runs is not what this test is about
    res = denoise_array(img, net, card, device="cpu", tile=48, guard=False, tta=1)
    from dualnet.training.data import noise_variance_model

    coef, _ = noise_variance_model(img, "ct")
    again = denoise_array(img, net, card, device="cpu", tile=48, noise_coef=coef, guard=False, tta=1)
    ref = reference(img[None], net, card, tile=48, overlap=0.25, tta=False, mc_samples=0, seed=0,
                    batch=res.info["batch"], coef=coef)
    assert res.denoised.shape == img.shape
    np.testing.assert_array_equal(res.denoised, again.denoised)
    np.testing.assert_allclose(res.denoised, ref["denoised"][0], rtol=0,
                               atol=1e-6 * float(np.abs(ref["denoised"]).max()))


class Probe(torch.nn.Module):
    """Cheap 2.5D + noise-map stand-in: returns the centre slice (torch memory is not traced)."""

    config = {"kind": "dncnn", "dim": 2, "preset": "tiny", "context": 5, "noise_map": True}

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return {"out": x[:, 2:3] + 0 * self.w, "sigma": None, "alpha": None, "blind": None}


def test_no_whole_volume_temporaries():
    """Peak numpy memory of a streamed run: the returned volume plus a few slices, not the
    normalised copy, noise map, padded context, accumulators and weight sum of a whole volume;
    the SURE guard (on for CT) streams its probe pass the same way."""
    rng = np.random.default_rng(0)
    vol = rng.normal(40.0, 30.0, (96, 160, 160)).astype(np.float32)  # 9.4 MiB
    vol[:, :, :4] = -3024.0
    card = {"modality": "ct", "normalisation": {"method": "hu_window", "hu_low": -1000.0, "hu_high": 1000.0}}
    coef = (100.0, 0.2, 0.0)
    denoise_array(vol[:2, :64, :64], Probe(), card, device="cpu", noise_coef=coef)  # imports done
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        res = denoise_array(vol, Probe(), card, device="cpu", tile=48, noise_coef=coef)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert res.info["guard"]["slices"] == [[9, 15], [33, 39], [57, 63], [81, 87]]
    assert res.info["guard"]["weight"] == 1.0  # the identity: nothing to blend
    assert np.all(res.denoised[:, :, :4] == -3024.0)
    # the rest: one batch of 16 tiles (2 x 0.84 MiB), 1 MiB chunks of the input checks, the
    # normalised slices of the 2.5D window; the whole-volume version needed over 5 volumes more
    extra = peak - res.denoised.nbytes
    assert extra < 0.5 * vol.nbytes, f"{extra / 2**20:.2f} MiB beyond the output ({vol.nbytes / 2**20:.2f} MiB volume)"


def test_zscore_and_percentile_statistics_without_float64_copies():
    """The z-score std is summed chunk by chunk: equal to np.std to float64 rounding."""
    rng = np.random.default_rng(1)
    x = rng.normal(100.0, 20.0, (30, 40, 50)).astype(np.float32)
    p = inference._norm_params(x, {"method": "zscore"})
    assert p["offset"] == float(x.mean(dtype=np.float64))
    assert p["scale"] == pytest.approx(float(x.std(dtype=np.float64)), rel=1e-12)
    q = inference._norm_params(x, {"method": "percentile", "p_low": 1, "p_high": 99})
    lo, hi = np.percentile(x, [1, 99])
    assert q == {"offset": float(lo), "scale": float(hi - lo)}
