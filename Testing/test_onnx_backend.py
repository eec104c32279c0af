"""ONNX Runtime for the CPU forward pass, and the NEB maps shared by the orthogonal views.

Real seams: the shipped model files and their shipped ``.onnx`` graphs through the real loader
(hash checks) and the real ``onnxruntime``; ``torch.onnx`` export of a freshly built network by
``scripts/export_onnx.py``; the real tiled inference on a real T1 crop degraded by the project's
Rician model.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dualnet import onnx_backend
from dualnet.degrade import degrade
from dualnet.errors import ModelError
from dualnet.inference import denoise_array
from dualnet.modelfile import card_path, default_model_path, load_model, read_card, save_model, sha256_file
from dualnet.models import build_model

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("modality", ["mri", "ct", "us"])
def test_shipped_graphs_are_the_shipped_weights(modality):
    """Each shipped card names graphs made from its own weights, and ONNX Runtime computes what
    PyTorch computes with them (odd sizes: the padding to the network's stride is in the graph)."""
    path = default_model_path(modality)
    card = read_card(path)
    entry = card["onnx"]
    assert entry["weights_sha256"] == card["sha256"] == sha256_file(path)
    net, _ = load_model(path, "cpu")
    graphs = net.onnx_graphs
    assert graphs is not None and set(graphs.paths) == set(entry["graphs"])
    assert ("restore" in graphs.paths) == (modality != "us")  # ultrasound frames have one view
    x = torch.rand(2, net.input_channels, 45, 38, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = net(x)
        got = onnx_backend.forward_for(net, torch.device("cpu"), 1)(x.numpy())
        assert set(got) == {"out", "sigma", "alpha", "blind", "gate"}
        for key, val in got.items():
            np.testing.assert_allclose(val, ref[key].numpy(), rtol=0, atol=1e-4)
        if "restore" in graphs.paths:
            xe = torch.cat([x, ref["blind"], torch.log(ref["sigma"]), ref["gate"]], 1)
            got = onnx_backend.forward_for(net, torch.device("cpu"), 1, graph="restore")(xe.numpy())
            np.testing.assert_allclose(got["out"], ref["out"].numpy(), rtol=0, atol=1e-4)
            np.testing.assert_array_equal(net.restore(xe)["out"].numpy(), ref["out"].numpy())


def _copy_model(tmp_path: Path, modality: str = "ct") -> Path:
    src = default_model_path(modality)
    for f in [src, card_path(src)] + [src.parent / g["file"] for g in read_card(src)["onnx"]["graphs"].values()]:
        shutil.copy(f, tmp_path / f.name)
    return tmp_path / src.name


def test_a_changed_graph_is_refused_and_a_stale_one_ignored(tmp_path):
    path = _copy_model(tmp_path)
    graph = tmp_path / read_card(path)["onnx"]["graphs"]["restore"]["file"]
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 1
    graph.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="SHA-256 mismatch"):
        load_model(path)

    path = _copy_model(tmp_path)  # intact files again; the card now says another model made them
    card = read_card(path)
    card["onnx"]["weights_sha256"] = "0" * 64
    card_path(path).write_text(json.dumps(card))
    with pytest.warns(UserWarning, match="exported from other weights"):
        net, _ = load_model(path)
    assert net.onnx_graphs is None

    card["onnx"] = {"graphs": {"forward": {"file": "../elsewhere.onnx", "sha256": "0" * 64}}}
    card_path(path).write_text(json.dumps(card))
    with pytest.raises(ModelError, match="file name beside the weights"):
        load_model(path)


def test_changed_parameters_run_in_pytorch_and_saving_drops_the_graphs(tmp_path):
    net, card = load_model(default_model_path("mri"))
    cpu = torch.device("cpu")
    assert onnx_backend.forward_for(net, cpu, 1) is not None
    with torch.no_grad():  # as fine-tuning in memory does
        next(net.parameters()).add_(0.01)
    assert onnx_backend.forward_for(net, cpu, 1) is None
    out = save_model(tmp_path / "tuned.safetensors", net, card)
    assert "onnx" not in read_card(out)  # the graphs belong to the weights they were made from
    assert load_model(out)[0].onnx_graphs is None


@pytest.fixture(scope="module")
def t1_noisy(mri_crop):
    d = degrade(mri_crop, "mri", 0.05, lr_factor=2, spacing_zyx=(1.0, 1.0, 1.0), rng=3)
    return d.noisy_lr.astype(np.float32), d.clean_lr.astype(np.float32)


def test_onnxruntime_and_pytorch_give_the_same_result(t1_noisy, monkeypatch, one_thread):
    noisy, _ = t1_noisy
    net, card = load_model(default_model_path("mri"))
    runs = {}
    for backend in ("onnx", "torch"):
        monkeypatch.setenv(onnx_backend.BACKEND_ENV, backend)
        runs[backend] = denoise_array(noisy, net, card, device="cpu", modality="mri")
    assert runs["onnx"].info["backend"] == "onnxruntime"
    assert runs["torch"].info["backend"] == "torch"
    scale = float(noisy.max())
    for key in ("denoised", "sigma_map", "alpha_map"):
        a, b = getattr(runs["onnx"], key), getattr(runs["torch"], key)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * (scale if key != "alpha_map" else 1.0))


