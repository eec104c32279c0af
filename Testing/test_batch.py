"""scripts/batch_denoise.py on a folder of small real crops (plain Python, as a subprocess)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
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


def test_inputs_sharing_a_name_get_their_own_results(folder, tmp_path, batch):
    """``ct.nrrd`` and ``CT.nii.gz`` (one name on macOS / Windows) both map to ``ct_<method>.nrrd``:
    the second was skipped as existing, or with --overwrite replaced the first's result while the
    summary listed both as ok. Each now carries its format in the name; unshared names are unchanged."""
    from dualnet.io import read_volume, write_volume

    ct = read_volume(folder / "ct.nrrd")
    write_volume(ct.with_array(ct.array[:, ::-1].copy()), folder / "CT.nii.gz")
    out = tmp_path / "out"
    assert batch.main([str(folder), str(out), "--method", "gaussian", "--modality", "ct", "--sigma", "20",
                       "--overwrite"]) == 0
    rows = {Path(r["input"]).name: Path(r["output"]).name for r in read_rows(out / "summary.csv")}
    assert rows == {"ct.nrrd": "ct-nrrd_gaussian.nrrd", "CT.nii.gz": "CT-nii-gz_gaussian.nrrd",
                    "t1 crop.nii.gz": "t1 crop_gaussian.nrrd"}
    a, b = (read_volume(out / rows[k]).array for k in ("ct.nrrd", "CT.nii.gz"))
    np.testing.assert_allclose(a[:, ::-1], b, atol=1e-3)  # each its own input's result


def test_summary_csv_never_replaces_an_input(folder, tmp_path, batch, capsys):
    """``--csv`` naming an input (or a result of the same run) is refused before any work; it was
    opened for writing as given and replaced the input file."""
    before = (folder / "ct.nrrd").read_bytes()
    out = tmp_path / "out"
    assert batch.main([str(folder), str(out), "--method", "gaussian", "--csv", str(folder / "ct.nrrd")]) == 2
    assert "output path is the input file" in capsys.readouterr().err
    assert (folder / "ct.nrrd").read_bytes() == before and not any(out.glob("*_gaussian.nrrd"))
    assert batch.main([str(folder), str(out), "--method", "gaussian", "--csv", str(out / "ct_gaussian.nrrd")]) == 2
    assert "two outputs" in capsys.readouterr().err


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


def test_network_options_are_refused_for_a_classical_method(folder, tmp_path, batch, capsys):
    """--model and --views were dropped silently with a classical method; now refused as `dualnet denoise` does."""
    for extra, name in ((["--model", "m.safetensors"], "--model applies"), (["--views", "3"], "--views applies"),
                        (["--no-guard", "--device", "cuda"], "--device and --no-guard apply")):
        with pytest.raises(SystemExit) as exc:
            batch.parse_args([str(folder), str(tmp_path / "o"), "--method", "gaussian", *extra])
        assert exc.value.code == 2 and f"{name} to the network only" in capsys.readouterr().err
    assert batch.parse_args([str(folder), str(tmp_path / "o"), "--method", "gaussian", "--no-tta"]).tta == 1
    assert not (tmp_path / "o").exists()


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


# ------------------------------------------------------------------------------- failures never hang a run
#: Runs a script the way ``Slicer --no-main-window --python-script`` does, outside Slicer.
#: Stubbed, because the real application is not available here: the ``slicer`` module (only
#: ``slicer.app.commandOptions().noMainWindow`` and ``slicer.util.exit``, which ends the process and
#: prints SLICER_EXIT) and Slicer's behaviour around the script: an exception escaping the script is
#: logged and the event loop keeps the process alive (``EVENT_LOOP_S``), so only ``slicer.util.exit``
#: ends it. ``HIDE`` lists top-level modules whose import raises ModuleNotFoundError (a fresh Slicer
#: without scikit-image / torch / safetensors).
SLICER_LIKE_RUNNER = r'''
import os, runpy, sys, time, types

hidden = set(filter(None, os.environ.get("HIDE", "").split(",")))


class HideModules:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return None


sys.meta_path.insert(0, HideModules())
if os.environ.get("FAKE_SLICER"):
    slicer, util = types.ModuleType("slicer"), types.ModuleType("slicer.util")
    slicer.app = types.SimpleNamespace(commandOptions=lambda: types.SimpleNamespace(noMainWindow=True))

    def exit(status=0):
        print("SLICER_EXIT", status, flush=True)
        sys.stderr.flush()
        os._exit(status)

    util.exit, slicer.util = exit, util
    sys.modules["slicer"], sys.modules["slicer.util"] = slicer, util
script, sys.argv = sys.argv[1], sys.argv[1:]
if not os.environ.get("FAKE_SLICER"):
    runpy.run_path(script, run_name="__main__")
else:
    try:
        runpy.run_path(script, run_name="__main__")
    except BaseException as err:  # Slicer logs it and keeps running
        print("SCRIPT RAISED", type(err).__name__, err, file=sys.stderr, flush=True)
    time.sleep(float(os.environ.get("EVENT_LOOP_S", "120")))
'''


def run_like_slicer(tmp_path, args, hide=(), fake_slicer=True, timeout=40):
    """Run the batch script under SLICER_LIKE_RUNNER; returns (result, seconds)."""
    runner = tmp_path / "slicer_like_runner.py"
    runner.write_text(SLICER_LIKE_RUNNER, encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", HIDE=",".join(hide))
    env.pop("PYTHONPATH", None)
    if fake_slicer:
        env["FAKE_SLICER"] = "1"
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, str(runner), str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                         timeout=timeout, env=env)
    return res, time.monotonic() - t0


def error_lines(stderr: str):
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("hidden, method, named", [
    ("skimage", "gaussian", "scikit-image"),
    ("torch", "dualnet", "PyTorch"),
    ("safetensors", "dualnet", "safetensors"),
])
def test_missing_dependency_ends_a_slicer_batch_run_with_one_line(folder, tmp_path, hidden, method, named):
    """Issue 10, defect 3: in a fresh Slicer a missing package raised ModuleNotFoundError, which escaped,
    ``slicer.util.exit`` was never called and ``Slicer --no-main-window`` kept running (here: the
    runner would sleep 120 s and the subprocess time out)."""
    res, seconds = run_like_slicer(tmp_path, ["--", folder, tmp_path / "out", "--method", method], hide=[hidden])
    assert res.returncode == 3 and "SLICER_EXIT 3" in res.stdout, res.stderr[-2000:]
    assert seconds < 20
    lines = error_lines(res.stderr)
    assert len(lines) == 1 and lines[0].startswith("batch_denoise: error: missing Python packages"), lines
    assert named in lines[0] and "Traceback" not in res.stderr and "SCRIPT RAISED" not in res.stderr


def test_missing_dependency_in_plain_python_is_named(folder, tmp_path):
    res, seconds = run_like_slicer(tmp_path, [folder, tmp_path / "out", "--method", "median"], hide=["skimage"],
                                   fake_slicer=False)
    assert res.returncode == 3 and seconds < 20
    (line,) = error_lines(res.stderr)
    assert "scikit-image>=0.21" in line and "pip install" in line


@pytest.mark.parametrize("args, code", [
    (["--method", "gaussian", "--modality", "xray"], 2),  # argparse error: SystemExit inside the script
    (["--method", "gaussian", "--tta"], 2),  # a network option with a classical method: refused, not ignored
    (["--method", "gaussian", "--tta-passes", "4"], 2),
    (["--help"], 0),
])
def test_argument_errors_and_help_exit_slicer_too(folder, tmp_path, args, code):
    res, seconds = run_like_slicer(tmp_path, ["--", folder, tmp_path / "out", *args])
    assert res.returncode == code and f"SLICER_EXIT {code}" in res.stdout and seconds < 20, res.stderr[-2000:]
    assert "SCRIPT RAISED" not in res.stderr


def test_missing_folder_exits_slicer(tmp_path):
    res, _ = run_like_slicer(tmp_path, ["--", tmp_path / "missing", tmp_path / "out"])
    assert res.returncode == 2 and "SLICER_EXIT 2" in res.stdout
    assert error_lines(res.stderr) == [f"batch_denoise: {tmp_path / 'missing'}: not a folder"]


def test_package_missing_while_running_stops_the_batch(folder, tmp_path, batch, monkeypatch, capsys):
    """A package the pre-check does not know (or one that breaks at import) raises ImportError in the
    core: the batch stops with exit 3, one line, and summary.csv lists the volume that failed.
    Stubbed: the pre-check (bypassed) and ``dualnet.api.denoise_volume`` (raises the ImportError)."""
    import dualnet.api

    def broken(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'skimage'", name="skimage")

    monkeypatch.setattr(batch, "check_dependencies", lambda method: None)
    monkeypatch.setattr(dualnet.api, "denoise_volume", broken)
    assert batch.main([str(folder), str(tmp_path / "out"), "--method", "gaussian"]) == 3
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "skimage" in lines[0] and "scikit-image>=0.21" in lines[0]
    (row,) = read_rows(tmp_path / "out" / "summary.csv")
    assert row["status"] == "failed" and "scikit-image" in row["error"]


def test_unexpected_core_error_fails_the_volume_and_the_exit_code(folder, tmp_path, batch, monkeypatch, capsys):
    """Any exception of the core (not only the types listed before) fails that volume, the batch goes
    on and exits 1. Stubbed: ``dualnet.api.denoise_volume`` raises a KeyError."""
    import dualnet.api

    monkeypatch.setattr(dualnet.api, "denoise_volume", lambda *a, **k: {}["sigma"])
    assert batch.main([str(folder), str(tmp_path / "out"), "--method", "gaussian"]) == 1
    rows = read_rows(tmp_path / "out" / "summary.csv")
    assert [r["status"] for r in rows] == ["failed", "failed"] and rows[0]["error"] == "KeyError: 'sigma'"
    assert error_lines(capsys.readouterr().err) == ["  failed: KeyError: 'sigma'"] * 2


def test_error_outside_the_loop_is_one_line(folder, tmp_path, batch, monkeypatch, capsys):
    monkeypatch.setattr(batch, "find_inputs", lambda folder: 1 / 0)
    assert batch.main([str(folder), str(tmp_path / "out")]) == 1
    assert error_lines(capsys.readouterr().err) == ["batch_denoise: error: ZeroDivisionError: division by zero"]


# ------------------------------------------------------------------------------- --dicom: a whole study
CT_SERIES, MR_SERIES = "ct_ge_hispeed_head_tilt", "mr_siemens_t1_fl2d_sag"


@pytest.fixture
def study(tmp_path, shared_data):
    """An exported study in nested folders: 6 slices of the real GE CT and of the Siemens T1, a Basic
    Text SR beside the MR files and a text file; returns (folder, {subfolder: source files})."""
    from dicom_helpers import basic_text_sr

    root = tmp_path / "study"
    sources = {}
    for sub, name in (("a/ct", CT_SERIES), ("b/mr", MR_SERIES)):
        (root / sub).mkdir(parents=True)
        files = sorted((shared_data / "dicom" / name).glob("*.dcm"))[:6]
        for f in files:
            shutil.copy2(f, root / sub / f.name)
        sources[sub] = sorted((root / sub).glob("*.dcm"))
    basic_text_sr(sources["a/ct"][0], root / "b" / "report.dcm")
    (root / "notes.txt").write_text("not DICOM\n", encoding="utf-8")
    return root, sources


def test_batch_dicom_study_writes_one_derived_series_per_source(study, tmp_path):
    import pydicom

    from dicom_helpers import tree_hashes

    root, sources = study
    before = tree_hashes(root)
    out = tmp_path / "derived"
    res = run([root, out, "--dicom", "--method", "gaussian"], timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stderr.strip() == ""
    rows = read_rows(out / "summary.csv")
    series_rows = [r for r in rows if r["status"] != "skipped"]
    (sr_row,) = [r for r in rows if r["status"] == "skipped"]
    assert sr_row["input"] == str(root / "b" / "report.dcm") and "Basic Text SR Storage (SR)" in sr_row["note"]
    assert "report.dcm" in res.stdout and "ignored 1 non-DICOM file" in res.stdout
    assert [(r["status"], r["modality"], r["shape_zyx"]) for r in series_rows] == [
        ("ok", "ct", "6x512x512"), ("ok", "mri", "6x256x256")]  # modality from the DICOM Modality tag
    assert all("from DICOM Modality" in r["note"] and float(r["sigma"]) > 0 for r in series_rows)
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {
        "volumes": 2, "skipped": 1, "failed": 0, "csv": str(out / "summary.csv")}
    for row, (sub, files) in zip(series_rows, sources.items()):
        assert row["input"] == str(root / sub)
        src = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]
        derived = sorted(Path(row["output"]).glob("*.dcm"))
        assert Path(row["output"]).parent == out and len(derived) == len(files)
        src_uids = {str(d.SOPInstanceUID) for d in src}
        for f in derived:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
            assert ds.Modality == src[0].Modality and ds.StudyInstanceUID == src[0].StudyInstanceUID
            assert ds.SeriesInstanceUID == row["derived_series_uid"] != src[0].SeriesInstanceUID
            assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
            assert str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) in src_uids
    assert series_rows[0]["derived_series_uid"] != series_rows[1]["derived_series_uid"]
    assert tree_hashes(root) == before
    summary = (out / "summary.csv").read_bytes()  # a second run never overwrites: refused, exit 2
    res = run([root, out, "--dicom", "--method", "gaussian"])
    assert res.returncode == 2 and "output folder is not empty" in res.stderr
    assert (out / "summary.csv").read_bytes() == summary


def sop_uids(files) -> list:
    import pydicom

    return sorted(str(pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID) for f in files)


def test_batch_dicom_sends_to_a_dicom_node(study, tmp_path):
    """``--send``: every written instance arrives at dcmtk's storescp on loopback; an unreachable
    node exits 1 with one line and the files kept."""
    from dicom_helpers import free_port, start_storescp, stop_process

    root, _ = study
    shutil.rmtree(root / "a")  # the MR series (and the SR) only: quicker
    received = tmp_path / "pacs"
    proc, port = start_storescp(received)
    try:
        res = run([root, tmp_path / "out", "--dicom", "--method", "gaussian", "--sigma", "25",
                   "--send", f"TESTSCP@127.0.0.1:{port}"], timeout=120)
    finally:
        stop_process(proc)
    assert res.returncode == 0, res.stderr[-2000:]
    written = sorted((tmp_path / "out").rglob("*.dcm"))
    assert len(written) == 6 and f"sent 6/6 instances to TESTSCP@127.0.0.1:{port}" in res.stdout
    assert sop_uids(received.iterdir()) == sop_uids(written)

    res = run([root, tmp_path / "out2", "--dicom", "--method", "gaussian", "--sigma", "25",
               "--send", f"PACS@127.0.0.1:{free_port()}"], timeout=120)
    assert res.returncode == 1
    (line,) = error_lines(res.stderr)
    assert line.startswith("batch_denoise: error: PACS@127.0.0.1:") and "files kept on disk" in line
    assert len(list((tmp_path / "out2").rglob("*.dcm"))) == 6


def test_batch_dicom_interrupt_lists_the_series_finished_before(study, tmp_path, batch, monkeypatch, capsys):
    """An interrupt of a --dicom batch left the series finished before in OUT_DIR with no summary.csv."""
    from dicom_helpers import interrupt_second_denoising

    root, _ = study
    interrupt_second_denoising(monkeypatch)
    assert batch.main([str(root), str(tmp_path / "out"), "--dicom", "--method", "gaussian"]) == 130
    assert "1 series finished before are kept" in capsys.readouterr().err
    rows = read_rows(tmp_path / "out" / "summary.csv")
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 1 and Path(ok[0]["output"]).is_dir()


def test_batch_dicom_refusals(study, tmp_path, batch, capsys):
    root, _ = study
    cases = [
        ([root, tmp_path / "o1", "--send", "PACS@h:104"], "--send needs --dicom"),
        ([root, tmp_path / "o2", "--dicom", "--format", ".nrrd"], "--format does not apply to --dicom"),
        ([root, tmp_path / "o3", "--dicom", "--send", "PACS"], "expected AET@HOST:PORT"),
        ([root, root / "derived", "--dicom"], "must not be, contain or lie inside the input folder"),
        ([tmp_path / "study" / "a" / "ct", tmp_path / "o4", "--dicom", "--modality", "xx"], None),  # argparse
    ]
    for args, message in cases:
        assert batch.main([str(a) for a in args]) == 2
        err = capsys.readouterr().err
        if message:
            assert error_lines(err) == [next(line for line in err.splitlines() if message in line)]
    assert not (root / "derived").exists() and not any(p.name.startswith("o") for p in tmp_path.iterdir())
    empty = tmp_path / "no_dicom"
    empty.mkdir()
    (empty / "notes.txt").write_text("x", encoding="utf-8")
    assert batch.main([str(empty), str(tmp_path / "o5"), "--dicom"]) == 2
    assert "no CT or MR DICOM image series found" in capsys.readouterr().err


def test_batch_dicom_summary_never_replaces_a_source_file(study, tmp_path, batch, capsys):
    root, _ = study
    source = next(root.rglob("*.dcm"))
    before = source.read_bytes()
    assert batch.main([str(root), str(tmp_path / "o"), "--dicom", "--method", "gaussian", "--csv", str(source)]) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert source.read_bytes() == before and not any((tmp_path / "o").iterdir())


def test_batch_dicom_send_without_pynetdicom_stops_before_any_work(study, tmp_path):
    """Slicer does not bundle pynetdicom: ``--send`` without it exits 3 with one line, nothing written."""
    root, _ = study
    res, seconds = run_like_slicer(tmp_path, ["--", root, tmp_path / "out", "--dicom", "--method", "gaussian",
                                              "--send", "PACS@127.0.0.1:104"], hide=["pynetdicom"])
    assert res.returncode == 3 and "SLICER_EXIT 3" in res.stdout and seconds < 20, res.stderr[-2000:]
    (line,) = error_lines(res.stderr)
    assert line.startswith("batch_denoise: error: missing Python package 'pynetdicom'")
    assert not (tmp_path / "out").exists()


def test_batch_dicom_package_missing_while_running(study, tmp_path, batch, monkeypatch, capsys):
    """As for volume files: an ImportError inside the core stops the batch with exit 3 and one line;
    summary.csv lists the failed series. Stubbed: the pre-check and ``dualnet.api.denoise_volume``."""
    import dualnet.api

    root, _ = study
    shutil.rmtree(root / "a")

    def broken(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'skimage'", name="skimage")

    monkeypatch.setattr(batch, "check_dependencies", lambda method: None)
    monkeypatch.setattr(dualnet.api, "denoise_volume", broken)
    assert batch.main([str(root), str(tmp_path / "out"), "--dicom", "--method", "gaussian"]) == 3
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith("batch_denoise: error: missing Python package 'skimage'") and "scikit-image" in line
    rows = read_rows(tmp_path / "out" / "summary.csv")
    assert [r["status"] for r in rows] == ["failed", "skipped"] and "scikit-image" in rows[0]["error"]


def test_batch_prints_a_doubtful_noise_estimate(tmp_path, shared_data):
    """One volume of the real EPI (a ghosted background): the network's noise warning reaches the
    batch log, and the file is still written."""
    from dualnet.io import read_volume, write_volume

    d = tmp_path / "in"
    d.mkdir()
    write_volume(read_volume(shared_data / "real_noise" / "epi_5reps.nii.gz", frame=1), d / "epi.nii.gz")
    res = run([d, tmp_path / "out", "--modality", "mri", "--device", "cpu", "--views", "1"], timeout=120)
    assert res.returncode == 0, res.stderr
    assert "warning: the image background does not look like pure noise" in res.stderr
    assert len(list((tmp_path / "out").glob("epi_dualnet*"))) == 1
    (row,) = read_rows(tmp_path / "out" / "summary.csv")  # and the summary keeps it beside the file
    assert row["status"] == "ok" and row["warning"].startswith("the image background does not look like pure noise")


def test_batch_dicom_prints_and_keeps_each_series_noise_warning(shared_data, tmp_path, batch, capsys, monkeypatch):
    """``--dicom``: a series' noise warning is printed with its folder and kept in summary.csv. The
    core's wording is replaced (this real series has a masked background that never draws one; the
    wording itself is tested on the real EPI in test_sure_guard.py): the seam under test is the script's."""
    import shutil

    import dualnet.estimate as estimate

    series = tmp_path / "in" / "t1"
    series.mkdir(parents=True)
    for f in sorted((shared_data / "dicom" / "mr_siemens_t1_fl2d_sag").glob("*.dcm"))[:5]:
        shutil.copy2(f, series / f.name)
    monkeypatch.setattr(estimate, "background_caution", lambda info: "TEST CAUTION")
    code = batch.main([str(tmp_path / "in"), str(tmp_path / "out"), "--dicom", "--views", "1", "--device", "cpu"])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert f"warning: {series}: TEST CAUTION" in err
    (row,) = read_rows(tmp_path / "out" / "summary.csv")
    assert row["status"] == "ok" and row["warning"] == "TEST CAUTION"
