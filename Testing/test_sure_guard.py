"""SURE guard and the noise level from repeated frames: the estimate against a known truth, the
blend on real scans (the shipped MRI model; real repeated EPI with real noise from ../shared/data),
and the command line (in-process ``dualnet``; no stand-ins)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from cli_helpers import run_dualnet as run
from dualnet import sure_guard as sg
from dualnet.errors import InputError
from dualnet.degrade import degrade
from dualnet.estimate import sigma_from_repeats
from dualnet.inference import denoise_array
from dualnet.io import read_frames
from dualnet.metrics import foreground_mask
from dualnet.modelfile import default_model_path, load_model


def _smoother(width: float):
    return lambda y: ndimage.gaussian_filter(y, width)


@pytest.mark.parametrize("width", [0.7, 3.0])
def test_sure_matches_the_true_error_and_the_blend_beats_both(width, mri_crop):
    """A linear smoother on a real crop with Gaussian noise: SURE(1) and SURE(w*) within 5 % of
    the true MSE; an over-smoothing filter (width 3) gets w* < 1 and the blend beats it and the input."""
    clean = mri_crop.astype(np.float64)
    sigma = 0.03 * clean.max()
    y = clean + np.random.default_rng(0).normal(0, sigma, clean.shape)
    f = _smoother(width)(y)
    var = np.full(y.shape, sigma**2)
    b, eps = sg.probe(y.shape, var.astype(np.float32), seed=3)
    fp = _smoother(width)(y + eps * b)
    mask = np.ones(y.shape, bool)
    res = sg.blend_weight(y, f, fp, b, eps, var, mask)
    true_f = float(np.mean((f - clean) ** 2))
    assert res["mse_network"] == pytest.approx(true_f, rel=0.05)
    assert res["mse_input"] == pytest.approx(float(np.mean((y - clean) ** 2)), rel=0.05)
    g = sg.blend(y.astype(np.float32), f.astype(np.float32).copy(), res["weight"])
    true_g = float(np.mean((g - clean) ** 2))
    assert res["mse_result"] == pytest.approx(true_g, rel=0.05)
    assert true_g <= min(true_f, float(np.mean((y - clean) ** 2))) * 1.001
    if width == 3.0:
        assert res["weight"] < 0.9


def test_guard_blocks_and_small_masks():
    blocks = sg.guard_blocks(128, 5)  # a quarter of the slices in 4 runs spread over the volume
    assert blocks == [(12, 20, 10, 22), (44, 52, 42, 54), (76, 84, 74, 86), (108, 116, 106, 118)]
    assert all(lo == z0 - 2 and hi == z1 + 2 for z0, z1, lo, hi in blocks)  # 2 context slices each side
    assert sg.guard_blocks(10, 5) == [(0, 10, 0, 10)]  # fewer than 16: all of them
    assert sg.guard_blocks(1, 1) == [(0, 1, 0, 1)]
    runs = sg.guard_blocks(17, 5)
    assert sum(z1 - z0 for z0, z1, _, _ in runs) >= 16 and all(a[1] <= b[0] for a, b in zip(runs, runs[1:]))
    z = np.zeros((4, 4))
    res = sg.blend_weight(z, z, z, z, z + 1, z + 1, np.ones_like(z, bool))
    assert res["weight"] == 1.0 and "only 16 voxels" in res["reason"]


def test_guard_keeps_the_network_where_it_helps(mri_volume):
    """Real T1 degraded as in training (x2 with anti-aliasing), Rician 5 %: the network is far
    better than the input, w* = 1, and SURE's estimates are within 10 % of the true errors."""
    net, card = load_model(default_model_path("mri"), "cpu")
    d = degrade(mri_volume.array[50:98, 30:230, 30:230].astype(np.float32), "mri", 0.05, lr_factor=2,
                spacing_zyx=mri_volume.spacing_zyx, rng=1)
    clean, noisy = d.clean_lr.astype(np.float32), d.noisy_lr.astype(np.float32)
    sigma = 0.05 * float(clean.max())
    ran = []  # slices per forward: the guard's pass runs the network on the checked slices only
    net.onnx_graphs = None  # PyTorch runs it, so the hook sees every forward
    hook = net.register_forward_hook(lambda m, args, out: ran.append(args[0].shape[0]))
    seen = []
    res = denoise_array(noisy, net, card, device="cpu", modality="mri", noise_coef=(sigma**2, 0.0, 0.0),
                        views=1, progress=lambda f, m: seen.append((f, m)))  # one view: its guard's slices checked
    hook.remove()
    # the guard's pass moves the bar (it sat at 99 % through a quarter of the work or more)
    start = next(i for i, (_, m) in enumerate(seen) if "SURE guard" in m)
    assert max(f for f, _ in seen[:start]) <= 0.8 and any(0.8 < f < 0.99 for f, _ in seen[start:])
    assert all(a <= b + 1e-9 for (a, _), (b, _) in zip(seen, seen[1:]))
    g = res.info["guard"]
    assert sum(ran) == len(clean) + sum(z1 - z0 for z0, z1 in g["slices"])  # not their context slices
    assert g["weight"] == 1.0 and g["mse_network"] < 0.5 * g["mse_input"], g
    assert g["slices"] == [[z0, z1] for z0, z1, _, _ in sg.guard_blocks(24, 5)]
    zs = np.concatenate([np.arange(z0, z1) for z0, z1 in g["slices"]])
    mask = sg.check_mask("mri", res.denoised[zs], np.full((len(zs),) + clean.shape[1:], sigma**2, np.float32))
    true = lambda a: float(np.mean((a[zs] - clean[zs])[mask] ** 2))  # noqa: E731
    assert g["mse_network"] == pytest.approx(true(res.denoised), rel=0.1)
    assert g["mse_input"] == pytest.approx(true(noisy), rel=0.1)
    off = denoise_array(noisy, net, card, device="cpu", modality="mri", noise_coef=(sigma**2, 0.0, 0.0), guard=False,
                        views=1)
    assert off.info["guard"] is None
    fg = foreground_mask(clean, "mri")
    err = lambda a: float(np.mean((a - clean)[fg] ** 2))  # noqa: E731
    assert err(res.denoised) <= err(off.denoised) * 1.02


