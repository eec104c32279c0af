"""The ``dualnet`` command line: outputs keep geometry; bad input fails with one line and no output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dualnet.cli import main
from dualnet.io import Volume, read_volume, write_volume

REPO = Path(__file__).resolve().parents[1]
OBLIQUE = (0.9950042, -0.0998334, 0.0, 0.0998334, 0.9950042, 0.0, 0.0, 0.0, 1.0)


@pytest.fixture()
def small_mri(tmp_path, mri_crop) -> Path:
    """A real 40x64x64 T1 crop with anisotropic spacing and an oblique direction."""
    vol = Volume(mri_crop.astype(np.int16), (1.0, 1.1, 2.0), (12.0, -30.0, 7.5), OBLIQUE)
    return write_volume(vol, tmp_path / "t1.nrrd")


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("dualnet: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_help_explains_units():
    out = subprocess.run([sys.executable, "-m", "dualnet", "degrade", "--help"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "DualNetDenoise")}, check=True).stdout
    out = " ".join(out.split())
    assert "fraction of the clean maximum" in out and "dose fraction" in out and "looks" in out
    out = subprocess.run([sys.executable, "-m", "dualnet", "denoise", "--help"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "DualNetDenoise")}, check=True).stdout
    out = " ".join(out.split())
    assert "bm4d" in out and "image units" in out


def test_degrade_then_denoise_keeps_geometry(tmp_path, small_mri, capsys):
    noisy = tmp_path / "noisy.nii.gz"
    clean_lr = tmp_path / "clean_lr.nii.gz"
    code, out, err = _run(["degrade", small_mri, noisy, "--modality", "mri", "--level", "0.05", "--lr-factor", "2",
                           "--seed", "3", "--clean-lr", clean_lr, "-q"], capsys)
    assert code == 0, err
    src = read_volume(small_mri)
    lr = read_volume(noisy)
    assert lr.array.shape == (20, 32, 32)
    np.testing.assert_allclose(lr.spacing, (2.0, 2.2, 4.0), rtol=1e-5)
    np.testing.assert_allclose(lr.direction, src.direction, atol=1e-6)
    out_path = tmp_path / "den.nrrd"
    code, out, err = _run(["denoise", noisy, out_path, "--method", "gaussian", "--modality", "mri", "-q"], capsys)
    assert code == 0, err
    den = read_volume(out_path)
    assert den.array.dtype == np.float32 and den.array.shape == lr.array.shape
    np.testing.assert_allclose(den.origin, lr.origin, atol=1e-4)
    np.testing.assert_allclose(den.spacing, lr.spacing, rtol=1e-5)
    ref = read_volume(clean_lr).array
    assert np.abs(den.array - ref).mean() < np.abs(lr.array - ref).mean()


def test_denoise_input_dtype(tmp_path, small_mri, capsys):
    out_path = tmp_path / "den.nii.gz"
    code, _, err = _run(["denoise", small_mri, out_path, "--method", "median", "--dtype", "input", "-q"], capsys)
    assert code == 0, err
    assert read_volume(out_path).array.dtype == np.int16


def test_png_in_png_out(tmp_path, us_image, capsys):
    src = write_volume(us_image.with_array(us_image.array[:128, :128]), tmp_path / "us.png")
    out_path = tmp_path / "us_den.png"
    code, _, err = _run(["denoise", src, out_path, "--method", "gaussian", "--modality", "us", "-q"], capsys)
    assert code == 0, err
    assert read_volume(out_path).array.shape == (128, 128)


def test_degraded_ultrasound_png_reads_back_as_ultrasound(tmp_path, us_image, capsys):
    """Speckle goes above 255; a 16-bit PNG of it was guessed as MRI by ``denoise``'s auto modality."""
    from dualnet.modality import choose_modality

    src = write_volume(us_image.with_array(us_image.array[:128, :128]), tmp_path / "us.png")
    noisy, clean_lr = tmp_path / "noisy.png", tmp_path / "clean_lr.png"
    code, _, err = _run(["degrade", src, noisy, "--modality", "us", "--level", "2", "--seed", "1",
                         "--clean-lr", clean_lr, "-q"], capsys)
    assert code == 0, err
    back = read_volume(noisy)
    assert back.array.dtype == np.uint8 and back.array.max() == 255
    assert "saturate at 255" in err and ".nrrd" in err
    assert choose_modality("auto", back.array, back.metadata).modality == "us"
    assert read_volume(clean_lr).array.dtype == np.uint8
    nrrd = tmp_path / "noisy.nrrd"  # a float format keeps the speckle unclipped
    code, _, err = _run(["degrade", src, nrrd, "--modality", "us", "--level", "2", "--seed", "1", "-q"], capsys)
    assert code == 0 and "saturate" not in err
    assert read_volume(nrrd).array.max() > 255


