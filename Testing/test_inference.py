"""Tiled inference: normalisation, shapes, tile-size independence, TTA, MC dropout, devices."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dualnet.device import resolve_device  # noqa: E402
from dualnet.errors import CancelledError, InputError  # noqa: E402
from dualnet.inference import (denoise_array, denormalise, gaussian_weight,  # noqa: E402
                               normalise, tile_starts)
from dualnet.models import build_model  # noqa: E402
from dualnet.progress import CancelToken  # noqa: E402

PCT = {"method": "percentile", "p_low": 0.5, "p_high": 99.5}
CARD = {"modality": "mri", "normalisation": PCT}


pytestmark = pytest.mark.usefixtures("one_thread")


class Identity(torch.nn.Module):
    config = {"kind": "dncnn", "dim": 2, "preset": "tiny"}

    def forward(self, x):
        return {"out": x.clone(), "sigma": None, "alpha": None, "blind": None}


class ShiftX(torch.nn.Module):
    """out[y, x] = in[y, x - 1] (wrapping): not rotation-equivariant."""

    config = {"kind": "dncnn", "dim": 2, "preset": "tiny"}

    def forward(self, x):
        return {"out": torch.roll(x, 1, -1), "sigma": None, "alpha": None, "blind": None}


@pytest.fixture(scope="module")
def noisy_slab(mri_crop):
    rng = np.random.default_rng(1)
    slab = mri_crop[18:21]  # (3, 64, 64) real T1, arbitrary units
    return slab + rng.normal(0, 0.05 * slab.max(), slab.shape).astype(np.float32)


@pytest.fixture(scope="module")
def tiny2d():
    torch.manual_seed(0)
    return build_model("tiny", 2, dropout=0.1).eval()


def test_normalisation_inverts_exactly():
    rng = np.random.default_rng(0)
    x = rng.normal(40, 300, (4, 9, 7)).astype(np.float32)
    for spec in (PCT, {"method": "hu_window", "hu_low": -1000, "hu_high": 1000},
                 {"method": "fixed", "low": 0, "high": 255}, {"method": "zscore"}):
        xn, params = normalise(x, spec)
        np.testing.assert_allclose(denormalise(xn, params), x, rtol=1e-6, atol=1e-3)
    xn, params = normalise(x, {"method": "hu_window", "hu_low": -1000, "hu_high": 1000})
    assert params == {"offset": -1000.0, "scale": 2000.0}  # fixed, HU: not data-dependent


def test_tiling_helpers():
    assert tile_starts(10, 16, 0.25) == [0]
    starts = tile_starts(100, 32, 0.25)
    assert starts[0] == 0 and starts[-1] == 68 and all(b - a <= 24 for a, b in zip(starts, starts[1:]))
    w = gaussian_weight((1, 9, 9))
    assert w.shape == (1, 9, 9) and w[0, 4, 4] == pytest.approx(1.0) and w.min() > 0


def test_identity_model_is_exact_with_tiles_and_tta(mri_crop):
    vol = mri_crop[:4, :50, :45]
    res = denoise_array(vol, Identity(), CARD, device="cpu", tile=16, overlap=0.5, tta=True)
    np.testing.assert_allclose(res.denoised, vol, rtol=1e-5, atol=1e-3)
    assert res.sigma_map is None and res.alpha_map is None and res.uncertainty is None
    assert res.info["passes"] == 8 and res.info["tile"] == (16, 16)


def test_tta_inverts_each_transform():
    """TTA of 'shift by one in x' = mean of the four axis-aligned neighbours (each twice)."""
    rng = np.random.default_rng(0)
    img = rng.normal(0, 1, (12, 13)).astype(np.float32)
    res = denoise_array(img, ShiftX(), {"normalisation": {"method": "fixed", "low": 0, "high": 1}},
                        device="cpu", tta=True)
    expected = (img[:-2, 1:-1] + img[2:, 1:-1] + img[1:-1, :-2] + img[1:-1, 2:]) / 4
    np.testing.assert_allclose(res.denoised[1:-1, 1:-1], expected, atol=1e-5)
    plain = denoise_array(img, ShiftX(), {"normalisation": {"method": "fixed", "low": 0, "high": 1}},
                          device="cpu")
    np.testing.assert_allclose(plain.denoised[:, 1:], img[:, :-1], atol=1e-6)


def test_the_cards_tta_default_and_the_options_that_override_it():
    """The card's ``test_time_augmentation`` (4: the quarter turns) is used when ``tta`` is None;
    True / False / 1 / 4 / 8 override it; other values are refused, and the faces' words parse."""
    from dualnet.errors import ModelError
    from dualnet.inference import choose_tta, parse_tta

    rng = np.random.default_rng(1)
    img = rng.normal(0, 1, (12, 13)).astype(np.float32)
    card = {"normalisation": {"method": "fixed", "low": 0, "high": 1}, "test_time_augmentation": 4}
    res = denoise_array(img, ShiftX(), card, device="cpu")
    assert res.info["tta"] == 4 and res.info["passes"] == 4
    expected = (img[:-2, 1:-1] + img[2:, 1:-1] + img[1:-1, :-2] + img[1:-1, 2:]) / 4  # each neighbour once
    np.testing.assert_allclose(res.denoised[1:-1, 1:-1], expected, atol=1e-5)
    off = denoise_array(img, ShiftX(), card, device="cpu", tta=False)
    assert off.info["tta"] == 1
    np.testing.assert_allclose(off.denoised[:, 1:], img[:, :-1], atol=1e-6)
    assert denoise_array(img, ShiftX(), card, device="cpu", tta=8).info["passes"] == 8
    assert choose_tta(None, {}) == 1 and choose_tta(True, card) == 8 and choose_tta(1, card) == 1
    with pytest.raises(InputError, match="tta must be"):
        denoise_array(img, ShiftX(), card, device="cpu", tta=3)
    for bad in (3, True, "4"):
        with pytest.raises(ModelError, match="test_time_augmentation"):
            choose_tta(None, {"test_time_augmentation": bad})
    assert choose_tta(np.int64(4), {}) == 4 and choose_tta(np.bool_(True), {}) == 8  # numpy scalars too
    for bad in (4.0, "8", 2):
        with pytest.raises(InputError, match="tta must be"):
            choose_tta(bad, card)
    assert [parse_tta(w) for w in ("auto", "off", "x4", "4", "X8", "on", "True", "false")] == [None, 1, 4, 4, 8, 8, 8, 1]
    with pytest.raises(InputError, match="auto, off, on, x4 or x8"):
        parse_tta("x2")


