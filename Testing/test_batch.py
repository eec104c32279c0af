"""scripts/batch_denoise.py on a folder of small real crops (plain Python, as a subprocess)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "batch_denoise.py"


def run(args, timeout=50):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # 2 shared cores: no thread oversubscription
    env.pop("PYTHONPATH", None)  # the script finds the core of this checkout itself
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture
def folder(tmp_path, mri_crop, ct_volume):
    from dualnet.io import Volume, write_volume

    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(0)
    mri = np.clip(mri_crop[:8, :32, :32] + rng.normal(0, 40, (8, 32, 32)), 0, None).astype(np.int16)
    write_volume(Volume(mri, (1.0, 1.0, 1.2), (10.0, -5.0, 3.0)), d / "t1 crop.nii.gz")
    ct = ct_volume.array[40:48, 30:62, 30:62]
    write_volume(ct_volume.with_array(ct), d / "ct.nrrd")
    (d / "notes.txt").write_text("not a volume", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def batch():
    """The script imported as a module (for the cheap checks; the main path runs as a subprocess)."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import batch_denoise
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return batch_denoise


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_batch_writes_outputs_and_summary(folder, tmp_path, batch):
    from dualnet.io import read_volume

    out = tmp_path / "out"
    res = run([folder, out, "--method", "gaussian", "--modality", "mri"])
    assert res.returncode == 0, res.stderr[-2000:]
    rows = read_rows(out / "summary.csv")
    assert [Path(r["input"]).name for r in rows] == ["ct.nrrd", "t1 crop.nii.gz"]
    assert all(r["status"] == "ok" and float(r["seconds"]) >= 0 and float(r["sigma"]) > 0 for r in rows)
    for r in rows:
        src, dst = read_volume(r["input"]), read_volume(r["output"])
        assert Path(r["output"]).name.endswith("_gaussian.nrrd")
        assert src.same_grid(dst) and dst.array.dtype == np.float32
        assert not np.array_equal(src.array.astype(np.float32), dst.array)
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"volumes": 2, "failed": 0, "csv": str(out / "summary.csv")}
    # a second run skips what exists
    assert batch.main([str(folder), str(out), "--method", "gaussian"]) == 0
    assert all(r["status"] == "skipped (exists)" for r in read_rows(out / "summary.csv"))


def test_batch_keeps_going_after_a_bad_file(folder, tmp_path):
    (folder / "broken.nrrd").write_bytes(b"NRRD0004\ntype: float\n")  # truncated header
    out = tmp_path / "out"
    res = run([folder, out, "--method", "median", "--format", "same", "--csv", tmp_path / "s.csv"])
    assert res.returncode == 1
    rows = {Path(r["input"]).name: r for r in read_rows(tmp_path / "s.csv")}
    assert rows["broken.nrrd"]["status"] == "failed" and "broken.nrrd" in rows["broken.nrrd"]["error"]
    assert rows["ct.nrrd"]["status"] == "ok" and rows["t1 crop.nii.gz"]["output"].endswith("_median.nii.gz")


def test_batch_refuses_bad_folders(folder, tmp_path, batch):
    assert batch.main([str(folder), str(folder)]) == 2
    assert batch.main([str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert batch.main([str(empty), str(tmp_path / "o")]) == 2


def test_slicer_style_arguments_and_detection(folder, tmp_path, batch):
    """Slicer passes ``-- args``; with only the slicer-core wheel the script is not 'in Slicer'."""
    batch_denoise = batch
    assert batch_denoise.in_slicer() is False
    code = batch_denoise.main(["--", str(folder), str(tmp_path / "o2"), "--method", "gaussian"])
    assert code == 0 and len(read_rows(tmp_path / "o2" / "summary.csv")) == 2


def _write_dicom_series(folder: Path, array: np.ndarray, spacing=(0.9, 0.9, 2.0)):
    """A minimal MR DICOM series written with SimpleITK (one file per slice, axial, int16)."""
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid, study_uid = "1.2.826.0.1.3680043.2.1125.1.7001", "1.2.826.0.1.3680043.2.1125.1.7000"
    for k in range(array.shape[0]):
        img = sitk.JoinSeries(sitk.GetImageFromArray(array[k].astype(np.int16)))
        img.SetSpacing(spacing)
        img.SetOrigin((-50.0, -40.0, k * spacing[2]))
        tags = {"0008|0060": "MR", "0020|000d": study_uid, "0020|000e": series_uid,
                "0008|0018": f"{series_uid}.{k + 1}", "0020|0013": str(k + 1),
                "0020|0032": f"-50\\-40\\{k * spacing[2]:.3f}", "0020|0037": "1\\0\\0\\0\\1\\0",
                "0028|0030": f"{spacing[1]}\\{spacing[0]}", "0018|0050": str(spacing[2]), "0008|0016": "1.2.840.10008.5.1.4.1.1.4"}
        for key, value in tags.items():
            img.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(img)


def test_batch_reads_dicom_series_folders(tmp_path, mri_crop):
    from dualnet.io import read_volume

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(1)
    _write_dicom_series(src / "series1", np.clip(mri_crop[:6, :24, :24] + rng.normal(0, 40, (6, 24, 24)), 0, None))
    out = tmp_path / "out"
    res = run([src, out, "--method", "gaussian"])
    assert res.returncode == 0, res.stderr[-2000:]
    (row,) = read_rows(out / "summary.csv")
    assert row["status"] == "ok" and row["output"].endswith("series1_gaussian.nrrd")
    assert row["shape_zyx"] == "6x24x24" and row["spacing_xyz"] == "0.9x0.9x2"
    dst = read_volume(row["output"])
    assert np.allclose(dst.origin, (-50.0, -40.0, 0.0)) and np.allclose(dst.spacing, (0.9, 0.9, 2.0))