def test_network_options_are_refused_for_a_classical_method(tmp_path, small_mri, capsys):
    """--model, --tile and --device were accepted and silently unused with a classical method."""
    out = tmp_path / "o.nrrd"
    for extra, name in ((["--model", "my.safetensors"], "--model applies"), (["--tile", "32"], "--tile applies"),
                        (["--device", "cuda"], "--device applies"),
                        (["--tile", "32", "--no-guard"], "--tile and --no-guard apply")):
        code, _, err = _run(["denoise", small_mri, out, "--method", "median", *extra], capsys)
        assert code == 2 and f"{name} to the network only, not to median" in _one_error_line(err)
        assert not out.exists()
    code, _, err = _run(["denoise", small_mri, out, "--method", "median", "--device", "cpu", "-q"], capsys)
    assert code == 0, err  # the classical methods run on the CPU: saying so is not an error
    dicom_out = tmp_path / "series_out"
    code, _, err = _run(["denoise", tmp_path, dicom_out, "--dicom", "--method", "bm4d", "--model", "m.safetensors"],
                        capsys)
    assert code == 2 and "--model applies to the network only, not to bm4d" in _one_error_line(err)
    assert not dicom_out.exists()


def _assert_failed_cleanly(code, err, folder: Path, before: set, name: str):
    assert code != 0
    line = _one_error_line(err)
    assert name in line
    assert set(os.listdir(folder)) == before, "partial output left behind"


@pytest.mark.parametrize("content", [b"", b"GARBAGE" * 100])
def test_denoise_rejects_bad_files(tmp_path, capsys, content):
    bad = tmp_path / "scan.nii.gz"
    bad.write_bytes(content)
    before = set(os.listdir(tmp_path))
    code, _, err = _run(["denoise", bad, tmp_path / "out.nii.gz", "--method", "gaussian"], capsys)
    _assert_failed_cleanly(code, err, tmp_path, before, "scan.nii.gz")


def test_denoise_rejects_nan_vector_4d_zero(tmp_path, capsys, shared_data):
    vol = Volume(np.ones((4, 5, 6), np.float32))
    vol.array[0, 0, 0] = np.nan
    nan = write_volume(vol, tmp_path / "nan.nrrd", check_finite=False)
    import SimpleITK as sitk

    sitk.WriteImage(sitk.Image([6, 5, 4], sitk.sitkVectorFloat32, 2), str(tmp_path / "vec.nrrd"))
    (tmp_path / "zero.nrrd").write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4 0 3\nencoding: raw\n\n")
    before = set(os.listdir(tmp_path))
    for name, word in [("nan.nrrd", "NaN"), ("vec.nrrd", "vector"), ("zero.nrrd", "zero-size")]:
        code, _, err = _run(["denoise", tmp_path / name, tmp_path / "out.nrrd", "--method", "gaussian"], capsys)
        _assert_failed_cleanly(code, err, tmp_path, before, name)
        assert word in err
    epi = shared_data / "real_noise" / "epi_5reps.nii.gz"
    code, _, err = _run(["denoise", epi, tmp_path / "out.nrrd", "--method", "gaussian"], capsys)
    _assert_failed_cleanly(code, err, tmp_path, before, "epi_5reps.nii.gz")
    assert "4D" in err


def test_output_equal_to_input_refused(tmp_path, small_mri, capsys):
    before_bytes = small_mri.read_bytes()
    before = set(os.listdir(tmp_path))
    code, _, err = _run(["denoise", small_mri, small_mri, "--method", "gaussian"], capsys)
    _assert_failed_cleanly(code, err, tmp_path, before, "t1.nrrd")
    assert small_mri.read_bytes() == before_bytes
    code, _, err = _run(["degrade", small_mri, small_mri, "--modality", "mri"], capsys)
    _assert_failed_cleanly(code, err, tmp_path, before, "t1.nrrd")