def test_tile_size_independence(noisy_slab, tiny2d):
    """Two tile sizes: max abs difference below 0.5 % of the intensity range (untrained net)."""
    a = denoise_array(noisy_slab, tiny2d, CARD, device="cpu", tile=48).denoised
    b = denoise_array(noisy_slab, tiny2d, CARD, device="cpu", tile=64).denoised
    span = float(noisy_slab.max() - noisy_slab.min())
    assert np.abs(a - b).max() < 0.005 * span


def test_shapes_2d_image_3d_volume_and_3d_model(noisy_slab, tiny2d):
    img = noisy_slab[0, :37, :29]
    res = denoise_array(img, tiny2d, CARD, device="cpu", tile=32)
    for arr in (res.denoised, res.sigma_map, res.alpha_map):
        assert arr.shape == img.shape and arr.dtype == np.float32
    assert float(res.sigma_map.min()) > 0 and 0 <= float(res.alpha_map.min()) <= float(res.alpha_map.max()) <= 1
    torch.manual_seed(0)
    model3 = build_model("tiny", 3)
    vol = noisy_slab[:, :21, :19]
    res3 = denoise_array(vol, model3, CARD, device="cpu", tile=16)
    assert res3.denoised.shape == vol.shape and res3.info["mode"] == "3d"
    assert res3.info["tile"] == (3, 16, 16)
    with pytest.raises(InputError):
        denoise_array(img, model3, CARD, device="cpu")
    bad = img.copy()
    bad[0, 0] = np.nan
    with pytest.raises(InputError):
        denoise_array(bad, tiny2d, CARD, device="cpu")