@pytest.fixture(scope="module")
def epi(shared_data):
    path = shared_data / "real_noise" / "epi_5reps.nii.gz"
    return path, read_frames(path, 1)


def test_sigma_from_repeats_on_real_epi_and_with_a_moved_frame(epi):
    """Real repeated EPI: the frame differences give the noise of the repeats (7.3), which the
    single-image estimates get 2-3x wrong on this scan; a displaced frame does not move it."""
    _, frames = epi
    sigma, pairs = sigma_from_repeats(frames)
    ref_mask = frames.mean(0) > np.percentile(frames, 60)
    direct = float(np.std((frames[2] - frames[3])[ref_mask]) / np.sqrt(2))
    assert sigma == pytest.approx(direct, rel=0.05) and len(pairs) == frames.shape[0] - 1
    moved = frames.copy()
    moved[2] = np.roll(moved[2], 2, axis=2)  # motion: two of the four pairs go bad
    moved_sigma, moved_pairs = sigma_from_repeats(moved)
    assert max(moved_pairs) > 3 * sigma and moved_sigma == pytest.approx(sigma, rel=0.05)
    with pytest.raises(InputError, match="at least 2"):
        sigma_from_repeats(frames[:1])


def test_guard_on_real_high_snr_epi_is_not_worse_than_the_input(epi):
    """At 0.2 % noise (below the training range) the network alone is worse than the input on this
    EPI; with the sigma from the frames the guard blends back towards the input, and the error
    (estimated against the mean of 3 other repeats) is no worse than the input's."""
    _, frames = epi
    x, reps = frames[1][16:48], frames[2:5, 16:48]
    ref = reps.mean(0)
    mask = foreground_mask(ref, "mri")
    s2 = float(np.var((reps[0] - reps[1])[mask]) / 2)
    err = lambda f: float(np.mean((f - ref)[mask] ** 2)) - s2 / 3  # noqa: E731
    sigma, _ = sigma_from_repeats(frames)
    net, card = load_model(default_model_path("mri"), "cpu")
    kw = dict(device="cpu", modality="mri", noise_coef=(sigma**2, 0.0, 0.0))
    raw = denoise_array(x, net, card, guard=False, **kw)
    res = denoise_array(x, net, card, **kw)
    assert res.info["guard"]["weight"] < 0.5
    # SURE is itself an estimate: "no worse" within 1 % of the MSE (0.5 % of the RMSE); the network
    # alone is about 2x worse than the input here (2.5x in one view, 1.9x as the mean of three)
    assert err(raw.denoised) > 1.5 * err(x) and err(res.denoised) <= 1.01 * err(x)


