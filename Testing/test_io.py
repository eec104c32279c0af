"""io: geometry survives round trips for every format; bad files give one-line errors."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
import SimpleITK as sitk

from dualnet.errors import InputError
from dualnet.io import Volume, read_volume, write_volume

OBLIQUE = (0.9950042, -0.0998334, 0.0, 0.0998334, 0.9950042, 0.0, 0.0, 0.0, 1.0)


def _oblique_volume(shape=(7, 9, 11)) -> Volume:
    rng = np.random.default_rng(1)
    return Volume(rng.normal(size=shape).astype(np.float32), (0.7, 0.9, 2.5), (-10.5, 20.25, 3.0), OBLIQUE)


@pytest.mark.parametrize("ext", [".nrrd", ".nii.gz", ".nii", ".mha"])
def test_round_trip_keeps_geometry_and_axis_order(tmp_path, ext):
    vol = _oblique_volume()
    path = write_volume(vol, tmp_path / f"v{ext}")
    back = read_volume(path)
    assert back.array.shape == (7, 9, 11)  # (z, y, x)
    np.testing.assert_allclose(back.array, vol.array, rtol=1e-6)
    np.testing.assert_allclose(back.spacing, vol.spacing, rtol=1e-5)
    np.testing.assert_allclose(back.origin, vol.origin, atol=1e-4)
    np.testing.assert_allclose(back.direction, vol.direction, atol=1e-5)
    # array axis 2 is x: spacing[0] belongs to it
    img = sitk.ReadImage(str(path))
    assert img.GetSize() == (11, 9, 7)


def test_dicom_series_folder(tmp_path):
    vol = _oblique_volume((5, 16, 12))
    arr = (vol.array * 100).astype(np.int16)
    img = Volume(arr, vol.spacing, vol.origin, (1, 0, 0, 0, 1, 0, 0, 0, 1)).to_sitk()
    folder = tmp_path / "dicom"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        sl.SetMetaData("0008|0060", "MR")
        sl.SetMetaData("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, k)))))
        sl.SetMetaData("0020|0013", str(k))
        sl.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1.1")
        sl.SetMetaData("0020|000d", "1.2.826.0.1.3680043.2.1125.1.2")
        sl.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(sl)
    back = read_volume(folder)
    assert back.array.shape == (5, 16, 12)
    np.testing.assert_array_equal(back.array, arr)
    np.testing.assert_allclose(back.spacing, vol.spacing, rtol=1e-3)
    assert back.metadata.get("0008|0060") == "MR"


def test_png_2d(tmp_path):
    arr = (np.arange(12 * 10).reshape(12, 10) % 256).astype(np.uint8)
    path = write_volume(Volume(arr), tmp_path / "a.png")
    back = read_volume(path)
    assert back.ndim == 2 and back.array.shape == (12, 10)
    np.testing.assert_array_equal(back.array, arr)


def test_real_scan_geometry(mri_volume):
    assert mri_volume.array.shape == (170, 256, 256)
    assert mri_volume.array.dtype == np.int16
    assert abs(np.linalg.det(np.reshape(mri_volume.direction, (3, 3)))) == pytest.approx(1, abs=1e-4)


def test_4d_needs_a_frame(shared_data):
    path = shared_data / "real_noise" / "epi_5reps.nii.gz"
    with pytest.raises(InputError, match="4D"):
        read_volume(path)
    vol = read_volume(path, frame=2)
    assert vol.array.shape == (63, 86, 86)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(b"this is not an image at all" * 10), "cannot read"),
    ],
)
def test_bad_files(tmp_path, make, match):
    path = tmp_path / "bad.nii.gz"
    make(path)
    with pytest.raises(InputError, match=match) as info:
        read_volume(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_file(tmp_path):
    good = write_volume(_oblique_volume((20, 30, 30)), tmp_path / "good.nrrd", compress=False)
    data = good.read_bytes()
    bad = tmp_path / "truncated.nrrd"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated.nrrd"):
        read_volume(bad)


def test_vector_volume_rejected(tmp_path):
    img = sitk.Image([6, 5, 4], sitk.sitkVectorFloat32, 3)
    sitk.WriteImage(img, str(tmp_path / "vec.nrrd"))
    with pytest.raises(InputError, match="vector"):
        read_volume(tmp_path / "vec.nrrd")


def test_nan_rejected(tmp_path):
    vol = _oblique_volume()
    vol.array[1, 2, 3] = np.nan
    vol.array[0, 0, 0] = np.inf
    path = write_volume(vol, tmp_path / "nan.nrrd", check_finite=False)
    with pytest.raises(InputError, match="2 voxels are NaN or Inf"):
        read_volume(path)


def test_never_overwrites_input_and_leaves_no_temp(tmp_path):
    vol = _oblique_volume()
    src = write_volume(vol, tmp_path / "in.nrrd")
    before = src.read_bytes()
    with pytest.raises(InputError, match="input"):
        write_volume(vol.with_array(vol.array * 2), src, inputs=[src])
    assert src.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["in.nrrd"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", boom)
    with pytest.raises(InputError, match="out.nrrd: cannot write .disk full"):
        write_volume(_oblique_volume(), tmp_path / "out.nrrd")
    assert os.listdir(tmp_path) == []


def test_unwritable_format_and_missing_folder(tmp_path):
    with pytest.raises(InputError, match="unsupported output format"):
        write_volume(_oblique_volume(), tmp_path / "out.xyz")
    with pytest.raises(InputError, match="does not exist"):
        write_volume(_oblique_volume(), tmp_path / "missing" / "out.nrrd")


def test_outputs_get_normal_permissions(tmp_path):
    path = write_volume(_oblique_volume(), tmp_path / "p.nrrd")
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~mask)


def _copy_series(src, dst, n=None):
    import shutil

    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.dcm"))[:n]:
        shutil.copy2(f, dst / f.name)
    return dst


def test_dicom_folder_off_a_regular_grid_is_refused(shared_data, tmp_path):
    """The real gantry-tilted GE head CT: ITK stacks its slices on a regular grid up to 49 mm from
    their ImagePositionPatient; a volume file written from that would misplace them. Refused with
    the way out (``--dicom`` keeps each slice's position); a noise estimate may still read it."""
    folder = shared_data / "dicom" / "ct_ge_hispeed_head_tilt"
    with pytest.raises(InputError, match=r"not on a regular grid \(one lies 48.8 mm .*--dicom"):
        read_volume(folder)
    assert read_volume(folder, irregular_ok=True).array.shape == (28, 512, 512)
    regular = read_volume(shared_data / "dicom" / "mr_siemens_t1_fl2d_sag")  # a straight stack reads as before
    assert regular.array.shape == (35, 256, 256) and regular.metadata.get("0008|0060") == "MR"


def test_dicom_folder_with_one_enhanced_multiframe_file(shared_data):
    """A folder holding one enhanced MR object: its 96 frames are the slices (was refused as a 4D
    image whose --frame option was refused in turn)."""
    vol = read_volume(shared_data / "dicom" / "mr_siemens_xa30_t1w_enhanced")
    assert vol.array.shape == (96, 128, 128) and vol.metadata.get("0008|0060") == "MR"
    np.testing.assert_allclose(vol.spacing, (2.0, 2.0, 2.0), rtol=1e-5)


def test_dicom_folder_with_several_series_is_refused(shared_data, tmp_path):
    """Was: the series with the most files, silently (a study folder gave whichever was largest)."""
    mixed = _copy_series(shared_data / "dicom" / "mr_siemens_t1_fl2d_sag", tmp_path / "mixed", 6)
    _copy_series(shared_data / "dicom" / "ct_ge_hispeed_head_tilt", mixed, 3)
    with pytest.raises(InputError, match=r"holds 2 DICOM series \(MR .*6 files\); CT .*\(3 files\)\).*--dicom"):
        read_volume(mixed)


@pytest.mark.parametrize("header, key", [(".mhd", "ElementDataFile = "), (".nhdr", "data file: ")])
def test_detached_header_never_overwrites_an_inputs_data_file(tmp_path, header, key):
    """An input header names its data file; a detached output whose data file has that name must not
    replace it (the check compared with the input's header only)."""
    vol = _oblique_volume()
    write_volume(vol, tmp_path / f"x{header}", compress=False)
    src = tmp_path / f"x{header}"
    data = [f for f in tmp_path.iterdir() if f != src]
    assert len(data) == 1 and key.strip(" =:").lower() in src.read_text(encoding="latin-1").lower()
    before = data[0].read_bytes()
    other = ".nhdr" if header == ".mhd" else ".mhd"
    # the other header format, named so that its data file is the input's (x.raw for both)
    target = tmp_path / f"x{other}"
    written = None
    try:
        written = write_volume(vol.with_array(vol.array * 3), target, inputs=[src], compress=False)
    except InputError as err:
        assert "would overwrite an input" in str(err)
    assert data[0].read_bytes() == before, "the input's data file was replaced"
    np.testing.assert_array_equal(read_volume(src).array, vol.array.astype(np.float32))
    if written is not None:  # a differently named data file: both read back
        np.testing.assert_array_equal(read_volume(written).array, (vol.array * 3).astype(np.float32))