def test_the_other_views_read_the_first_views_noise_maps(t1_noisy, one_thread):
    """Three views: the NEB runs along z only; y and x run the restoration branch on its maps, so
    the maps of the result are the first view's, and the mean still beats one view."""
    noisy, clean = t1_noisy
    net, card = load_model(default_model_path("mri"))
    calls = {"forward": 0, "restore": 0}
    forward, restore = net.forward, net.restore

    def count_forward(x):
        calls["forward"] += x.shape[0]
        return forward(x)

    def count_restore(x):
        calls["restore"] += x.shape[0]
        return restore(x)

    net.forward, net.restore = count_forward, count_restore  # PyTorch path: the calls are seen
    net.onnx_graphs = None
    three = denoise_array(noisy, net, card, device="cpu", modality="mri")
    one = denoise_array(noisy, net, card, device="cpu", modality="mri", views=1)
    assert three.info["views"] == 3
    z, y, x = noisy.shape
    guard = [sum(b - a for a, b in v["slices"]) for v in three.info["guard"]["views"]]
    one_guard = sum(b - a for a, b in one.info["guard"]["slices"])
    assert calls["forward"] == 2 * z + guard[0] + one_guard  # the NEB along z only (both runs)
    assert calls["restore"] == y + x + guard[1] + guard[2]
    np.testing.assert_array_equal(three.sigma_map, one.sigma_map)  # the z view's maps
    np.testing.assert_array_equal(three.alpha_map, one.alpha_map)
    err = {n: float(np.mean((r.denoised.astype(np.float64) - clean) ** 2)) for n, r in (("1", one), ("3", three))}
    assert err["3"] < err["1"], err


def test_export_script_writes_checked_graphs(tmp_path):
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    net = build_model("tiny", 2, context=3, noise_map=True, use_nonlocal=False)
    card = {"modality": "mri", "normalisation": {"method": "zscore"}, "orthogonal_views": True}
    path = save_model(tmp_path / "m.safetensors", net, card)
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_onnx.py"), str(path)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    entry = read_card(path)["onnx"]
    assert set(entry["graphs"]) == {"forward", "restore"} and entry["max_abs_diff_vs_torch"] < 1e-4
    loaded, _ = load_model(path)
    assert loaded.onnx_graphs is not None
    x = torch.rand(1, loaded.input_channels, 20, 28)
    with torch.inference_mode():
        got = onnx_backend.forward_for(loaded, torch.device("cpu"), 1)(x.numpy())["out"]
        np.testing.assert_allclose(got, loaded(x)["out"].numpy(), rtol=0, atol=1e-4)