def test_determinism_and_mc_dropout(noisy_slab, tiny2d):
    img = noisy_slab[1, :40, :40]
    r1 = denoise_array(img, tiny2d, CARD, device="cpu", mc_samples=3, seed=7)
    r2 = denoise_array(img, tiny2d, CARD, device="cpu", mc_samples=3, seed=7)
    r3 = denoise_array(img, tiny2d, CARD, device="cpu", mc_samples=3, seed=8)
    assert np.array_equal(r1.denoised, r2.denoised)
    assert np.array_equal(r1.uncertainty, r2.uncertainty)
    assert float(r1.uncertainty.mean()) > 0
    assert not np.array_equal(r1.uncertainty, r3.uncertainty)
    assert np.array_equal(r1.denoised, r3.denoised)  # the estimate itself is deterministic
    assert not tiny2d.training
    assert r1.info["passes"] == 4 and r1.info["mc_samples"] == 3


def test_progress_and_cancel(noisy_slab, tiny2d):
    calls = []
    denoise_array(noisy_slab, tiny2d, CARD, device="cpu", tile=32,
                  progress=lambda f, m: calls.append((f, m)))
    fractions = [f for f, _ in calls]
    assert len(calls) >= 3 and fractions == sorted(fractions) and fractions[-1] == 1.0
    token = CancelToken()
    token.cancel()
    with pytest.raises(CancelledError):
        denoise_array(noisy_slab, tiny2d, CARD, device="cpu", cancel=token)


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(InputError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(noisy_slab, tiny2d):
    cpu = denoise_array(noisy_slab, tiny2d, CARD, device="cpu", tile=64)
    gpu = denoise_array(noisy_slab, tiny2d, CARD, device="cuda", tile=64)
    tiny2d.to("cpu")
    span = float(noisy_slab.max() - noisy_slab.min())
    assert gpu.info["device"] == "cuda" and gpu.info["amp"] in ("bfloat16", "float16")
    assert np.abs(cpu.denoised - gpu.denoised).max() < 0.02 * span


def test_cuda_oom_never_grows_a_tile_past_a_short_axis(monkeypatch):
    """A 3D model on a 6-slice slab: the halving raised the 6 to MIN_TILE (16), and that tile broke the
    next pass with a broadcasting error instead of another retry or the CPU fallback (review, session 35)."""
    import dualnet.device as device_mod
    import dualnet.inference as inf

    class FakeCuda3D(torch.nn.Module):
        config = {"kind": "dncnn", "dim": 3, "preset": "tiny"}

        def forward(self, x):
            return {"out": x.clone(), "sigma": None, "alpha": None, "blind": None}

        def to(self, dev=None, **kwargs):
            return self

    tried, real_run = [], inf._run

    def fake_run(shape, reader, model, dim, dev, tile_shape, batch, *args, **kwargs):
        if dev.type == "cuda" and len(tried) < 3:
            tried.append(tuple(tile_shape))
            raise torch.cuda.OutOfMemoryError("simulated")
        tried.append(tuple(tile_shape))
        return real_run(shape, reader, model, dim, torch.device("cpu"), tile_shape, batch, *args, **kwargs)

    monkeypatch.setattr(device_mod, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(device_mod, "describe", lambda dev: torch.device(dev).type)
    monkeypatch.setattr(device_mod, "autocast_dtype", lambda dev: None)
    monkeypatch.setattr(device_mod, "available_memory", lambda dev: 2 ** 30)
    monkeypatch.setattr(inf, "_run", fake_run)
    x = np.random.default_rng(0).normal(100, 10, (6, 40, 40)).astype(np.float32)
    res = denoise_array(x, FakeCuda3D(), {"normalisation": {"method": "zscore"}}, device="cuda", tile=(6, 32, 32),
                        guard=False)
    assert all(t[0] <= 6 for t in tried) and tried[-1][1] < 32
    np.testing.assert_allclose(res.denoised, x, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("shape, kw", [((1, 40), dict(tta=4)), ((1, 24, 24), dict(views=3, tta=4)),
                                       ((3, 1, 30), dict(tta=8)), ((2, 30, 1), dict(tta=8))])
def test_tta_on_a_one_voxel_side(shape, kw):
    """A quarter turn of a tile 1 voxel high gives a negative stride on that axis, which numpy calls
    contiguous and torch refused (a traceback for `--views 3 --tta x4` on a one-slice volume)."""
    x = np.random.default_rng(0).normal(100, 10, shape).astype(np.float32)
    res = denoise_array(x, Identity(), CARD, device="cpu", guard=False, **kw)
    np.testing.assert_allclose(res.denoised, x, rtol=1e-5, atol=1e-3)


def test_cuda_oom_halves_tiles_then_falls_back_to_cpu(monkeypatch):
    """Simulated CUDA: every CUDA run raises OutOfMemoryError -> smaller tiles, then the CPU."""
    import dualnet.device as device_mod
    import dualnet.inference as inf

    class FakeCudaModel(Identity):
        def to(self, dev=None, **kwargs):  # CPU-only torch cannot move to CUDA; layout changes are no-ops
            if dev is not None:
                self.dev = torch.device(dev)
            return self

    tiles_tried = []
    real_run = inf._run

    def fake_run(shape, reader, model, dim, dev, tile_shape, *args, **kwargs):
        if dev.type == "cuda":
            tiles_tried.append(tile_shape)
            raise torch.cuda.OutOfMemoryError("simulated")
        return real_run(shape, reader, model, dim, dev, tile_shape, *args, **kwargs)

    monkeypatch.setattr(device_mod, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(device_mod, "describe", lambda dev: torch.device(dev).type)
    monkeypatch.setattr(device_mod, "autocast_dtype", lambda dev: None)
    monkeypatch.setattr(device_mod, "available_memory", lambda dev: 2 ** 30)
    monkeypatch.setattr(inf, "_run", fake_run)
    messages = []
    img = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    res = denoise_array(img, FakeCudaModel(), CARD, device="cuda", tile=64,
                        progress=lambda f, m: messages.append(m))
    assert res.info["fallback"] == "cpu" and res.info["device"] == "cpu"
    assert res.info["oom_retries"] == len(tiles_tried) >= 3
    assert tiles_tried[-1][1] < tiles_tried[0][1]  # tiles were halved before giving up
    assert any("out of memory" in m and "CPU" in m for m in messages)
    np.testing.assert_allclose(res.denoised, img, rtol=1e-5, atol=1e-2)


def test_progress_never_goes_back_when_no_guard_pass_runs():
    """A 3D model on MRI: the guard is on by default but runs no pass (3D); the bar went from 0.99 back
    to 0.8 for its step (review of session 35's change)."""
    torch.manual_seed(0)
    net = build_model("tiny", 3).eval()
    seen = []
    x = np.random.default_rng(0).normal(100, 10, (8, 24, 24)).astype(np.float32)
    res = denoise_array(x, net, CARD, device="cpu", modality="mri", progress=lambda f, m: seen.append(f))
    assert res.info["guard"]["weight"] == 1.0 and "3D" in res.info["guard"]["reason"]
    assert all(a <= b + 1e-9 for a, b in zip(seen, seen[1:])) and seen[-1] == pytest.approx(1.0)
