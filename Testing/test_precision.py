"""CPU bf16 inference (dualnet.precision): which hosts run it, that the intensity layers stay fp32
inside it, that it gives the fp32 result to bf16 accuracy, and the options that ask for it.

The suite pins "auto" to fp32 (conftest.py, $DUALNET_PRECISION); these tests ask for bf16 or clear
the variable themselves. bf16 runs on any CPU (emulated where the hardware lacks it: slower, same
numbers), so these tests run everywhere.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli_helpers import run_dualnet
from dualnet import device, precision
from dualnet.errors import InputError, ModelError
from dualnet.inference import denoise_array
from dualnet.io import Volume, write_volume
from dualnet.modelfile import default_model_path, load_for_inference, save_model
from dualnet.models import build_model
from dualnet.noise import add_noise
from dualnet.onnx_backend import GraphNet


@pytest.fixture
def amx(monkeypatch):
    """This host as one with AMX bf16, inference on one thread, "auto" not pinned by the environment."""
    monkeypatch.delenv(precision.PRECISION_ENV, raising=False)
    monkeypatch.setenv("DUALNET_NUM_THREADS", "1")
    monkeypatch.setattr(device, "cpu_has_amx_bf16", lambda cpuinfo="/proc/cpuinfo": True)


def test_auto_means_bf16_only_where_the_cpu_has_amx_bf16(tmp_path, monkeypatch):
    flags = {"amx": "fpu avx512f avx512_bf16 amx_tile amx_bf16", "zen4": "fpu avx512f avx512_bf16", "avx2": "fpu avx2"}
    for name, line in flags.items():
        (tmp_path / name).write_text(f"processor\t: 0\nflags\t\t: {line}\n")
    assert [device.cpu_has_amx_bf16(str(tmp_path / n)) for n in flags] == [True, False, False]
    assert [device.cpu_has_fast_bf16(str(tmp_path / n)) for n in flags] == [True, True, False]
    assert device.cpu_has_amx_bf16(str(tmp_path / "missing")) is False

    monkeypatch.delenv(precision.PRECISION_ENV, raising=False)
    for threads in ("1", "2"):  # session 30: bf16 was faster end to end on two threads too
        monkeypatch.setenv("DUALNET_NUM_THREADS", threads)
        for has_amx in (True, False):
            monkeypatch.setattr(device, "cpu_has_amx_bf16", lambda cpuinfo="/proc/cpuinfo", v=has_amx: v)
            assert precision.wants_bf16("auto") is has_amx and precision.wants_bf16(None) is has_amx
            assert precision.wants_bf16("bfloat16") and not precision.wants_bf16("float32")
    monkeypatch.setattr(device, "cpu_has_amx_bf16", lambda cpuinfo="/proc/cpuinfo": True)
    monkeypatch.setenv(precision.PRECISION_ENV, "float32")  # the environment decides what auto means ...
    assert not precision.wants_bf16("auto") and precision.wants_bf16("BFloat16")  # ... not an explicit choice
    monkeypatch.setenv(precision.PRECISION_ENV, "half")
    with pytest.raises(InputError, match=r"\$DUALNET_PRECISION: precision 'half'"):
        precision.wants_bf16("auto")
    with pytest.raises(InputError, match="choose one of auto, float32, bfloat16"):
        precision.check_precision("fp16")


def _conv_dtypes(net: torch.nn.Module) -> tuple:
    """Forward hooks recording each convolution's output dtype by name; (record, handles)."""
    seen: dict = {}

    def record(name: str):
        def hook(mod, args, out) -> None:
            seen.setdefault(name, out.dtype)
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]
    return seen, handles