def test_denoising_on_the_cpu_never_imports_pytorch(tmp_path, t1_noisy):
    """What `dualnet denoise` loads on the CPU: the checked graphs alone; PyTorch stays unimported
    (a fresh process; about 1.7 s of every run here), and the result is the PyTorch-loaded model's."""
    from dualnet.io import Volume, write_volume

    noisy, _ = t1_noisy
    src = tmp_path / "noisy.nii.gz"
    write_volume(Volume(noisy, (2.0, 2.0, 2.0)), src)
    code = (
        "import sys, json\n"
        "from dualnet import api\n"
        "from dualnet.io import read_volume, write_volume\n"
        f"res = api.denoise_volume(read_volume({str(src)!r}), method='dualnet', modality='mri', device='cpu')\n"
        f"write_volume(res.volume, {str(tmp_path / 'out.nii.gz')!r})\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'backend': res.info.get('inference_backend')}))\n"
    )
    env = {**__import__("os").environ, "DUALNET_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"torch": False, "backend": "onnxruntime"}
    from dualnet.io import read_volume

    net, card = load_model(default_model_path("mri"))
    ref = denoise_array(noisy, net, card, device="cpu", modality="mri", spacing_zyx=(2.0, 2.0, 2.0))
    np.testing.assert_allclose(read_volume(tmp_path / "out.nii.gz").array, ref.denoised, rtol=0,
                               atol=1e-5 * float(noisy.max()))


def test_graph_only_loading_and_its_limits(monkeypatch, tmp_path):
    from dualnet import device as device_mod
    from dualnet.errors import InputError
    from dualnet.modelfile import load_for_inference

    path = default_model_path("ct")
    net, card = load_for_inference(path, "cpu")
    assert isinstance(net, onnx_backend.GraphNet) and net.input_channels == 6 and onnx_backend.can_restore(net)
    assert isinstance(load_for_inference(path, "cpu", mc=True)[0], torch.nn.Module)  # MC dropout: PyTorch
    assert isinstance(load_for_inference(path, "cuda")[0], torch.nn.Module)
    us, _ = load_for_inference(default_model_path("us"), "cpu")
    assert isinstance(us, onnx_backend.GraphNet) and not onnx_backend.can_restore(us)  # one view only
    img = np.random.default_rng(0).normal(-500.0, 20.0, (40, 40)).astype(np.float32)  # noise to estimate
    with pytest.raises(InputError, match="Monte-Carlo dropout needs the PyTorch network"):
        denoise_array(img, net, card, device="cpu", mc_samples=2)
    with pytest.raises(InputError, match="runs on the CPU only"):
        denoise_array(img, net, card, device="cuda")
    with pytest.raises(ModelError, match="cannot train"):
        net.train()
    monkeypatch.setenv(onnx_backend.BACKEND_ENV, "torch")
    assert isinstance(load_for_inference(path, "cpu")[0], torch.nn.Module)
    # "auto" means the CPU without asking PyTorch only for a build without GPU support (read from its
    # version.py), and only while PyTorch is not imported (here it is: then PyTorch decides)
    assert not device_mod.cpu_without_torch("auto") and device_mod.cpu_without_torch("cpu")
    pkg = tmp_path / "torch"
    pkg.mkdir()
    fake = type("Spec", (), {"submodule_search_locations": [str(pkg)]})()
    monkeypatch.setattr("importlib.util.find_spec", lambda name: fake)
    monkeypatch.delitem(sys.modules, "torch")
    for text, cpu in (("cuda: Optional[str] = None\nhip: Optional[str] = None\n", True),
                      ("cuda: Optional[str] = '12.8'\nhip: Optional[str] = None\n", False),
                      ("cuda = None\nhip = '6.2'\n", False), ("", False)):
        (pkg / "version.py").write_text(text)
        assert device_mod.cpu_without_torch("auto") == (cpu and sys.platform != "darwin"), text