def test_dice_geometry_mismatch_and_values(tmp_path, capsys):
    a = np.zeros((6, 8, 8), np.uint8)
    a[1:4, 2:6, 2:6] = 1
    a[4:6, :, :2] = 2
    b = a.copy()
    b[1, 2:6, 2:6] = 0  # label 1 loses 16 of 48 voxels
    pa = write_volume(Volume(a, (1, 1, 2)), tmp_path / "a.nrrd")
    pb = write_volume(Volume(b, (1, 1, 2)), tmp_path / "b.nrrd")
    code, out, err = _run(["dice", pa, pb, "--csv", tmp_path / "d.csv"], capsys)
    assert code == 0, err
    assert "label 1: Dice 0.8000" in out and "label 2: Dice 1.0000" in out
    assert (tmp_path / "d.csv").read_text(encoding="utf-8").splitlines()[0] == "label,dice"
    pc = write_volume(Volume(b, (1, 1, 2.5)), tmp_path / "c.nrrd")
    before = set(os.listdir(tmp_path))
    code, _, err = _run(["dice", pa, pc], capsys)
    _assert_failed_cleanly(code, err, tmp_path, before, "c.nrrd")


def test_dualnet_without_model_says_so(tmp_path, small_mri, capsys, monkeypatch):
    from dualnet import modelfile

    monkeypatch.setattr(modelfile, "default_model_path", lambda modality: tmp_path / "none.safetensors")
    before = set(os.listdir(tmp_path))
    code, _, err = _run(["denoise", small_mri, tmp_path / "o.nrrd", "--modality", "ct"], capsys)
    assert code == 2
    assert "no shipped DUAL-NET model" in _one_error_line(err)
    assert set(os.listdir(tmp_path)) == before
    code, _, err = _run(["denoise", small_mri, tmp_path / "o.nrrd", "--model", tmp_path / "missing.safetensors"], capsys)
    assert code == 2 and "missing.safetensors" in _one_error_line(err)


def test_noise_branch_maps_are_written_with_the_input_geometry(tmp_path, small_mri, capsys):
    """--noise-map / --confidence with the shipped MRI model: the NEB's maps, on the input's grid;
    the noise map follows the noise actually added (3 % and 9 % of the maximum)."""
    from dualnet.noise import add_noise

    src = read_volume(small_mri)
    medians = []
    for k, level in enumerate((0.03, 0.09)):
        noisy = write_volume(src.with_array(add_noise(src.array.astype(np.float32), "mri", level, k)),
                             tmp_path / f"noisy{k}.nrrd")
        nmap, conf = tmp_path / f"sigma{k}.nrrd", tmp_path / f"alpha{k}.nii.gz"
        code, out, err = _run(["denoise", noisy, tmp_path / f"den{k}.nrrd", "--modality", "mri", "--views", "1",
                               "--noise-map", nmap, "--confidence", conf, "-q"], capsys)
        assert code == 0, err
        for path in (nmap, conf):
            vol = read_volume(path)
            assert vol.array.shape == src.array.shape
            np.testing.assert_allclose(vol.origin, src.origin, atol=1e-4)
            np.testing.assert_allclose(vol.direction, src.direction, atol=1e-6)
        sigma, alpha = read_volume(nmap).array, read_volume(conf).array
        assert np.isfinite(sigma).all() and sigma.min() > 0
        assert alpha.min() >= 0 and alpha.max() <= 1
        fg = src.array > 0.2 * src.array.max()
        medians.append(float(np.median(sigma[fg])) / (level * float(src.array.max())))
    # in units of the true Rician sigma: the same at both levels (within 25 %), near 1
    assert medians[1] == pytest.approx(medians[0], rel=0.25)
    assert 0.5 < medians[0] < 2.0