def test_bf16_keeps_the_intensity_layers_in_fp32_and_gives_the_fp32_result(mri_crop, one_thread):
    torch.manual_seed(0)
    net = build_model("tiny", 2, context=3, noise_map=True, use_nonlocal=False).eval()
    card = {"modality": "mri", "normalisation": {"method": "zscore"}}
    clean = mri_crop[:6, :48, :40].astype(np.float32)
    noisy = add_noise(clean, "mri", 0.05, rng=1).astype(np.float32)
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules())

    seen, handles = _conv_dtypes(net)
    half = denoise_array(noisy, net, card, device="cpu", modality="mri", views=1, guard=False, precision="bfloat16")
    for h in handles:
        h.remove()
    full = denoise_array(noisy, net, card, device="cpu", modality="mri", views=1, guard=False, precision="float32")

    assert half.info["precision"] == "bfloat16" and half.info["backend"] == "torch"
    assert full.info["precision"] == "float32"
    kept = set(net.full_precision_modules())
    assert kept == {"srb.inc", "srb.enc.0", "neb.features.stack.0.conv", "neb.blind_head"}
    convs_kept = {n for n in seen if any(n == k or n.startswith(k + ".") for k in kept)}
    assert convs_kept and all(seen[n] == torch.float32 for n in convs_kept), seen
    others = {n: d for n, d in seen.items() if n not in convs_kept}
    assert others and all(d == torch.bfloat16 for d in others.values()), others  # the rest ran in bf16
    # the scope leaves nothing behind: autocast off, no hooks left on the network
    assert not torch.is_autocast_enabled("cpu")
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules()) == hooks_before
    assert np.isfinite(half.denoised).all() and half.denoised.dtype == np.float32
    span = float(clean.max() - clean.min())
    diff = np.abs(half.denoised.astype(np.float64) - full.denoised)
    assert 0 < diff.max() < 2e-2 * span and diff.mean() < 2e-3 * span, (diff.max() / span, diff.mean() / span)


def test_where_bf16_cannot_run(tmp_path, amx):
    from dualnet.api import check_options

    path = default_model_path("ct")
    graphs, card = load_for_inference(path, "cpu", precision="float32")
    assert isinstance(graphs, GraphNet)  # fp32: ONNX Runtime as before
    net, _ = load_for_inference(path, "cpu")  # auto on an AMX host: the PyTorch network, for bf16
    assert isinstance(net, torch.nn.Module) and precision.resolve("auto", net, torch.device("cpu")) == "bfloat16"
    assert precision.resolve("auto", net, torch.device("cuda")) == "float32"  # CUDA keeps its autocast
    assert precision.resolve("auto", graphs, torch.device("cpu")) == "float32"
    with pytest.raises(InputError, match="needs a DUAL-NET in PyTorch on the CPU"):
        denoise_array(np.zeros((24, 24), np.float32) - 500, graphs, card, device="cpu", precision="bfloat16")
    with pytest.raises(InputError, match="needs a DUAL-NET in PyTorch on the CPU"):  # before any GPU is looked for
        denoise_array(np.zeros((24, 24), np.float32) - 500, net, card, device="cuda", precision="bfloat16")
    from dualnet.models.baselines import DnCNN

    base = save_model(tmp_path / "dncnn.safetensors", DnCNN(2), {"modality": "mri", "normalisation": {"method": "zscore"}})
    loaded, _ = load_for_inference(base, "cpu")
    assert precision.resolve("auto", loaded, torch.device("cpu")) == "float32"  # no named intensity layers
    with pytest.raises(InputError, match="--precision applies to the network only"):
        check_options(np.zeros((8, 8), np.float32), "x", method="gaussian", modality="mri", precision="float32")
    with pytest.raises(InputError, match="precision 'fp8'"):
        check_options(np.zeros((8, 8), np.float32), "x", method="dualnet", modality="mri", precision="fp8")


def test_the_environment_bf16_leaves_networks_that_cannot_run_it_in_fp32(tmp_path, monkeypatch):
    """$DUALNET_PRECISION says what "auto" means; it made every DnCNN / ONNX / GPU run fail as if the
    user had asked for bf16 (review, session 35). Asking for it explicitly still fails clearly."""
    from dualnet.models.baselines import DnCNN

    base = save_model(tmp_path / "dncnn.safetensors", DnCNN(2), {"modality": "mri", "normalisation": {"method": "zscore"}})
    loaded, card = load_for_inference(base, "cpu")
    monkeypatch.setenv(precision.PRECISION_ENV, "bfloat16")
    assert precision.resolve("auto", loaded, torch.device("cpu")) == "float32"
    res = denoise_array(np.ones((24, 24), np.float32), loaded, card, device="cpu", guard=False)
    assert res.info["precision"] == "float32"
    with pytest.raises(InputError, match="needs a DUAL-NET in PyTorch on the CPU"):
        precision.resolve("bfloat16", loaded, torch.device("cpu"))


