"""Issue 11 hardening: no input or model is ever overwritten, nothing corrupt is read or written
silently, leftovers of killed runs are cleaned, and every failure is one line.

One test (or a few) per data-loss / silent-corruption defect of the issue, numbered as there.
Everything runs on small crops of the real scans or tiny synthetic files in ``tmp_path``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cli_helpers import run_dualnet as run, visible_lines
from dualnet.errors import InputError, ModelError
from dualnet.io import Volume, atomic_write_bytes, read_volume, write_volume

torch = pytest.importorskip("torch")

from dualnet import modelfile  # noqa: E402
from dualnet.models import build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "DualNetDenoise"
CARD = {"modality": "mri", "normalisation": {"method": "percentile", "p_low": 0.5, "p_high": 99.5},
        "training": {"data": "unit test", "steps": 0}, "version": "0.0.1"}


# ----------------------------------------------------------------------------- helpers
def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def listing(folder: Path) -> set:
    return {str(p.relative_to(folder)) for p in Path(folder).rglob("*")}


def assert_one_error(code, out, err, name: str) -> str:
    lines = visible_lines(err)
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("dualnet: error:"), err
    assert name in lines[0], (name, lines[0])
    assert not out.strip(), out
    return lines[0]


@pytest.fixture()
def scan(tmp_path, mri_crop) -> Path:
    """A real 40x64x64 T1 crop as NRRD."""
    return write_volume(Volume(mri_crop.astype(np.int16), (1.0, 1.1, 2.0)), tmp_path / "t1.nrrd")


@pytest.fixture()
def tiny_model(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "models" / "m.safetensors"
    modelfile.save_model(path, build_model("tiny", 2, dropout=0.1).eval(), CARD)
    return path


# ----------------------------------------------------------------------------- 1. --info-json
@pytest.mark.parametrize("target", ["input", "output", "uncertainty", "model card", "missing folder", "folder"])
def test_1_info_json_never_overwrites_and_fails_before_work(tmp_path, scan, tiny_model, capfd, target):
    out = tmp_path / "den.nrrd"
    unc = tmp_path / "unc.nrrd"
    path = {"input": scan, "output": out, "uncertainty": unc, "model card": tiny_model.with_suffix(".json"),
            "missing folder": tmp_path / "nope" / "info.json", "folder": tmp_path}[target]
    argv = ["denoise", scan, out, "--info-json", path]
    argv += ["--model", tiny_model, "--uncertainty", unc, "--mc-samples", "2"] if target in (
        "uncertainty", "model card") else ["--method", "gaussian"]
    before = {p: sha(p) for p in (scan, tiny_model, tiny_model.with_suffix(".json"))}
    files = listing(tmp_path)
    code, o, e = run(argv, capfd)
    assert_one_error(code, o, e, path.name)
    assert {p: sha(p) for p in before} == before
    assert listing(tmp_path) == files  # no output, uncertainty or temporary written


def test_1_info_json_written_atomically(tmp_path, scan, capfd):
    info = tmp_path / "info.json"
    code, _, err = run(["denoise", scan, tmp_path / "den.nrrd", "--method", "gaussian", "--info-json", info, "-q"],
                       capfd)
    assert code == 0, err
    assert json.loads(info.read_text())["method"] == "gaussian"
    assert listing(tmp_path) == {"t1.nrrd", "den.nrrd", "info.json"}


# ----------------------------------------------------------------------------- 2. one output guard
def test_2_finetune_never_overwrites_its_base_model(tmp_path, scan, tiny_model, capfd):
    card = tiny_model.with_suffix(".json")
    before = (sha(tiny_model), sha(card))
    for model_arg in (tiny_model, card):  # the model named by its weights or its card
        code, o, e = run(["finetune", scan, "--model", model_arg, "--out", tiny_model, "--steps", "1", "--quiet"],
                         capfd)
        assert_one_error(code, o, e, tiny_model.name)
    assert (sha(tiny_model), sha(card)) == before
    assert not (tmp_path / "models" / "m_run").exists()


def test_2_save_model_guard(tmp_path, tiny_model):
    net, _ = modelfile.load_model(tiny_model)
    before = sha(tiny_model.with_suffix(".json"))
    with pytest.raises(InputError, match="input"):
        modelfile.save_model(tiny_model, net, CARD, inputs=[tiny_model])
    with pytest.raises(InputError, match="input"):  # another stem whose card is the base card
        modelfile.check_model_output(tmp_path / "models" / "m.safetensors", [tiny_model.with_suffix(".json")])
    assert sha(tiny_model.with_suffix(".json")) == before
    with pytest.raises(InputError, match="two outputs"):
        atomic_write_bytes(tmp_path / "a.json", b"{}", outputs=[tmp_path / "a.json"])


# ----------------------------------------------------------------------------- 3. truncation
def _nifti(tmp_path: Path, name: str, array: np.ndarray) -> Path:
    path = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


@pytest.mark.parametrize("name", ["cut.nii.gz", "cut.nii"])
def test_3_truncated_nifti_refused(tmp_path, mri_crop, name):
    good = _nifti(tmp_path, "good" + name[3:], mri_crop)
    data = good.read_bytes()
    cut = tmp_path / name
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=rf"{name}: truncated") as info:
        read_volume(cut)
    assert "\n" not in str(info.value)
    assert read_volume(good).array.shape == mri_crop.shape


def test_3_header_size_checked_before_allocating(tmp_path, monkeypatch):
    header = bytearray(348 + 4)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, 600, 600, 600, 1, 1, 1, 1)
    struct.pack_into("<2h", header, 70, 16, 32)  # float32
    struct.pack_into("<f", header, 108, 352.0)
    header[344:348] = b"n+1\0"
    bomb = tmp_path / "bomb.nii.gz"
    bomb.write_bytes(gzip.compress(bytes(header)))
    assert bomb.stat().st_size < 100

    def never(*a, **k):
        raise AssertionError("the image was read (allocated) although its header cannot be right")

    monkeypatch.setattr(sitk, "ReadImage", never)
    with pytest.raises(InputError, match="bomb.nii.gz: truncated or corrupt: the header promises 600x600x600"):
        read_volume(bomb)


# ----------------------------------------------------------------------------- 4. NaN / Inf in NIfTI
@pytest.mark.parametrize("name", ["nan.nii.gz", "nan.nii", "inf64.nii.gz"])
def test_4_non_finite_nifti_refused(tmp_path, name):
    arr = np.ones((4, 5, 6), np.float64 if "64" in name else np.float32)
    arr[1, 2, 3] = np.inf if "inf" in name else np.nan
    path = _nifti(tmp_path, name, arr)
    with pytest.raises(InputError, match=rf"{name}: 1 voxels are NaN or Inf"):
        read_volume(path)
    assert read_volume(path, check_finite=False).array.shape == arr.shape  # label maps (dice) may skip it


# ----------------------------------------------------------------------------- 5. non-finite results
def _nan_weights_model(tmp_path: Path, tiny_model: Path) -> Path:
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_model))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("nan"))
    bad = tmp_path / "nan.safetensors"
    save_file(state, str(bad))
    card = json.loads(tiny_model.with_suffix(".json").read_text())
    card["sha256"] = modelfile.sha256_file(bad)
    bad.with_suffix(".json").write_text(json.dumps(card))
    return bad


def test_5_model_with_nan_weights_refused_at_load_and_save(tmp_path, tiny_model):
    bad = _nan_weights_model(tmp_path, tiny_model)
    with pytest.raises(ModelError, match="nan.safetensors: weights hold NaN or Inf"):
        modelfile.load_model(bad)
    net = build_model("tiny", 2)
    with torch.no_grad():
        next(net.parameters()).fill_(float("inf"))
    with pytest.raises(ModelError, match="NaN or Inf"):
        modelfile.save_model(tmp_path / "inf.safetensors", net, CARD)
    assert not (tmp_path / "inf.safetensors").exists()


@pytest.mark.parametrize("norm, match", [
    ({"method": "percentile", "p_low": -5, "p_high": 99.5}, r"\[0, 100\]"),
    ({"method": "percentile", "p_low": 0.5, "p_high": 150}, r"\[0, 100\]"),
    ({"method": "fixed", "low": -1e38, "high": 1e38}, "float32"),
])
def test_5_degenerate_normalisation_refused(tmp_path, tiny_model, norm, match):
    card = json.loads(tiny_model.with_suffix(".json").read_text())
    card["normalisation"] = norm
    tiny_model.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match=match):
        modelfile.load_model(tiny_model)


def test_5_network_nan_output_is_not_written(tmp_path, scan, tiny_model, capfd, monkeypatch):
    from dualnet import inference

    real = inference.denoise_array

    def nan_output(*a, **k):
        res = real(*a, **k)
        res.denoised[...] = np.nan
        return res

    monkeypatch.setattr(inference, "denoise_array", nan_output)
    files = listing(tmp_path)
    code, o, e = run(["denoise", scan, tmp_path / "den.nrrd", "--model", tiny_model, "--tile", "32"], capfd)
    line = assert_one_error(code, o, e, "m.safetensors")
    assert "NaN or Inf" in line
    assert listing(tmp_path) == files


@pytest.mark.parametrize("method, sigma", [("bm4d", "1e300"), ("nlm", "1e-300"), ("gaussian", "1e300")])
def test_5_absurd_sigma_refused_before_work(tmp_path, scan, capfd, method, sigma):
    files = listing(tmp_path)
    code, o, e = run(["denoise", scan, tmp_path / "den.nrrd", "--method", method, "--sigma", sigma], capfd)
    assert "plausible range" in assert_one_error(code, o, e, "t1.nrrd")
    assert listing(tmp_path) == files


def test_5_writer_refuses_non_finite(tmp_path):
    vol = Volume(np.zeros((3, 4, 5), np.float32))
    vol.array[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="1 NaN or Inf"):
        write_volume(vol, tmp_path / "x.nrrd")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- 6. flat formats
@pytest.mark.parametrize("ext", [".png", ".tif", ".tiff"])
def test_6_volume_to_flat_format_refused(tmp_path, scan, capfd, ext):
    files = listing(tmp_path)
    code, o, e = run(["denoise", scan, tmp_path / f"den{ext}", "--method", "gaussian"], capfd)
    assert "origin, direction or slice spacing" in assert_one_error(code, o, e, f"den{ext}")
    assert listing(tmp_path) == files
    with pytest.raises(InputError, match="2D picture"):
        write_volume(read_volume(scan), tmp_path / f"w{ext}")
    write_volume(Volume(np.arange(20, dtype=np.uint8).reshape(4, 5)), tmp_path / f"ok{ext}")  # 2D is fine


# ----------------------------------------------------------------------------- 7. checkpoints
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, mri_crop) -> Path:
    """A 3-step tiny pretraining (a few seconds): its checkpoint."""
    from dualnet.training.config import TrainConfig
    from dualnet.training.trainer import pretrain

    cfg = TrainConfig(modality="mri", preset="tiny", dim=2, patch_size=24, batch_size=2, steps=3, lr=2e-3,
                      warmup_steps=1, val_every=3, checkpoint_every=100, log_every=1, val_patches=2, num_workers=0,
                      elastic_prob=0.0, device="cpu", seed=3, threads=1, lr_factor=2, min_foreground=0.1).validate()
    out = tmp_path_factory.mktemp("ckpt")
    res = pretrain(cfg, data=[(mri_crop[:, :48, :48], (1.0, 1.0, 1.0))], out_dir=out)
    return res.checkpoint_path


def _edited(tmp_path: Path, checkpoint: Path, rehash: bool, **changes) -> Path:
    from dualnet.training.trainer import checkpoint_digest

    ck = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    for key, value in changes.items():
        if callable(value):
            value(ck)
        else:
            ck[key] = value
    if rehash:
        ck["sha256"] = checkpoint_digest(ck)
    path = tmp_path / "edited" / "checkpoint.pt"
    path.parent.mkdir(exist_ok=True)
    torch.save(ck, path)
    return path


def test_7_checkpoint_hash_catches_a_flipped_tensor_byte(tmp_path, checkpoint):
    from dualnet.training.trainer import load_checkpoint

    assert load_checkpoint(checkpoint)["step"] == 3
    data = bytearray(checkpoint.read_bytes())
    with zipfile.ZipFile(checkpoint) as zf:
        biggest = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        raw = zf.read(biggest)
    at = bytes(data).find(raw) + len(raw) // 2
    data[at] ^= 0x10
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(bytes(data))
    torch.load(str(bad), map_location="cpu", weights_only=True)  # torch itself does not notice
    with pytest.raises(ModelError, match="corrupt or edited"):
        load_checkpoint(bad)


@pytest.mark.parametrize("rehash, changes, match", [
    (False, {"step": 10**6}, "corrupt or edited"),
    (True, {"step": 10**6}, "exceeds its run length"),
    (True, {"step": -1}, "invalid step"),
    (True, {"config": "{not json"}, "'config' is not valid JSON"),
    (True, {"model": lambda ck: next(v for v in ck["model"].values() if v.is_floating_point()).fill_(float("nan"))},
     "NaN or Inf"),
])
def test_7_edited_checkpoint_refused_on_resume(tmp_path, checkpoint, mri_crop, rehash, changes, match):
    from dualnet.training.config import TrainConfig
    from dualnet.training.trainer import load_checkpoint, pretrain

    bad = _edited(tmp_path, checkpoint, rehash, **changes)
    with pytest.raises(ModelError, match=match):
        load_checkpoint(bad)
    cfg = TrainConfig.from_toml(checkpoint.parent / "config.toml")
    with pytest.raises(ModelError, match=match):
        pretrain(cfg, data=[(mri_crop[:, :48, :48], (1.0, 1.0, 1.0))], out_dir=bad.parent, resume=True)
    assert not (bad.parent / "model.safetensors").exists()  # nothing exported


def test_7_version_1_checkpoint_without_hash_still_resumes(tmp_path, checkpoint):
    from dualnet.training.trainer import load_checkpoint

    old = _edited(tmp_path, checkpoint, False, version=1, sha256=None)
    ck = torch.load(str(old), map_location="cpu", weights_only=True)
    del ck["sha256"]
    torch.save(ck, old)
    assert load_checkpoint(old)["step"] == 3


# ----------------------------------------------------------------------------- 8. leftovers
def _killed_writer(target: Path, checkpoint: bool) -> None:
    """A subprocess that starts an atomic write of ``target`` and is SIGKILLed half way."""
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from dualnet.io import atomic_path\n"
        f"with atomic_path(Path({str(target)!r}), suffix={'.tmp' if checkpoint else '.tmp.nii.gz'!r}) as tmp:\n"
        "    tmp.write_bytes(b'partial' * 100)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(CORE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
def test_8_stale_temporaries_of_killed_writers_are_removed(tmp_path, checkpoint):
    from dualnet.training.trainer import atomic_torch_save, load_checkpoint

    out = tmp_path / "den.nii.gz"
    for _ in range(3):  # each new writer removes the previous one's leftover: they never pile up
        _killed_writer(out, checkpoint=False)
        assert len([p for p in tmp_path.iterdir() if p.name.startswith(".den.nii.gz.")]) == 1
    write_volume(Volume(np.ones((3, 4, 5), np.float32)), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["den.nii.gz"]

    ck_path = tmp_path / "checkpoint.pt"
    _killed_writer(ck_path, checkpoint=True)
    legacy_old, legacy_new = tmp_path / ".checkpoint.pt.ab12cd34.tmp", tmp_path / ".checkpoint.pt.zz99yy88.tmp"
    for p in (legacy_old, legacy_new):
        p.write_bytes(b"x")
    os.utime(legacy_old, (time.time() - 7200, time.time() - 7200))
    atomic_torch_save(torch.load(str(checkpoint), map_location="cpu", weights_only=True), ck_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    # the dead writer's and the hour-old temporary go; a fresh one may belong to a live writer
    assert names == [".checkpoint.pt.zz99yy88.tmp", "checkpoint.pt", "den.nii.gz"], names
    assert load_checkpoint(ck_path)["step"] == 3


def test_8_live_writers_temporaries_are_kept(tmp_path):
    from dualnet.io import _temp_prefix, remove_stale_temporaries

    live = tmp_path / (_temp_prefix(tmp_path / "x.nrrd") + "abc.tmp.nrrd")  # this very process
    live.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path / "x.nrrd") == [] and live.exists()


def test_8_interrupt_during_write_leaves_nothing(tmp_path, scan, capfd, monkeypatch):
    """SIGTERM / Ctrl-C arriving while the output is written: no output and no temporary."""
    real = sitk.WriteImage

    def interrupted(image, path, *a):
        real(image, path, *a)
        Path(path).write_bytes(Path(path).read_bytes()[:100])  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(sitk, "WriteImage", interrupted)
    files = listing(tmp_path)
    code, _, err = run(["denoise", scan, tmp_path / "den.nii.gz", "--method", "gaussian", "-q"], capfd)
    assert code == 130 and visible_lines(err) == ["dualnet: cancelled; no output written"], err
    assert listing(tmp_path) == files


@pytest.mark.skipif(os.name == "nt", reason="SIGTERM")
def test_8_sigterm_stops_denoise_like_ctrl_c(tmp_path, scan):
    env = dict(os.environ, PYTHONPATH=str(CORE) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    files = listing(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "dualnet", "denoise", str(scan), str(tmp_path / "den.nii.gz"),
                             "--method", "bm4d", "--progress-json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stdout:
            if line.startswith("DUALNET_PROGRESS"):
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert visible_lines(err) == ["dualnet: cancelled; no output written"], err
    assert listing(tmp_path) == files


# ----------------------------------------------------------------------------- one-line errors
def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, scan, capfd, monkeypatch):
    def full(image, path, *a):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("itk::ERROR: NrrdImageIO: Write: No space left on device")

    monkeypatch.setattr(sitk, "WriteImage", full)
    files = listing(tmp_path)
    code, o, e = run(["denoise", scan, tmp_path / "den.nrrd", "--method", "gaussian", "-q"], capfd)
    assert "disk full" in assert_one_error(code, o, e, "den.nrrd")
    assert listing(tmp_path) == files

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(InputError, match="info.json: cannot write .disk full"):
        atomic_write_bytes(tmp_path / "info.json", b"{}")
    assert listing(tmp_path) == files


@pytest.mark.skipif(os.name == "nt" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_refused_before_work(tmp_path, scan, capfd):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, o, e = run(["denoise", scan, ro / "den.nrrd", "--method", "gaussian"], capfd)
        assert_one_error(code, o, e, "den.nrrd")
    finally:
        ro.chmod(0o755)


@pytest.mark.skipif(os.name == "nt", reason="SIGINT")
def test_two_quick_sigints_stop_training_with_one_line_and_a_checkpoint(tmp_path, mri_crop):
    from dualnet.training.config import DataSource, TrainConfig
    from dualnet.training.trainer import load_checkpoint

    write_volume(Volume(mri_crop), tmp_path / "crop.nii.gz")
    cfg = TrainConfig(modality="mri", preset="tiny", dim=2, patch_size=24, batch_size=2, steps=5000, lr=2e-3,
                      warmup_steps=1, val_every=1000, checkpoint_every=1000, log_every=2, val_patches=2,
                      num_workers=0, elastic_prob=0.0, device="cpu", seed=3, threads=1, lr_factor=2,
                      min_foreground=0.1, data=[DataSource(str(tmp_path / "crop.nii.gz"))]).validate()
    cfg.save(tmp_path / "c.toml")
    env = dict(os.environ, PYTHONPATH=str(CORE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "dualnet", "train", "--config", str(tmp_path / "c.toml"),
                             "--out", str(tmp_path / "run"), "--progress-json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        for line in proc.stdout:
            if line.startswith("DUALNET_PROGRESS") and json.loads(line.split(" ", 1)[1]).get("step", 0) >= 2:
                break
            assert time.time() < deadline
        proc.send_signal(signal.SIGINT)
        time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    lines = visible_lines(err)
    assert len(lines) == 1 and "SIGINT" in lines[0] and "checkpoint.pt" in lines[0], err
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] >= 2


def test_estimate_prints_valid_json_for_a_mismatched_modality(scan, capfd):
    code, out, err = run(["estimate", scan, "--modality", "ct"], capfd)
    assert code == 0, err
    res = json.loads(out, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert res["modality"] == "ct"
    assert all(v is None or np.isfinite(v) for v in (res["level"], res["sigma"]))


def test_dice_reports_absent_labels_and_doubts_intensity_images(tmp_path, scan, capfd):
    lab = np.zeros((6, 8, 8), np.uint8)
    lab[1:4, 2:6, 2:6] = 1
    a = write_volume(Volume(lab), tmp_path / "a.nrrd")
    csv_path = tmp_path / "d.csv"
    code, out, err = run(["dice", a, a, "--labels", "1,7", "--csv", csv_path], capfd)
    assert code == 0, err
    assert "label 1: Dice 1.0000" in out and "label 7: absent from both maps" in out
    assert csv_path.read_text().splitlines() == ["label,dice", "1,1.0", "7,"]
    code, out, err = run(["dice", scan, scan], capfd)
    assert code == 0 and "intensity image rather than a label map" in err
    frac = write_volume(Volume(lab.astype(np.float32) / 2), tmp_path / "frac.nrrd")
    code, o, e = run(["dice", frac, a], capfd)
    assert "not a label map" in assert_one_error(code, o, e, "frac.nrrd")


def test_every_option_has_help():
    import argparse

    from dualnet.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {act.option_strings or act.dest}" for name, p in sub.choices.items() for act in p._actions
               if not isinstance(act, argparse._HelpAction) and not act.help]
    assert not missing, missing
