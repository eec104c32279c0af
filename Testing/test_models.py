"""DUAL-NET and baseline networks: blind-spot property, shapes, presets, MC dropout, training."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dualnet.models import (build_baseline, build_model, count_parameters,  # noqa: E402
                            edge_aware_sr_loss, enable_mc_dropout, voxel_shuffle)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: much faster than oversubscribed threads on a shared small machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _blind_change(dim: int, shape, voxel) -> tuple:
    """(|change of blind at voxel|, max |change of blind elsewhere|) after changing one voxel."""
    torch.manual_seed(0)
    model = build_model("tiny", dim).double().eval()
    x = torch.randn((1, 1) + tuple(shape), dtype=torch.float64)
    y = x.clone()
    y[(0, 0) + tuple(voxel)] += 5.0
    with torch.no_grad():
        a, b = model(x)["blind"], model(y)["blind"]
    diff = (a - b).abs()[0, 0]
    at_v = float(diff[tuple(voxel)])
    diff[tuple(voxel)] = 0
    return at_v, float(diff.max()), diff


@pytest.mark.parametrize("voxel", [(9, 7), (0, 0), (16, 3)])
def test_blind_spot_2d(voxel):
    at_v, elsewhere, diff = _blind_change(2, (17, 14), voxel)
    assert at_v < 1e-12, f"blind output at the changed voxel moved by {at_v}"
    assert elsewhere > 1e-6
    # all four direct neighbours see the changed voxel
    y, x = voxel
    for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
        if 0 <= ny < 17 and 0 <= nx < 14:
            assert diff[ny, nx] > 1e-9


@pytest.mark.parametrize("voxel", [(4, 5, 3), (0, 8, 6)])
def test_blind_spot_3d(voxel):
    at_v, elsewhere, diff = _blind_change(3, (9, 10, 7), voxel)
    assert at_v < 1e-12, f"blind output at the changed voxel moved by {at_v}"
    assert elsewhere > 1e-6
    z, y, x = voxel
    for nb in ((z + 1, y, x), (z, y - 1, x), (z, y, x - 1)):
        assert diff[nb] > 1e-9


def test_out_is_not_blind():
    """The SRB output uses the centre voxel (it is a normal denoiser)."""
    torch.manual_seed(0)
    model = build_model("tiny", 2).double().eval()
    x = torch.randn(1, 1, 12, 12, dtype=torch.float64)
    y = x.clone()
    y[0, 0, 5, 5] += 5.0
    with torch.no_grad():
        assert abs(float(model(x)["out"][0, 0, 5, 5] - model(y)["out"][0, 0, 5, 5])) > 1e-3


@pytest.mark.parametrize("dim,shape", [(2, (2, 1, 37, 29)), (2, (1, 1, 5, 3)),
                                       (3, (1, 1, 13, 17, 11)), (3, (1, 1, 3, 5, 7))])
def test_forward_shapes_odd_sizes(dim, shape):
    torch.manual_seed(0)
    model = build_model("tiny", dim).eval()
    with torch.no_grad():
        res = model(torch.randn(shape))
    for key in ("out", "sigma", "alpha", "blind"):
        assert tuple(res[key].shape) == shape, key
    assert float(res["sigma"].min()) > 0
    assert 0.0 <= float(res["alpha"].min()) and float(res["alpha"].max()) <= 1.0
    assert "sr" not in res


@pytest.mark.parametrize("dim,shape", [(2, (1, 1, 11, 8)), (3, (1, 1, 5, 6, 7))])
def test_sr_output_shape(dim, shape):
    model = build_model("tiny", dim, sr=True).eval()
    with torch.no_grad():
        res = model(torch.randn(shape))
    assert tuple(res["sr"].shape) == shape[:2] + tuple(2 * s for s in shape[2:])
    loss = edge_aware_sr_loss(res["sr"], torch.zeros_like(res["sr"]))
    assert loss.ndim == 0 and float(loss) > 0


def test_voxel_shuffle_matches_pixel_shuffle_and_inverts():
    x = torch.randn(2, 12, 3, 5)
    assert torch.equal(voxel_shuffle(x, 2), torch.nn.functional.pixel_shuffle(x, 2))
    v = torch.arange(8.0).view(1, 8, 1, 1, 1)
    out = voxel_shuffle(v, 2)[0, 0]
    assert out.shape == (2, 2, 2)
    assert torch.equal(out.flatten(), torch.arange(8.0))  # channel order (rd, rh, rw)


def test_ablations_drop_neb_outputs():
    model = build_model("tiny", 2, use_neb=False, use_nonlocal=False).eval()
    with torch.no_grad():
        res = model(torch.randn(1, 1, 10, 9))
    assert res["sigma"] is None and res["alpha"] is None and res["blind"] is None
    assert res["out"].shape == (1, 1, 10, 9)
    full = count_parameters(build_model("tiny", 2))
    assert count_parameters(build_model("tiny", 2, use_nonlocal=False)) < full
    assert count_parameters(build_model("tiny", 2, use_neb=False)) < full


@pytest.mark.parametrize("dim", [2, 3])
def test_parameter_counts_ordered(dim):
    counts = {}
    for preset in ("tiny", "small", "base"):
        with torch.device("meta"):
            counts[preset] = count_parameters(build_model(preset, dim))
    assert counts["tiny"] < counts["small"] < counts["base"]
    assert 50_000 < counts["tiny"] < 300_000
    assert 0.8e6 < counts["small"] < 3e6
    if dim == 3:
        assert 30e6 < counts["base"] < 80e6


def test_cpu_wide_preset_is_cpu_in_multiples_of_32():
    """The AMX design-sweep candidate: the "cpu" layout with every SRB width and RDB growth a
    multiple of 32 (bf16 tile width), and more parameters than "cpu"."""
    from dualnet.models import PRESETS
    cpu, wide = PRESETS["cpu"], PRESETS["cpu_wide"]
    assert {k: v for k, v in wide.items() if k not in ("width", "max_width", "rdb")} == \
        {k: v for k, v in cpu.items() if k not in ("width", "max_width", "rdb")}
    kw = dict(context=5, noise_map=True, use_nonlocal=False, confidence_head="sigma_mlp")
    with torch.device("meta"):
        net = build_model("cpu_wide", 2, **kw)
        assert count_parameters(net) > 2 * count_parameters(build_model("cpu", 2, **kw))
    assert all(w % 32 == 0 for w in net.srb.widths)
    assert wide["rdb"][1] % 32 == 0


def test_unknown_preset_and_dim():
    with pytest.raises(ValueError):
        build_model("huge", 2)
    with pytest.raises(ValueError):
        build_model("tiny", 4)
    with pytest.raises(ValueError):
        build_baseline("unet++", 2)


@pytest.mark.parametrize("kind", ["dncnn", "n2v"])
@pytest.mark.parametrize("dim,shape", [(2, (1, 1, 13, 10)), (3, (1, 1, 5, 7, 6))])
def test_baselines(kind, dim, shape):
    model = build_baseline(kind, dim).eval()
    with torch.no_grad():
        res = model(torch.randn(shape))
    assert tuple(res["out"].shape) == shape
    if kind == "n2v":
        assert res["blind"] is res["out"]
    else:
        assert res["blind"] is None
    assert res["sigma"] is None and res["alpha"] is None


def test_mc_dropout_gives_spread_and_eval_is_deterministic():
    torch.manual_seed(0)
    model = build_model("tiny", 2, dropout=0.2).eval()
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        a, b = model(x)["out"], model(x)["out"]
        assert torch.equal(a, b)
        enable_mc_dropout(model)
        outs = torch.stack([model(x)["out"] for _ in range(4)])
    assert float(outs.std(0).mean()) > 1e-6
    assert not model.training  # only the dropout layers are in training mode
    assert any(m.training for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_short_training_reduces_loss(mri_crop):
    """150 Adam steps (L1, supervised) of tiny 2D DUAL-NET on real MRI with Rician noise."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    clean = mri_crop[::10, 16:48, 16:48].astype(np.float64)  # 4 slices of 32x32
    scale = np.percentile(clean, 99.5)
    clean = clean / scale
    s = 0.08
    noisy = np.sqrt((clean + s * rng.standard_normal(clean.shape)) ** 2
                    + (s * rng.standard_normal(clean.shape)) ** 2)
    xt = torch.from_numpy(noisy[:, None]).float()
    yt = torch.from_numpy(clean[:, None]).float()
    model = build_model("tiny", 2, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_fn() -> torch.Tensor:
        res = model(xt)
        return (res["out"] - yt).abs().mean() + 0.1 * (res["blind"] - xt).abs().mean()

    with torch.no_grad():
        start = float((model(xt)["out"] - yt).abs().mean())
    noisy_l1 = float((xt - yt).abs().mean())
    for _ in range(150):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        end = float((model(xt)["out"] - yt).abs().mean())
    assert end < 0.6 * start
    assert end < 0.7 * noisy_l1, f"trained L1 {end:.4f} not below the noisy input's {noisy_l1:.4f}"


@pytest.mark.parametrize("shape", [(2, 8, 8, 12), (1, 8, 4, 8, 12)])
def test_window_partition_round_trip(shape):
    from dualnet.models.layers import WindowAttention

    dim = len(shape) - 2
    attn = WindowAttention(dim, 8, 2, window=4)
    x = torch.randn(shape)
    tok, sizes = attn._windows(x)
    assert tok.shape == (shape[0] * int(np.prod(shape[2:])) // 4 ** dim, 4 ** dim, 8)
    assert torch.equal(attn._unwindows(tok, shape[0], sizes), x)
    # tokens of one window are spatial neighbours: the first window is x[..., :4, :4(, :4)]
    first = x[(0, slice(None)) + (slice(0, 4),) * dim].reshape(8, -1).T
    assert torch.equal(tok[0], first)


def test_window_attention_padding_is_masked():
    """Values in the zero-padding never reach real tokens: odd sizes equal a masked crop."""
    from dualnet.models.layers import WindowAttention

    torch.manual_seed(0)
    attn = WindowAttention(2, 8, 2, window=4).eval()
    x = torch.randn(1, 8, 4, 3)  # padded to 4x4: one padded column per window
    with torch.no_grad():
        out = attn(x)
        # same tokens, padded by hand with garbage + explicit key mask -> must match
        tok = x.flatten(2).transpose(1, 2)[0]  # (12, 8) in row-major (y, x)
        h = attn.norm1(tok + attn.pos.view(4, 4, 8)[:, :3].reshape(12, 8))
        q, k, v = attn.qkv(h).view(12, 3, 2, 4).permute(1, 2, 0, 3)
        y = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v
        t = tok + attn.proj(y.transpose(0, 1).reshape(12, 8))
        t = t + attn.mlp(attn.norm2(t))
    assert out.shape == x.shape
    torch.testing.assert_close(out[0].flatten(1).T, t, rtol=1e-4, atol=1e-5)