def test_the_command_runs_bf16_when_asked_and_says_so(tmp_path, mri_crop, capfd, one_thread):
    noisy = add_noise(mri_crop[:4, :40, :40].astype(np.float32), "mri", 0.05, rng=2).astype(np.float32)
    src = tmp_path / "noisy.nii.gz"
    write_volume(Volume(noisy, (2.0, 2.0, 2.0)), src)
    infos = {}
    for prec in ("bfloat16", "float32"):
        out, info = tmp_path / f"{prec}.nii.gz", tmp_path / f"{prec}.json"
        code, _, err = run_dualnet(["denoise", src, out, "--modality", "mri", "--precision", prec,
                                    "--info-json", info, "--quiet"], capfd)
        assert code == 0, err
        infos[prec] = json.loads(info.read_text())
    assert infos["bfloat16"]["inference_precision"] == "bfloat16"
    assert infos["bfloat16"]["inference_backend"] == "torch"
    assert infos["float32"]["inference_precision"] == "float32"
    code, _, err = run_dualnet(["denoise", src, tmp_path / "g.nii.gz", "--method", "gaussian",
                                "--modality", "mri", "--precision", "float32"], capfd)
    assert code != 0 and "--precision applies to the network only" in err
    assert not (tmp_path / "g.nii.gz").exists()


def test_a_card_names_the_layers_kept_in_fp32(mri_crop, one_thread):
    torch.manual_seed(0)
    net = build_model("tiny", 2, context=3, noise_map=True, use_nonlocal=False).eval()
    noisy = add_noise(mri_crop[:4, :32, :32].astype(np.float32), "mri", 0.05, rng=3).astype(np.float32)
    card = {"modality": "mri", "normalisation": {"method": "zscore"}}
    runs = {}
    for name, layers in (("default", None), ("none", []), ("inc", ["srb.inc"])):
        c = dict(card) if layers is None else dict(card, bf16_fp32_layers=layers)
        seen, handles = _conv_dtypes(net)
        res = denoise_array(noisy, net, c, device="cpu", modality="mri", views=1, guard=False, precision="bfloat16")
        for h in handles:
            h.remove()
        runs[name] = (res, seen)
    assert runs["default"][0].info["fp32_layers"] == sorted(net.full_precision_modules())
    res, seen = runs["none"]
    assert res.info["fp32_layers"] == [] and set(seen.values()) == {torch.bfloat16}, seen
    res, seen = runs["inc"]
    assert res.info["fp32_layers"] == ["srb.inc"]
    inc_convs = {n for n in seen if n == "srb.inc" or n.startswith("srb.inc.")}
    assert inc_convs and {n for n, d in seen.items() if d == torch.float32} == inc_convs, seen
    # the lists give different (all finite) results: the card's entry is what ran
    assert not np.array_equal(runs["none"][0].denoised, runs["default"][0].denoised)
    assert all(np.isfinite(r.denoised).all() for r, _ in runs.values())
    # a malformed entry or a layer the network lacks: a clear error (cards are untrusted input)
    for bad, match in (("srb.inc", "must be a list of layer names"), ([""], "must be a list of layer names"),
                       (["srb.nothing"], "'srb.nothing', which this network does not have")):
        with pytest.raises(ModelError, match=match):
            denoise_array(noisy, net, dict(card, bf16_fp32_layers=bad), device="cpu", modality="mri", views=1,
                          guard=False, precision="bfloat16")
    with pytest.raises(ModelError, match="must be a list"):  # checked even where fp32 runs
        denoise_array(noisy, net, dict(card, bf16_fp32_layers=3), device="cpu", modality="mri", views=1,
                      guard=False, precision="float32")


def test_a_kept_layer_that_raises_leaves_no_autocast_state_behind():
    from dualnet.precision import cpu_bf16

    torch.manual_seed(0)
    net = build_model("tiny", 2, context=3, noise_map=True, use_nonlocal=False).eval()
    inc = net.full_precision_modules()["srb.inc"]

    def broken(x):
        raise RuntimeError("out of memory (simulated)")

    inc.forward = broken
    x = torch.rand(1, net.input_channels, 16, 16)
    with pytest.raises(RuntimeError, match="simulated"):
        with torch.inference_mode(), cpu_bf16(net):
            net(x)
    assert not torch.is_autocast_enabled("cpu")
    assert "_dualnet_fp32_ctx" not in inc.__dict__  # the layer's fp32 scope was closed
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules()) == 0
    del inc.forward  # the layer works again, and a later bf16 pass runs as before
    with torch.inference_mode(), cpu_bf16(net):
        assert torch.isfinite(net(x)["out"]).all()
