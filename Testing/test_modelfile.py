"""Model files: safetensors + JSON card round trip, tamper/mismatch detection, safe .pt loading."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from dualnet import modelfile  # noqa: E402
from dualnet.errors import ModelError  # noqa: E402
from dualnet.modelfile import (default_model_path, load_model, require_default_model,  # noqa: E402
                               save_model, sha256_file)
from dualnet.models import build_baseline, build_model  # noqa: E402

CARD = {
    "modality": "mri",
    "normalisation": {"method": "percentile", "p_low": 0.5, "p_high": 99.5},
    "training": {"data": "unit test", "steps": 0},
    "version": "0.0.1",
    "metrics": {"psnr_db": 0.0},
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("tiny", 2, dropout=0.1).eval()
    path = tmp_path_factory.mktemp("models") / "m.safetensors"
    save_model(path, model, CARD)
    return path, model


def _copy(saved, tmp_path: Path) -> Path:
    path, _ = saved
    dst = tmp_path / path.name
    dst.write_bytes(path.read_bytes())
    dst.with_suffix(".json").write_text(path.with_suffix(".json").read_text(), encoding="utf-8")
    return dst


def test_round_trip(saved):
    path, model = saved
    card = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    assert card["format_version"] == 1
    assert card["architecture"]["kind"] == "dualnet" and card["architecture"]["dim"] == 2
    for key in ("preset", "sr", "use_neb", "use_nonlocal", "dropout"):
        assert key in card["architecture"]
    assert card["sha256"] == sha256_file(path)
    assert card["modality"] == "mri" and card["training"]["steps"] == 0
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    loaded, card2 = load_model(path, "cpu")
    assert card2 == card and not loaded.training
    x = torch.randn(1, 1, 20, 18)
    with torch.no_grad():
        assert torch.equal(model(x)["out"], loaded(x)["out"])
    loaded_via_card, _ = load_model(path.with_suffix(".json"))
    assert type(loaded_via_card) is type(loaded)


def test_baseline_round_trip(tmp_path):
    model = build_baseline("n2v", 3).eval()
    path = save_model(tmp_path / "n2v.safetensors", model, CARD)
    loaded, card = load_model(path)
    assert card["architecture"]["kind"] == "n2v" and card["architecture"]["dim"] == 3
    x = torch.randn(1, 1, 5, 9, 8)
    with torch.no_grad():
        assert torch.equal(model(x)["out"], loaded(x)["out"])


def test_flipped_byte_is_rejected(saved, tmp_path):
    path = _copy(saved, tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="m.safetensors.*SHA-256"):
        load_model(path)


def test_wrong_architecture_in_card_is_rejected(saved, tmp_path):
    path = _copy(saved, tmp_path)
    cpath = path.with_suffix(".json")
    card = json.loads(cpath.read_text(encoding="utf-8"))
    card["architecture"]["preset"] = "small"  # hash still matches: the weights do not
    cpath.write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(ModelError, match="do not match the card's architecture"):
        load_model(path)
    card["architecture"]["kind"] = "resnet"
    cpath.write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(ModelError, match="invalid architecture"):
        load_model(path)


def test_missing_or_broken_card(saved, tmp_path):
    path = _copy(saved, tmp_path)
    cpath = path.with_suffix(".json")
    cpath.write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelError, match="unreadable model card"):
        load_model(path)
    cpath.unlink()
    with pytest.raises(ModelError, match="card missing"):
        load_model(path)
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "absent.safetensors")


def test_a_huge_number_in_the_card_is_a_one_line_model_error(saved, tmp_path):
    """An integer of 400 digits (past float range) raised OverflowError, one of 5000 digits (past
    Python's digit limit) a bare ValueError: tracebacks, not ModelError."""
    path = _copy(saved, tmp_path)
    cpath = path.with_suffix(".json")
    text = cpath.read_text(encoding="utf-8")
    card = json.loads(text)
    for digits in (400, 5000):
        bad = dict(card, normalisation={"method": "percentile", "p_low": 0.5, "p_high": 99.5})
        raw = json.dumps(bad).replace('"p_high": 99.5', '"p_high": 1' + "0" * digits)
        cpath.write_text(raw, encoding="utf-8")
        with pytest.raises(ModelError):
            load_model(path)


def test_truncated_weights_with_matching_hash(saved, tmp_path):
    """A corrupt file whose hash was also 'fixed' still fails cleanly in safetensors."""
    path = _copy(saved, tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    cpath = path.with_suffix(".json")
    card = json.loads(cpath.read_text(encoding="utf-8"))
    card["sha256"] = sha256_file(path)
    cpath.write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(ModelError, match="corrupt safetensors"):
        load_model(path)


def test_save_checks_card(tmp_path):
    model = build_model("tiny", 2)
    with pytest.raises(ModelError, match="normalisation"):
        save_model(tmp_path / "a.safetensors", model, {"modality": "mri"})
    with pytest.raises(ModelError, match="modality"):
        save_model(tmp_path / "a.safetensors", model, {**CARD, "modality": "pet"})
    with pytest.raises(ModelError, match=".safetensors"):
        save_model(tmp_path / "a.pt", model, CARD)
    with pytest.raises(ModelError, match="differs"):
        save_model(tmp_path / "a.safetensors", model,
                   {**CARD, "architecture": {"kind": "dualnet", "dim": 3}})
    assert not list(tmp_path.iterdir())


def test_pt_checkpoint_loaded_weights_only(saved, tmp_path):
    _, model = saved
    pt = tmp_path / "ckpt.pt"
    torch.save({"state_dict": model.state_dict(), "step": 3}, pt)
    card = json.loads(saved[0].with_suffix(".json").read_text(encoding="utf-8"))
    card["sha256"] = sha256_file(pt)
    pt.with_suffix(".json").write_text(json.dumps(card), encoding="utf-8")
    loaded, _ = load_model(pt)
    x = torch.randn(1, 1, 9, 9)
    with torch.no_grad():
        assert torch.equal(model(x)["out"], loaded(x)["out"])
    # embedded card, no JSON beside the checkpoint
    pt2 = tmp_path / "ckpt2.pt"
    torch.save({"model": model.state_dict(), "card": card}, pt2)
    load_model(pt2)


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_payload_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    pt = tmp_path / "evil.pt"
    with open(pt, "wb") as fh:
        pickle.dump({"w": _Evil(str(marker))}, fh, protocol=2)
    torch.save({"w": torch.zeros(1)}, tmp_path / "ok.pt")  # sanity: torch.save works here
    pt.with_suffix(".json").write_text(json.dumps({"format_version": 1}), encoding="utf-8")
    with pytest.raises(ModelError, match="evil.pt: not a safe weights-only"):
        load_model(pt)
    assert not marker.exists()


def test_default_model_paths(monkeypatch, tmp_path):
    path = default_model_path("ct")
    assert path.name == "dualnet_ct.safetensors" and path.parent.name == "weights"
    monkeypatch.setattr(modelfile, "default_model_path",
                        lambda modality: tmp_path / f"dualnet_{modality}.safetensors")
    with pytest.raises(ModelError, match="no shipped model for modality us yet"):
        require_default_model("us")
    from dualnet.errors import InputError

    with pytest.raises(InputError):
        default_model_path("pet")
