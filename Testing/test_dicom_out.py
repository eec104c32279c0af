"""DICOM out (``dualnet denoise ... --dicom``): derived series checked with real DICOM tools.

Real scanner files from ``../shared/data/dicom`` (a GE head CT with variable gantry tilt and
uneven gaps, a Siemens 2D T1 series, a Siemens enhanced multi-frame MR file) plus a single-slice
copy and an oblique copy made here. Every written instance goes through dicom3tools' ``dciodvfy``
(no "Error" lines; warnings are listed); results are read back with SimpleITK's GDCM series
reader and pydicom (not with the project's writer) and compared with the source read the same
way: size, spacing, origin, direction, per-instance geometry, values within half a rescale step.
Source files are hashed before and after. Cheap ``gaussian`` denoising with a fixed sigma.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_helpers import (assert_same_grid, basic_text_sr, dciodvfy, modality_values, require_tool,
                           sitk_read_folder, tree_hashes)

CT = "ct_ge_hispeed_head_tilt"
MR = "mr_siemens_t1_fl2d_sag"
ENH = "mr_siemens_xa30_t1w_enhanced"
SIGMA = "25"


@pytest.fixture(scope="module")
def dicom_dir(shared_data) -> Path:
    path = shared_data / "dicom"
    assert (path / CT).is_dir() and (path / MR).is_dir() and (path / ENH).is_dir(), f"DICOM test data missing in {path}"
    return path


@pytest.fixture(autouse=True)
def _tools():
    require_tool("dciodvfy")


def run_cli(args, capsys):
    from dualnet.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def expected_result(source_image, modality: str, sigma: float = float(SIGMA)) -> np.ndarray:
    """The float result the CLI computed, recomputed from the source as SimpleITK reads it."""
    from dualnet.api import denoise_volume
    from dualnet.io import Volume

    return denoise_volume(Volume.from_sitk(source_image), method="gaussian", modality=modality,
                          sigma=sigma).volume.array.astype(np.float64)


def source_index(names):
    """SOP Instance UID -> slice index of the source as GDCM sorted it."""
    return {str(pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID): k for k, f in enumerate(names)}


def check_derived(out_dir: Path, src_dir: Path, modality: str, *, multiframe: bool = False, label: str = ""):
    """All checks of one derived series against its source folder; returns the written datasets."""
    import SimpleITK as sitk

    files = sorted(out_dir.glob("*.dcm"))
    assert files, f"nothing written in {out_dir}"
    errors, _ = dciodvfy(files, label or out_dir.name)
    assert not errors, "dciodvfy errors:\n" + "\n".join(errors[:20])

    src_img, src_names = sitk_read_folder(src_dir)
    out_img, out_names = sitk_read_folder(out_dir)
    reversed_ = assert_same_grid(src_img, out_img, allow_reversed_slices=multiframe)
    expected = expected_result(src_img, modality)
    got = sitk.GetArrayFromImage(out_img).astype(np.float64)
    if reversed_:
        got = got[::-1]

    datasets = [pydicom.dcmread(str(f)) for f in files]
    first = datasets[0]
    slope = float(first.get("RescaleSlope", 1) or 1)
    tol = slope / 2 * (1 + 1e-9) + 1e-6 * np.abs(expected).max()
    assert np.abs(got - expected).max() <= tol, (np.abs(got - expected).max(), slope)

    src_headers = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in dict.fromkeys(src_names)]
    src0 = src_headers[0]
    index = source_index(src_names) if not multiframe else None
    series_uids = {str(ds.SeriesInstanceUID) for ds in datasets}
    assert len(series_uids) == 1 and str(src0.SeriesInstanceUID) not in series_uids
    sop_uids = [str(ds.SOPInstanceUID) for ds in datasets]
    assert len(set(sop_uids)) == len(files)
    assert not set(sop_uids) & {str(h.SOPInstanceUID) for h in src_headers}
    for ds in datasets:
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}[str(src0.Modality)]
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert ds.DerivationCodeSequence[0].CodeValue == "113087"
        assert ds.DerivationCodeSequence[0].CodingSchemeDesignator == "DCM"
        assert "gaussian" in ds.DerivationDescription and "DualNet" in ds.DerivationDescription
        assert ds.SeriesDescription == "Denoised (gaussian)"
        assert ds.SeriesNumber != src0.get("SeriesNumber")
        for kw in ("StudyInstanceUID", "PatientID", "PatientName", "FrameOfReferenceUID", "StudyDate"):
            assert str(ds.get(kw, "")) == str(src0.get(kw, "")), kw
        assert ds.BitsAllocated == 16 and ds.PixelRepresentation == src0.PixelRepresentation
        assert ds.ContributingEquipmentSequence[-1].Manufacturer == "DualNet"
        ref = ds.SourceImageSequence[0]
        (refs,) = ds.ReferencedSeriesSequence  # this instance's own source instance, not the whole series
        assert refs.SeriesInstanceUID == src0.SeriesInstanceUID
        assert [str(r.ReferencedSOPInstanceUID) for r in refs.ReferencedInstanceSequence] == \
            [str(ref.ReferencedSOPInstanceUID)]
        assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        # geometry of the source instance (or frame) this slice came from
        if multiframe:
            k = int(ref.ReferencedFrameNumber) - 1
            fg = src0.PerFrameFunctionalGroupsSequence[k]
            shared = src0.SharedFunctionalGroupsSequence[0]
            ipp = fg.PlanePositionSequence[0].ImagePositionPatient
            iop = (fg.get("PlaneOrientationSequence") or shared.PlaneOrientationSequence)[0].ImageOrientationPatient
            spacing = (fg.get("PixelMeasuresSequence") or shared.PixelMeasuresSequence)[0].PixelSpacing
            assert ref.ReferencedSOPInstanceUID == src0.SOPInstanceUID
            assert ds.InstanceNumber == k + 1  # frame order
        else:
            k = index[str(ref.ReferencedSOPInstanceUID)]
            h = src_headers[k]
            ipp, iop, spacing = h.ImagePositionPatient, h.ImageOrientationPatient, h.PixelSpacing
            assert ds.InstanceNumber == h.InstanceNumber  # the source's scroll order, not GDCM's
            assert str(ds.get("SliceThickness", "")) == str(h.get("SliceThickness", ""))
            assert str(ds.get("SliceLocation", "")) == str(h.get("SliceLocation", ""))
        assert np.allclose([float(v) for v in ds.ImagePositionPatient], [float(v) for v in ipp], atol=1e-6)
        assert np.allclose([float(v) for v in ds.ImageOrientationPatient], [float(v) for v in iop], atol=1e-7)
        assert np.allclose([float(v) for v in ds.PixelSpacing], [float(v) for v in spacing], atol=1e-7)
        # pydicom's own decoding: values within half a rescale step of the float result
        assert np.abs(modality_values(ds) - expected[k]).max() <= tol
    return datasets


# ----------------------------------------------------------------------------- real series
def test_ct_gantry_tilt_series_cli(dicom_dir, tmp_path, capsys):
    src = dicom_dir / CT
    before = tree_hashes(src)
    out = tmp_path / "ct_out"
    code, stdout, err = run_cli(["denoise", src, out, "--dicom", "--method", "gaussian", "--sigma", SIGMA], capsys)
    assert code == 0, err
    assert "series 1002 'Denoised (gaussian)'" in stdout and "28 instances" in stdout
    assert len(list(out.glob("*.dcm"))) == 28
    datasets = check_derived(out, src, "ct", label="CT gantry tilt")
    assert datasets[0].RescaleSlope == 1 and datasets[0].RescaleType == "HU"  # whole HU, as the scanner wrote
    tilts = {float(ds.GantryDetectorTilt) for ds in datasets}
    assert tilts == {18.5}
    assert tree_hashes(src) == before


def test_mr_series_api_with_fine_rescale(dicom_dir, tmp_path):
    from dualnet.api import denoise_dicom

    src = dicom_dir / MR
    before = tree_hashes(src)
    out = tmp_path / "mr_out"
    report = denoise_dicom(src, out, method="gaussian", sigma=float(SIGMA), rescale="max")
    assert report.ok and len(report.outcomes) == 1 and report.outcomes[0].modality == "mri"
    derived = report.outcomes[0].derived
    assert derived.folder == out and len(derived.files) == 35 and derived.rescale_slope < 1
    datasets = check_derived(out, src, "mri", label="MR 2D T1, rescale max")
    assert float(datasets[0].RescaleSlope) == derived.rescale_slope
    assert tree_hashes(src) == before


def test_enhanced_multiframe_written_as_classic(dicom_dir, tmp_path, capsys):
    import SimpleITK as sitk

    src = dicom_dir / ENH
    before = tree_hashes(src)
    # the frame order SimpleITK stacks is the file's frame order (what the slice<->frame mapping assumes)
    img, _ = sitk_read_folder(src)
    frames = pydicom.dcmread(str(src / "0001.dcm")).pixel_array
    assert np.array_equal(sitk.GetArrayFromImage(img), frames)
    out = tmp_path / "enh_out"
    code, _, err = run_cli(["denoise", src, out, "--dicom", "--method", "gaussian", "--sigma", SIGMA, "-q"], capsys)
    assert code == 0, err
    datasets = check_derived(out, src, "mri", multiframe=True, label="enhanced MR -> classic")
    assert len(datasets) == 96
    ds = datasets[0]
    assert "NumberOfFrames" not in ds and "PerFrameFunctionalGroupsSequence" not in ds
    assert list(ds.ScanningSequence) == ["GR", "IR"] and float(ds.InversionTime) == 900.0
    assert float(ds.EchoTime) == pytest.approx(2.41) and float(ds.RepetitionTime) == 1800
    assert tree_hashes(src) == before


@pytest.mark.parametrize("series, override", [(MR, None), (CT, "mri")])
def test_single_slice(dicom_dir, tmp_path, capsys, series, override):
    """One file given as INPUT. The CT slice uses --modality mri: the CT noise-model fit of the
    classical baselines refuses a single slice ("too few voxels"), which is not a DICOM matter."""
    src = tmp_path / "one"
    src.mkdir()
    one = sorted((dicom_dir / series).glob("*.dcm"))[4]
    shutil.copy2(one, src / one.name)
    before = tree_hashes(src)
    out = tmp_path / "one_out"
    extra = ["--modality", override] if override else []
    code, stdout, err = run_cli(["denoise", src / one.name, out, "--dicom", "--method", "gaussian", "--sigma", SIGMA,
                                 *extra], capsys)
    assert code == 0, err
    (ds,) = check_derived(out, src, override or "mri", label=f"single slice {series}")
    source = pydicom.dcmread(str(one), stop_before_pixels=True)
    assert ds.InstanceNumber == source.InstanceNumber and ds.Modality == source.Modality
    assert tree_hashes(src) == before


def _rotation(axis, angle_deg):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.deg2rad(angle_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def make_oblique(src_dir: Path, dst: Path, n: int = 6) -> Path:
    """Copies of ``n`` consecutive slices with IOP / IPP rotated consistently (a rigid rotation of
    the patient coordinates about the origin); pixel data and everything else unchanged."""
    from dicom_helpers import sitk_read_folder

    _, names = sitk_read_folder(src_dir)
    rot = _rotation([1.0, 0.7, 0.3], 27.0)
    dst.mkdir()
    for f in names[10:10 + n]:
        ds = pydicom.dcmread(str(f))
        iop = np.array([float(v) for v in ds.ImageOrientationPatient]).reshape(2, 3)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (rot @ iop.T).T.ravel()]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in rot @ ipp]
        ds.save_as(str(dst / f.name))
    return dst


def test_oblique_series(dicom_dir, tmp_path, capsys):
    src = make_oblique(dicom_dir / MR, tmp_path / "oblique")
    img, _ = sitk_read_folder(src)
    direction = np.array(img.GetDirection()).reshape(3, 3)
    assert np.abs(direction).max() < 0.99  # truly oblique: no axis-aligned column
    before = tree_hashes(src)
    out = tmp_path / "oblique_out"
    code, _, err = run_cli(["denoise", src, out, "--dicom", "--method", "gaussian", "--sigma", SIGMA, "-q"], capsys)
    assert code == 0, err
    check_derived(out, src, "mri", label="oblique")
    assert tree_hashes(src) == before


# ----------------------------------------------------------------------------- a study folder
def test_study_folder_with_nested_series_and_a_report(dicom_dir, tmp_path, capsys):
    study = tmp_path / "study"
    (study / "a" / "ct").mkdir(parents=True)
    (study / "b" / "mr").mkdir(parents=True)
    ct_names = sorted((dicom_dir / CT).glob("*.dcm"))[:4]
    for f in ct_names:
        shutil.copy2(f, study / "a" / "ct" / f.name)
    for f in sorted((dicom_dir / MR).glob("*.dcm"))[:4]:
        shutil.copy2(f, study / "b" / "mr" / f.name)
    basic_text_sr(ct_names[0], study / "b" / "report.dcm")
    (study / "notes.txt").write_text("not DICOM\n", encoding="utf-8")
    before = tree_hashes(study)
    out = tmp_path / "derived"
    code, stdout, err = run_cli(["denoise", study, out, "--dicom", "--method", "gaussian", "--sigma", SIGMA,
                                 "--info-json", tmp_path / "run.json"], capsys)
    assert code == 0, err
    subfolders = sorted(p.name for p in out.iterdir())
    assert len(subfolders) == 2 and subfolders[0].startswith("001_CT") and subfolders[1].startswith("002_MR")
    assert "Basic Text SR Storage (SR) is not a CT or MR image" in stdout
    assert "ignored 1 non-DICOM file" in stdout
    import json

    run = json.loads((tmp_path / "run.json").read_text())
    assert [s["modality"] for s in run["series"]] == ["ct", "mri"]  # from the DICOM Modality tags
    numbers = {s["derived"]["series_number"] for s in run["series"]}
    assert len(numbers) == 2
    check_derived(out / subfolders[0], study / "a" / "ct", "ct", label="study/CT")
    check_derived(out / subfolders[1], study / "b" / "mr", "mri", label="study/MR")
    assert tree_hashes(study) == before


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("where", ["same", "inside", "around", "not_empty"])
def test_output_folder_never_overlaps_the_input(dicom_dir, tmp_path, capsys, where):
    root = tmp_path / "root"
    src = root / "in"
    src.mkdir(parents=True)
    for f in sorted((dicom_dir / MR).glob("*.dcm"))[:2]:
        shutil.copy2(f, src / f.name)
    out = {"same": src, "inside": src / "out", "around": root, "not_empty": tmp_path / "full"}[where]
    if where == "not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("x", encoding="utf-8")
    before_all = tree_hashes(tmp_path)
    code, _, err = run_cli(["denoise", src, out, "--dicom", "--method", "gaussian", "--sigma", SIGMA, "-q"], capsys)
    assert code == 2
    assert err.startswith("dualnet: error:") and len(err.strip().splitlines()) == 1
    assert tree_hashes(tmp_path) == before_all  # nothing written, nothing changed


def test_info_json_never_replaces_the_model_card_or_lands_in_the_output(dicom_dir, tmp_path, capsys):
    """``--dicom --info-json`` was checked against the output and the input folder only: naming the
    ``--model``'s card replaced it with the run report (the volume path refused the same)."""
    from dualnet.modelfile import card_path

    src = tmp_path / "src"
    shutil.copytree(dicom_dir / MR, src)
    model = tmp_path / "mdl" / "m.safetensors"
    model.parent.mkdir()
    model.write_bytes(b"weights")
    card = Path(card_path(model))
    card.write_text('{"name": "m"}', encoding="utf-8")
    for info in (card, tmp_path / "o" / "run.json"):
        code, _, err = run_cli(["denoise", src, tmp_path / "o", "--dicom", "--method", "gaussian", "--sigma", SIGMA,
                                "--model", model, "--info-json", info, "-q"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert card.read_text(encoding="utf-8") == '{"name": "m"}' and not (tmp_path / "o").exists()


def test_send_without_dicom_and_bad_node_are_refused(dicom_dir, tmp_path, capsys):
    code, _, err = run_cli(["denoise", dicom_dir / MR, tmp_path / "o.nrrd", "--send", "A@h:104"], capsys)
    assert code == 2 and "--send needs --dicom" in err
    code, _, err = run_cli(["denoise", dicom_dir / MR, tmp_path / "o", "--dicom", "--send", "nohost"], capsys)
    assert code == 2 and "AET@HOST:PORT" in err and not (tmp_path / "o").exists()


def test_input_without_dicom_images_is_refused(tmp_path, capsys, shared_data):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy2(shared_data / "ct" / "totalseg_abdomen_ct.nii.gz", src / "ct.nii.gz")
    code, _, err = run_cli(["denoise", src, tmp_path / "o", "--dicom", "--method", "gaussian", "-q"], capsys)
    assert code == 2 and "no CT or MR DICOM image series found" in err and not (tmp_path / "o").exists()


def test_non_finite_result_is_not_written(dicom_dir, tmp_path):
    from dualnet import dicom_out
    from dualnet.errors import InputError

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy2(dicom_dir / CT / "03.dcm", src / "03.dcm")
    (series,), _ = dicom_out.find_dicom_series(src)
    vol = dicom_out.read_series(series)
    bad = vol.with_array(vol.array.astype(np.float32))
    bad.array[0, 5, 5] = np.nan
    prov = dicom_out.Provenance("gaussian", "ct")
    with pytest.raises(InputError, match="NaN or Inf"):
        dicom_out.write_derived_series(bad, series, tmp_path / "o", prov)
    assert not (tmp_path / "o").exists()


def test_failure_part_way_leaves_no_partial_series(dicom_dir, tmp_path, monkeypatch):
    from dualnet import dicom_out

    src = tmp_path / "in"
    src.mkdir()
    for f in sorted((dicom_dir / MR).glob("*.dcm"))[:4]:
        shutil.copy2(f, src / f.name)
    (series,), _ = dicom_out.find_dicom_series(src)
    vol = dicom_out.read_series(series)
    calls = []
    real = dicom_out.atomic_write_bytes

    def flaky(path, data):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(dicom_out, "atomic_write_bytes", flaky)
    with pytest.raises(OSError):
        dicom_out.write_derived_series(vol.with_array(vol.array.astype(np.float32)), series, tmp_path / "o",
                                       dicom_out.Provenance("gaussian", "mri"))
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- parts
def test_choose_rescale_keeps_values_within_half_a_step():
    from dualnet.dicom_out import choose_rescale, quantize

    rng = np.random.default_rng(0)
    cases = [(-1024.3, 3071.2, np.int16, 1.0, 0.0, "source"), (-1500.0, 2800.0, np.int16, 1.0, -1024.0, "source"),
             (-3.7, 2900.4, np.uint16, 1.0, 0.0, "source"), (0.0, 2927.0, np.uint16, 1.0, 0.0, "max"),
             (-1024.0, 3071.0, np.int16, 1.0, 0.0, "max"), (-5e5, 7e5, np.int16, 1.0, 0.0, "source"),
             (0.001, 0.02, np.uint16, 1.0, 0.0, "max"), (0.0, 1e-3, np.uint16, 2.5, 0.0, "source")]
    for lo, hi, dtype, s0, b0, precision in cases:
        s_str, b_str = choose_rescale(lo, hi, dtype, s0, b0, precision)
        assert len(s_str) <= 16 and len(b_str) <= 16
        s, b = float(s_str), float(b_str)
        values = np.concatenate([[lo, hi], rng.uniform(lo, hi, 1000)])
        q = quantize(values, s, b, dtype)
        assert q.dtype == np.dtype(dtype)
        assert np.abs(q.astype(np.float64) * s + b - values).max() <= s / 2 * (1 + 1e-9)
        if precision == "source" and lo >= -1024 and hi <= 3071 and dtype is np.int16:
            assert (s, b) == (1.0, b0)
    assert choose_rescale(0.0, 2927.0, np.uint16, precision="max")[0] == "0.0625"


def test_provenance_names_model_and_hash():
    from dualnet import __version__, modelfile
    from dualnet.dicom_out import provenance_from_info

    path = modelfile.default_model_path("ct")
    card = modelfile.read_card(path)
    prov = provenance_from_info({"model": str(path), "model_version": card.get("version")}, "dualnet", "ct")
    text = prov.description()
    assert card["sha256"] in text and f"DualNet {__version__}" in text and path.name in text
    assert prov.series_description() == f"Denoised (dualnet, {path.stem})"
    unc = prov.description("uncertainty")
    assert unc.startswith("Monte Carlo dropout standard deviation")
    assert "tta" not in text and "views" not in text
    ran = provenance_from_info({"model": str(path), "inference_tta": 8, "inference_views": 3}, "dualnet", "ct")
    assert "tta x8" in ran.description() and "views z, y and x averaged" in ran.description()


def test_uncertainty_series(dicom_dir, tmp_path):
    """The MC-dropout standard deviation written as its own derived series (DCM 113061)."""
    from dualnet import dicom_out

    src = tmp_path / "in"
    src.mkdir()
    for f in sorted((dicom_dir / MR).glob("*.dcm"))[:3]:
        shutil.copy2(f, src / f.name)
    (series,), _ = dicom_out.find_dicom_series(src)
    vol = dicom_out.read_series(series)
    sd = np.abs(np.random.default_rng(1).normal(0, 3.0, vol.array.shape)).astype(np.float32)
    prov = dicom_out.Provenance("dualnet", "mri", model="dualnet_mri.safetensors", model_sha256="ab" * 32)
    derived = dicom_out.write_derived_series(vol.with_array(sd), series, tmp_path / "unc", prov, kind="uncertainty")
    errors, _ = dciodvfy(derived.files, "uncertainty")
    assert not errors, errors
    assert derived.series_number == series.series_number + 2000
    ds = pydicom.dcmread(str(derived.files[0]))
    assert ds.DerivationCodeSequence[0].CodeValue == "113061" and ds.SeriesDescription.startswith("Uncertainty")
    assert "ab" * 32 in ds.DerivationDescription
    index = source_index(series.files)
    for f in derived.files:
        d = pydicom.dcmread(str(f))
        k = index[str(d.SourceImageSequence[0].ReferencedSOPInstanceUID)]
        assert np.abs(modality_values(d) - sd[k]).max() <= derived.rescale_slope / 2 * (1 + 1e-9) + 1e-6


def test_series_without_a_noise_model_tag_falls_back_to_the_intensities(dicom_dir, tmp_path):
    """A copy of the real CT series re-tagged Modality OT (other): with ``auto`` the noise model
    comes from the voxels (air at -1000 HU -> ct) and the note says so; the source is untouched."""
    from dualnet.api import denoise_dicom

    src = tmp_path / "ot"
    shutil.copytree(dicom_dir / CT, src)
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        ds = pydicom.dcmread(str(f))
        ds.Modality = "OT"
        ds.save_as(str(f))
    before = tree_hashes(src)
    report = denoise_dicom(src, tmp_path / "out", method="gaussian", sigma=float(SIGMA))
    assert report.ok and report.outcomes[0].modality == "ct"
    assert "from the intensities" in report.outcomes[0].info["modality_note"]
    assert tree_hashes(src) == before


def test_dicom_denoise_prints_each_series_noise_warning(shared_data, tmp_path, capsys, monkeypatch):
    """`denoise --dicom` prints a series' noise warning (the core's `noise_warning`, tested on the
    real EPI in test_sure_guard.py) with the series folder. Here the core's wording is replaced, since
    this real series has a masked background that never draws one: the seam under test is the CLI's."""
    import shutil

    import dualnet.estimate as estimate
    from dualnet.cli import main

    small_series = tmp_path / "in"
    small_series.mkdir()
    for f in sorted((shared_data / "dicom" / "mr_siemens_t1_fl2d_sag").glob("*.dcm"))[:5]:
        shutil.copy2(f, small_series / f.name)

    monkeypatch.setattr(estimate, "background_caution", lambda info: "TEST CAUTION")
    code = main(["denoise", str(small_series), str(tmp_path / "out"), "--dicom", "--views", "1", "-q",
                 "--device", "cpu"])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert f"dualnet: warning: {small_series}: TEST CAUTION" in err
