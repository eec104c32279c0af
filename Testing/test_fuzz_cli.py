"""Fuzz the ``dualnet`` command with bad inputs, bad outputs and bad options (issue 11).

Every case must: exit 2, print exactly one visible line ``dualnet: error: ...`` naming the file
(or the option) at fault, print nothing on stdout, write nothing (no output, no temporary) and
leave every input byte-identical (SHA-256 before and after). Runs in-process, in seconds; the
terminal's view is captured at the file-descriptor level, so ITK's or torch's own messages
would show up as extra lines.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cli_helpers import visible_lines
from dualnet.cli import main
from dualnet.io import Volume, write_volume

torch = pytest.importorskip("torch")


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path("pwned"),))


def _truncate(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) * 2 // 3])


@pytest.fixture(scope="module")
def bad(tmp_path_factory, mri_crop) -> Path:
    """A folder of good and bad inputs."""
    from dualnet import modelfile
    from dualnet.models import build_model

    d = tmp_path_factory.mktemp("fuzz")
    crop = mri_crop[8:32, 12:52, 12:52]
    write_volume(Volume(crop.astype(np.int16), (1.0, 1.0, 2.0)), d / "t1.nrrd")
    write_volume(Volume((crop > np.median(crop)).astype(np.uint8)), d / "lab.nrrd")
    write_volume(Volume((crop > np.median(crop)).astype(np.float32) / 2), d / "frac.nrrd")
    write_volume(Volume(np.ones((2, 2, 2), np.float32)), d / "tiny.nrrd")
    img = sitk.GetImageFromArray(crop.astype(np.float32))
    for name in ("full.nii.gz", "full.nii", "full.mha", "full.tif"):
        sitk.WriteImage(img, str(d / name), name != "full.tif")
    for name in ("nii.gz", "nii", "mha", "tif"):
        _truncate(d / f"full.{name}", d / f"cut.{name}")
    nan = crop.astype(np.float32)
    nan[3, 4, 5] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(nan), str(d / "nan.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(nan), str(d / "nan.nrrd"))
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, 600, 600, 600, 1, 1, 1, 1)
    struct.pack_into("<2h", header, 70, 16, 32)
    struct.pack_into("<f", header, 108, 352.0)
    header[344:348] = b"n+1\0"
    (d / "bomb.nii.gz").write_bytes(gzip.compress(bytes(header)))
    (d / "garbage.nrrd").write_bytes(b"NRRD0004\ngarbage" * 50)
    (d / "empty.nii.gz").write_bytes(b"")
    sitk.WriteImage(sitk.Image([6, 5, 4], sitk.sitkVectorFloat32, 3), str(d / "vec.nrrd"))
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(crop[:4].astype(np.float32))] * 2), str(d / "4d.nrrd"))
    (d / "sub").mkdir()
    # models: a good one, NaN weights, a card percentile outside [0, 100], a pickle payload
    card = {"modality": "mri", "normalisation": {"method": "percentile", "p_low": 0.5, "p_high": 99.5}}
    torch.manual_seed(0)
    modelfile.save_model(d / "m.safetensors", build_model("tiny", 2, dropout=0.1).eval(), card)
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / "m.safetensors"))
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, str(d / "nanw.safetensors"))
    c = json.loads((d / "m.json").read_text())
    (d / "nanw.json").write_text(json.dumps({**c, "sha256": modelfile.sha256_file(d / "nanw.safetensors")}))
    (d / "pct.safetensors").write_bytes((d / "m.safetensors").read_bytes())
    (d / "pct.json").write_text(json.dumps({**c, "normalisation": {"method": "percentile", "p_low": 0.5,
                                                                   "p_high": 150}}))
    with open(d / "evil.pt", "wb") as fh:
        pickle.dump({"w": _Evil()}, fh, protocol=2)
    (d / "evil.json").write_text(json.dumps({"format_version": 1}))
    return d


G = ["--method", "gaussian"]
M = ["--model", "m.safetensors"]
#: (command line with paths relative to the fuzz folder, text the error line must contain)
CASES = [
    # denoise: unreadable, truncated, corrupt or unsuitable inputs
    (["denoise", "cut.nii.gz", "o.nrrd", *G], "cut.nii.gz"),
    (["denoise", "cut.nii", "o.nrrd", *G], "cut.nii"),
    (["denoise", "cut.mha", "o.nrrd", *G], "cut.mha"),
    (["denoise", "cut.tif", "o.nrrd", *G], "cut.tif"),
    (["denoise", "bomb.nii.gz", "o.nrrd", *G], "bomb.nii.gz"),
    (["denoise", "nan.nii.gz", "o.nrrd", *G], "nan.nii.gz"),
    (["denoise", "nan.nrrd", "o.nrrd", *G], "nan.nrrd"),
    (["denoise", "garbage.nrrd", "o.nrrd", *G], "garbage.nrrd"),
    (["denoise", "empty.nii.gz", "o.nrrd", *G], "empty.nii.gz"),
    (["denoise", "vec.nrrd", "o.nrrd", *G], "vec.nrrd"),
    (["denoise", "4d.nrrd", "o.nrrd", *G], "4d.nrrd"),
    (["denoise", "4d.nrrd", "o.nrrd", *G, "--frame", "5"], "4d.nrrd"),
    (["denoise", "missing.nrrd", "o.nrrd", *G], "missing.nrrd"),
    (["denoise", "tiny.nrrd", "o.nrrd", "--method", "bm4d"], "tiny.nrrd"),
    # denoise: outputs that would overwrite, cannot be written or would lose data
    (["denoise", "t1.nrrd", "t1.nrrd", *G], "t1.nrrd"),
    (["denoise", "t1.nrrd", "sub", *G], "sub"),
    (["denoise", "t1.nrrd", "o.png", *G], "o.png"),
    (["denoise", "t1.nrrd", "o.tif", *G], "o.tif"),
    (["denoise", "t1.nrrd", "o.xyz", *G], "o.xyz"),
    (["denoise", "t1.nrrd", "nodir/o.nrrd", *G], "o.nrrd"),
    (["denoise", "t1.nrrd", "o.nrrd", *G, "--info-json", "t1.nrrd"], "t1.nrrd"),
    (["denoise", "t1.nrrd", "o.nrrd", *G, "--info-json", "o.nrrd"], "o.nrrd"),
    (["denoise", "t1.nrrd", "o.nrrd", *G, "--info-json", "sub"], "sub"),
    (["denoise", "t1.nrrd", "o.nrrd", *G, "--info-json", "nodir/i.json"], "i.json"),
    (["denoise", "t1.nrrd", "o.nrrd", *M, "--info-json", "m.json"], "m.json"),
    (["denoise", "t1.nrrd", "o.nrrd", *M, "--uncertainty", "o.nrrd"], "o.nrrd"),
    (["denoise", "t1.nrrd", "o.nrrd", *M, "--uncertainty", "t1.nrrd"], "t1.nrrd"),
    (["denoise", "t1.nrrd", "o.nrrd", *M, "--noise-map", "o.nrrd"], "o.nrrd"),
    (["denoise", "t1.nrrd", "o.nrrd", *M, "--confidence", "t1.nrrd"], "t1.nrrd"),
    (["denoise", "t1.nrrd", "o.nrrd", *M, "--noise-map", "n.nrrd", "--confidence", "n.nrrd"], "n.nrrd"),
    (["denoise", "t1.nrrd", "o.nrrd", *M, "--confidence", "c.png"], "c.png"),
    (["denoise", "t1.nrrd", "o.nrrd", *G, "--noise-map", "n.nrrd"], "noise branch"),
    # denoise: bad options and models
    (["denoise", "t1.nrrd", "o.nrrd", *G, "--seed", "1e20"], "--seed"),
    (["denoise", "t1.nrrd", "o.nrrd", *G, "--seed", "-1"], "--seed"),
    (["denoise", "t1.nrrd", "o.nrrd", *G, "--sigma", "1e300"], "t1.nrrd"),
    (["denoise", "t1.nrrd", "o.nrrd", "--method", "nlm", "--sigma", "1e-300"], "t1.nrrd"),
    (["denoise", "t1.nrrd", "o.nrrd", "--method", "bm4d", "--sigma", "1e300"], "t1.nrrd"),
    (["denoise", "t1.nrrd", "o.nrrd", *G, "--sigma", "nan"], "--sigma"),
    (["denoise", "t1.nrrd", "o.nrrd", *M, "--tile", "1"], "--tile"),
    (["denoise", "t1.nrrd", "o.nrrd", *M, "--uncertainty", "u.nrrd", "--mc-samples", "0"], "--mc-samples"),
    (["denoise", "t1.nrrd", "o.nrrd", *G, "--uncertainty", "u.nrrd"], "t1.nrrd"),
    (["denoise", "t1.nrrd", "o.nrrd", *G, "--frame", "-1"], "--frame"),
    (["denoise", "t1.nrrd", "o.nrrd", "--method", "sharpen"], "sharpen"),
    (["denoise", "t1.nrrd", "o.nrrd", "--model", "nanw.safetensors"], "nanw.safetensors"),
    (["denoise", "t1.nrrd", "o.nrrd", "--model", "pct.safetensors"], "pct.json"),
    (["denoise", "t1.nrrd", "o.nrrd", "--model", "evil.pt"], "evil.pt"),
    (["denoise", "t1.nrrd", "o.nrrd", "--model", "nomodel.safetensors"], "nomodel.safetensors"),
    # degrade
    (["degrade", "cut.nii.gz", "o.nrrd", "--modality", "mri"], "cut.nii.gz"),
    (["degrade", "t1.nrrd", "o.nrrd", "--modality", "mri", "--seed", "-5"], "--seed"),
    (["degrade", "t1.nrrd", "o.nrrd", "--modality", "mri", "--anisotropy", "nan"], "--anisotropy"),
    (["degrade", "t1.nrrd", "o.nrrd", "--modality", "mri", "--anisotropy", "inf"], "--anisotropy"),
    (["degrade", "t1.nrrd", "o.nrrd", "--modality", "mri", "--level", "nan"], "--level"),
    (["degrade", "t1.nrrd", "o.nrrd", "--modality", "mri", "--clean-lr", "o.nrrd"], "o.nrrd"),
    (["degrade", "t1.nrrd", "t1.nrrd", "--modality", "mri"], "t1.nrrd"),
    (["degrade", "t1.nrrd", "o.png", "--modality", "mri"], "o.png"),
    # dice
    (["dice", "lab.nrrd", "lab.nrrd", "--labels", "a,b"], "--labels"),
    (["dice", "lab.nrrd", "lab.nrrd", "--csv", "sub"], "sub"),
    (["dice", "lab.nrrd", "lab.nrrd", "--csv", "lab.nrrd"], "lab.nrrd"),
    (["dice", "frac.nrrd", "lab.nrrd"], "frac.nrrd"),
    (["dice", "lab.nrrd", "cut.nii.gz"], "cut.nii.gz"),
    (["dice", "lab.nrrd", "tiny.nrrd"], "tiny.nrrd"),
    # estimate
    (["estimate", "cut.nii.gz"], "cut.nii.gz"),
    (["estimate", "bomb.nii.gz"], "bomb.nii.gz"),
    (["estimate", "nan.nii.gz"], "nan.nii.gz"),
    (["estimate", "tiny.nrrd"], "tiny.nrrd"),
    (["estimate", "garbage.nrrd", "--modality", "ct"], "garbage.nrrd"),
    # finetune / train
    (["finetune", "t1.nrrd", "--model", "m.safetensors", "--out", "m.safetensors"], "m.safetensors"),
    (["finetune", "t1.nrrd", "--model", "m.json", "--out", "m.safetensors"], "m.safetensors"),
    (["finetune", "t1.nrrd", "--model", "m.safetensors", "--out", "t1.nrrd"], "t1.nrrd"),
    (["finetune", "t1.nrrd", "--model", "m.safetensors", "--out", "nodir/f.safetensors"], "f.safetensors"),
    (["finetune", "t1.nrrd", "--model", "nanw.safetensors", "--out", "f.safetensors"], "nanw.safetensors"),
    (["finetune", "t1.nrrd", "--model", "m.safetensors", "--out", "f.safetensors", "--steps", "0"], "--steps"),
    (["train", "--config", "mri", "--seed", "-1"], "--seed"),
    (["train", "--config", "nosuch.toml"], "nosuch.toml"),
]
if sys.platform.startswith("linux"):
    CASES += [(["denoise", "t1.nrrd", "/proc/self", *G], "/proc/self"),
              (["denoise", "t1.nrrd", "/proc/self/o.nrrd", *G], "/proc/self/o.nrrd"),
              (["denoise", "t1.nrrd", "o.nrrd", *G, "--info-json", "/proc/self/i.json"], "/proc/self/i.json")]


def _state(folder: Path) -> dict:
    """Every file and folder under ``folder`` (hidden ones too) with the SHA-256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def test_enough_cases():
    assert len(CASES) >= 60 and {c[0][0] for c in CASES} >= {"denoise", "degrade", "dice", "estimate",
                                                              "finetune", "train"}


@pytest.mark.parametrize("argv, name", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_fails_with_one_line_and_changes_nothing(bad, argv, name, capfd, monkeypatch):
    monkeypatch.chdir(bad)
    before = _state(bad)
    capfd.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as stop:  # argparse
        code = stop.code
    out, err = capfd.readouterr()
    lines = visible_lines(err)
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("dualnet: error:"), err
    assert name in lines[0], lines[0]
    assert not out.strip(), out
    assert _state(bad) == before, "an input changed or an output / temporary was written"
    assert not Path("pwned").exists()