def test_tta_options_parse_and_apply_to_the_network_only(tmp_path, small_mri, capsys):
    """``--tta`` = x8, ``--no-tta`` = none, neither = the model's default (None); both at once is a
    usage error; ``--tta`` with a classical method is refused before anything is written, ``--no-tta``
    asks nothing of it and is accepted."""
    from dualnet.cli import build_parser

    parse = lambda *a: build_parser().parse_args(["denoise", "in.nrrd", "out.nrrd", *a])  # noqa: E731
    assert parse().tta is None and parse("--tta").tta == 8 and parse("--no-tta").tta == 1
    assert [parse("--tta-passes", n).tta for n in ("1", "4", "8")] == [1, 4, 8]
    assert build_parser().parse_args(["denoise", "--tta-passes", "4", "in.nrrd", "out.nrrd"]).input == "in.nrrd"
    for bad in (("--tta", "--no-tta"), ("--tta-passes", "4", "--tta"), ("--tta-passes", "2"), ("--tta-passes",)):
        with pytest.raises(SystemExit):
            parse(*bad)
    capsys.readouterr()
    out = tmp_path / "o.nrrd"
    code, _, err = _run(["denoise", small_mri, out, "--method", "median", "--tta"], capsys)
    assert code == 2 and "--tta applies to the network only" in _one_error_line(err)
    assert not out.exists()
    code, _, err = _run(["denoise", small_mri, out, "--method", "median", "--tta-passes", "4"], capsys)
    assert code == 2 and "--tta applies to the network only" in _one_error_line(err)
    assert not out.exists()
    code, _, err = _run(["denoise", small_mri, out, "--method", "median", "--no-tta", "-q"], capsys)
    assert code == 0 and out.exists(), err


def test_cli_review_session34(tmp_path, us_image, small_mri, shared_data, capsys, monkeypatch):
    """Five faults of `dualnet` found by a review, each refused or recorded now:
    a real-valued map written as PNG (rounded to whole numbers: a constant confidence map);
    --uncertainty with a model without dropout (an all-zero map, exit 0); --sigma recorded as used in
    --info-json where the warning said it was ignored; a cancel after the result was written left it
    behind while saying "no output written"; `dualnet dice` on a colour mask (read as grey levels, then
    "non-integer values")."""
    from dualnet import cli
    from dualnet.modelfile import default_model_path

    png = write_volume(us_image.with_array(us_image.array[:64, :64]), tmp_path / "us.png")
    code, _, err = _run(["denoise", png, tmp_path / "o.png", "--modality", "us", "--confidence",
                         tmp_path / "c.png", "-q"], capsys)
    assert code == 2 and "whole numbers" in _one_error_line(err) and not (tmp_path / "o.png").exists()

    dncnn = default_model_path("us").with_name("dncnn_us.safetensors")
    code, _, err = _run(["denoise", png, tmp_path / "o.nrrd", "--model", dncnn, "--uncertainty",
                         tmp_path / "u.nrrd", "-q"], capsys)
    assert code == 2 and "no dropout" in _one_error_line(err) and not (tmp_path / "o.nrrd").exists()

    info = tmp_path / "info.json"
    code, _, err = _run(["denoise", png, tmp_path / "o.nrrd", "--model", dncnn, "--sigma", "0.5",
                         "--info-json", info, "-q"], capsys)
    assert code == 0 and "--sigma ignored" in err
    import json

    assert json.loads(info.read_text())["sigma_ignored"] is True

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "atomic_write_bytes", interrupted)  # Ctrl-C while the last output is written
    out = tmp_path / "cancelled.nrrd"
    code, _, err = _run(["denoise", small_mri, out, "--method", "gaussian", "--sigma", "30",
                         "--info-json", tmp_path / "i2.json", "-q"], capsys)
    assert code == 130 and "no output written" in err and not out.exists()
    monkeypatch.undo()

    masks = shared_data / "us" / "masks"
    code, _, err = _run(["dice", masks / "0000.png", masks / "0001.png"], capsys)
    assert code == 2 and "colour image" in _one_error_line(err)


def test_evaluate_refuses_an_unknown_method_before_any_work(tmp_path, capsys):
    from dualnet.modelfile import default_model_path

    config = default_model_path("mri").parents[1] / "configs" / "study_ci.toml"
    code, _, err = _run(["evaluate", "--config", config, "--out", tmp_path / "ev", "--methods", "gaussian,foo"],
                        capsys)
    assert code == 2 and "unknown method(s) 'foo'" in _one_error_line(err)
    assert not (tmp_path / "ev" / "report.md").exists()