def test_cli_frame_uses_the_repeats_and_no_guard_is_network_only(tmp_path, epi, capfd):
    path, _ = epi
    out, info = tmp_path / "o.nii.gz", tmp_path / "info.json"
    code, _, err = run(["denoise", path, out, "--frame", "1", "--device", "cpu", "--info-json", info], capfd)
    assert code == 0, err
    res = json.loads(info.read_text())
    assert res["sigma_source"].startswith("the differences between 5 consecutive frames")
    assert res["sigma"] == pytest.approx(7.33, rel=0.03)
    assert res["inference_guard"]["weight"] < 0.5
    assert "dualnet: noise sigma 7.3" in err, err
    code, stdout, err = run(["estimate", path, "--frame", "1", "-q"], capfd)
    est = json.loads(stdout)
    assert code == 0 and est["sigma_from_frames"] == pytest.approx(res["sigma"], rel=1e-6)
    # the single-image estimate, fooled by this EPI's ghosted background (1.76x since session 29, 3x before)
    assert est["sigma"] > 1.5 * est["sigma_from_frames"]
    code, _, err = run(["denoise", path, tmp_path / "m.nii.gz", "--frame", "1", "--method", "median",
                        "--no-guard"], capfd)
    assert code == 2 and "--no-guard applies to the network only" in err, err
    assert not (tmp_path / "m.nii.gz").exists()


def test_a_ghosted_background_gets_a_warning_from_one_volume(tmp_path, epi, mri_volume, capfd):
    """One volume of the real EPI (its background holds ghosts): the single-image sigma reads 1.76x the
    repeats', and `dualnet denoise` warns, naming the way out; a simulated Rician scan (a pure Rayleigh
    background) gets no warning."""
    from dualnet.io import Volume, read_volume, write_volume

    path, _ = epi
    one = tmp_path / "one.nii.gz"
    write_volume(read_volume(path, frame=1), one)
    out, info = tmp_path / "o.nii.gz", tmp_path / "info.json"
    code, _, err = run(["denoise", one, out, "--device", "cpu", "--views", "1", "--info-json", info], capfd)
    assert code == 0, err
    res = json.loads(info.read_text())
    assert res["inference_noise_model"]["method"] == "rician-background"
    assert res["inference_noise_model"]["background_rayleigh_ratio"] > 0.92
    assert "dualnet: warning: the image background does not look like pure noise" in err
    assert "for a 4D series take it from the frames" in res["inference_noise_warning"]

    from dualnet.noise import add_noise

    head = mri_volume.array[40:120:2, ::2, ::2].astype(np.float32)  # keeps the zero background
    rician = tmp_path / "rician.nii.gz"
    write_volume(Volume(add_noise(head, "mri", 0.05, 1).astype(np.float32), (2.0, 2.0, 2.0)), rician)
    code, _, err = run(["denoise", rician, tmp_path / "r.nii.gz", "--device", "cpu", "--views", "1",
                        "--info-json", info], capfd)
    assert code == 0, err
    res = json.loads(info.read_text())
    assert "noise_warning" not in str(res) and "warning:" not in err


def test_no_guard_for_speckle(us_image):
    net, card = load_model(default_model_path("us"), "cpu")
    res = denoise_array(us_image.array[:64, :64], net, card, device="cpu", modality="us", guard=True)
    assert res.info["guard"]["weight"] == 1.0 and "speckle" in res.info["guard"]["reason"]
