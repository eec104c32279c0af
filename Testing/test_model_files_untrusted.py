"""Model files and the model store are untrusted input (review, session 35): a card's architecture is
checked before any network is built from it (the ONNX-only path built none and failed with a raw
ValueError, or ran a card the PyTorch loader refuses), deep JSON and odd tensor types fail with one
line, a graph is run from the bytes whose SHA-256 was checked, and one bad index entry or card no
longer breaks the model list nor lets removing one model delete another's file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dualnet.errors import ModelError
from dualnet.modelfile import card_path, default_model_path, load_for_inference, read_card

torch = pytest.importorskip("torch")


def _copy(tmp_path: Path, modality: str = "us") -> Path:
    src = default_model_path(modality)
    names = [src, card_path(src)] + [src.parent / g["file"] for g in (read_card(src).get("onnx") or {})
                                     .get("graphs", {}).values()]
    for f in names:
        shutil.copy(f, tmp_path / f.name)
    return tmp_path / src.name


def _edit_card(path: Path, **arch) -> None:
    card = json.loads(card_path(path).read_text(encoding="utf-8"))
    card["architecture"].update(arch)
    card_path(path).write_text(json.dumps(card), encoding="utf-8")


@pytest.mark.parametrize("arch, says", [
    (dict(dim="2d"), "dim must be 2 or 3"), (dict(context="three"), "context must be"),
    (dict(preset="no-such-preset", use_neb=False), "unknown preset"), (dict(blocks=[1, 1, 1, 200000]), "blocks"),
    (dict(context=2147483647), "context must be"), (dict(kind="resnet"), "kind must be"),
])
def test_a_card_architecture_is_checked_before_anything_is_built(tmp_path, arch, says):
    path = _copy(tmp_path)
    _edit_card(path, **arch)
    for load in (lambda: load_for_inference(path, "cpu", precision="float32"), lambda: load_for_inference(path, "cpu")):
        with pytest.raises(ModelError, match=says):
            load()


def test_deep_json_and_odd_tensor_types_are_one_line(tmp_path):
    from dualnet.modelfile import check_finite_weights

    path = _copy(tmp_path)
    card_path(path).write_text("[" * 100000, encoding="utf-8")
    with pytest.raises(ModelError, match="unreadable model card"):
        read_card(path)
    for dtype in (torch.complex64, getattr(torch, "float8_e4m3fn", torch.complex128)):
        with pytest.raises(ModelError, match="unsupported type"):
            check_finite_weights({"w": torch.zeros(2, dtype=dtype)}, "x")
    check_finite_weights({"w": torch.zeros(2), "n": torch.zeros(1, dtype=torch.int64)}, "x")  # buffers stay fine


def test_a_graph_replaced_after_the_check_is_not_what_runs(tmp_path):
    pytest.importorskip("onnxruntime")
    path = _copy(tmp_path, "mri")
    net, _ = load_for_inference(path, "cpu", precision="float32")
    graph = net.onnx_graphs.paths["forward"]
    graph.write_bytes(b"not a graph any more")  # e.g. a re-export while the model is loaded
    assert net.onnx_graphs.session("forward", 1) is not None  # the checked bytes


def _fake(folder: Path, name: str, card) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    w = folder / f"{name}.safetensors"
    w.write_bytes(b"weights")
    w.with_suffix(".json").write_text(json.dumps(card), encoding="utf-8")
    return w


def test_bad_index_entries_and_cards_do_not_break_the_model_list(tmp_path):
    from DualNetDenoiseLib.models import ModelStore

    store = ModelStore(user_dir=tmp_path / "user", shipped_dir=tmp_path / "shipped")
    store.import_model(_fake(tmp_path / "a", "odd", {"modality": 3}), name="odd")  # a card's own typo
    assert [m.label for m in store.list_models()] == ["odd (user)"]
    index = store.index_path
    for bad in ({"models": 5}, {"models": [{"name": "a", "path": None}, {"name": 2, "path": "x"}]}, "[" * 100000):
        index.write_text(bad if isinstance(bad, str) else json.dumps(bad), encoding="utf-8")
        assert store.list_models() == [] and store.clear_user_models() == 0


def test_removing_a_model_never_deletes_a_file_another_entry_uses(tmp_path):
    from DualNetDenoiseLib.models import ModelStore

    store = ModelStore(user_dir=tmp_path / "user", shipped_dir=tmp_path / "shipped")
    first = store.import_model(_fake(tmp_path / "a", "knee", {"modality": "mri"}), name="first")
    with pytest.raises(ValueError, match="already the file of the model 'first'"):
        store.import_model(Path(first.path), name="second")  # the same file, from the models folder
    index = json.loads(store.index_path.read_text(encoding="utf-8"))
    index["models"].append(dict(index["models"][0], name="second"))  # an index that already has it twice
    store.index_path.write_text(json.dumps(index), encoding="utf-8")
    assert store.remove_model("first") and Path(first.path).is_file()
    assert [m.name for m in store.user_models()] == ["second"]
    run = Path(first.path).with_name(f"{Path(first.path).stem}_run")  # its training run folder (DualNetTraining)
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"x")
    assert store.remove_model("second") and not Path(first.path).exists() and not run.exists()


def test_an_imported_model_keeps_its_onnx_graphs_and_removing_it_removes_them(tmp_path, recwarn):
    """Imports copied the weights and card only: every load of the copy warned twice that its graphs
    were missing and ran in PyTorch (review, session 35)."""
    pytest.importorskip("onnxruntime")
    from DualNetDenoiseLib.models import ModelStore
    from dualnet.onnx_backend import GraphNet

    store = ModelStore(user_dir=tmp_path / "user", shipped_dir=tmp_path / "shipped")
    entry = store.import_model(_copy(tmp_path, "mri"), name="my mri")
    net, card = load_for_inference(entry.path, "cpu", precision="float32")
    assert isinstance(net, GraphNet) and not [w for w in recwarn if "ONNX" in str(w.message)]
    assert sorted(g["file"] for g in card["onnx"]["graphs"].values()) == ["my_mri.onnx", "my_mri.restore.onnx"]
    assert store.remove_model("my mri") and sorted(p.name for p in (tmp_path / "user").iterdir()) == ["models.json"]
