"""DICOM out, review 35: series that hold several stacks, instance order, references, lossy history,
a failed uncertainty write, a cancel part-way, C-STORE warnings and memory.

Series are made here from real scanner files (``../shared/data/dicom``), cropped to 32 x 32 so
that denoising is cheap, then edited the way scanners write them (a second echo interleaved in
one series, ``NumberOfFrames`` 1 on classic files, a JPEG-compressed copy made by dcmtk).
Denoising is ``gaussian`` with a fixed sigma, except where an uncertainty map needs the network.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import tracemalloc
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_helpers import (dciodvfy, free_port, interrupt_second_denoising, modality_values, require_tool,
                           start_storescp, stop_process)

MR = "mr_siemens_t1_fl2d_sag"
ENH = "mr_siemens_xa30_t1w_enhanced"
SIGMA = 25.0


@pytest.fixture(scope="module")
def mr_files(shared_data) -> List[Path]:
    """Four neighbouring slices of the real sagittal T1 series (file order = InstanceNumber order)."""
    return sorted((shared_data / "dicom" / MR).glob("*.dcm"))[10:14]


def write_copy(src: Path, dst: Path, edit: Optional[Callable] = None, crop: bool = True) -> pydicom.Dataset:
    """A copy of ``src`` (pixels cropped to 32 x 32), changed by ``edit(ds, pixels)`` before saving."""
    ds = pydicom.dcmread(str(src))
    pixels = ds.pixel_array
    if crop:
        pixels = pixels[112:144, 112:144].copy()
        ds.Rows, ds.Columns = pixels.shape
    if edit is not None:
        pixels = edit(ds, pixels)
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(dst))
    return ds


def new_uid(ds) -> None:
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def with_attrs(new_instance: bool = False, **values) -> Callable:
    """An ``edit`` for :func:`write_copy` setting ``values`` (and a new SOP Instance UID)."""
    def edit(ds, pixels):
        if new_instance:
            new_uid(ds)
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        return pixels
    return edit


def two_echoes(files: List[Path], dst: Path, echoes=(1, 2)) -> Path:
    """One series holding an echo per ``echoes`` at the same slice positions, InstanceNumbers
    interleaved (as many scanners number them); echo 2 is the real slice divided by 4."""
    for echo in echoes:
        for i, f in enumerate(files):
            def edit(ds, pixels, echo=echo, number=2 * i + echo):
                with_attrs(new_instance=True, EchoNumbers=echo, InstanceNumber=number)(ds, pixels)
                return pixels // 4 if echo == 2 else pixels
            write_copy(f, dst / f"{2 * i + echo:03d}.dcm", edit)
    return dst


def denoise(src: Path, out: Path, **kwargs):
    from dualnet.dicom_out import denoise_dicom_folder

    return denoise_dicom_folder(src, out, method=kwargs.pop("method", "gaussian"), sigma=kwargs.pop("sigma", SIGMA),
                                **kwargs)


def source_uid(ds) -> str:
    return str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)


# ----------------------------------------------------------------------------- several stacks in one series
def test_echoes_of_one_series_are_denoised_as_one_stack_each(mr_files, tmp_path):
    """Two echoes in one series were stacked into one 8-slice volume (z spacing 2.06 mm instead of
    4.8) and each echo denoised with the other's slices as neighbours."""
    from dualnet.dicom_out import find_dicom_series, read_series

    src = two_echoes(mr_files, tmp_path / "echoes")
    series, _ = find_dicom_series(src)
    assert [s.n_slices for s in series] == [4, 4]
    assert [s.stack for s in series] == ["echo 1", "echo 2"]
    for s, echo in zip(series, (1, 2)):
        assert {int(pydicom.dcmread(str(f), stop_before_pixels=True).EchoNumbers) for f in s.files} == {echo}
        assert read_series(s).spacing[2] == pytest.approx(4.8, abs=1e-3)

    report = denoise(src, tmp_path / "out")
    assert report.ok and len(report.outcomes) == 2
    derived = [o.derived for o in report.outcomes]
    assert len({d.series_number for d in derived}) == 2
    assert [d.description for d in derived] == ["Denoised (gaussian) echo 1", "Denoised (gaussian) echo 2"]
    assert "echo 2" in report.outcomes[1].line()
    # echo 2 denoised within its series gives what echo 2 alone gives (same InstanceNumbers)
    alone = two_echoes(mr_files, tmp_path / "echo2", echoes=(2,))
    single = denoise(alone, tmp_path / "out2").outcomes[0].derived
    reference = {int(d.InstanceNumber): d for d in (pydicom.dcmread(str(f)) for f in single.files)}
    for f in derived[1].files:
        ds = pydicom.dcmread(str(f))
        assert ds.SeriesDescription == "Denoised (gaussian) echo 2" and ds.EchoNumbers == 2
        src_ds = pydicom.dcmread(str(src / f"{int(ds.InstanceNumber):03d}.dcm"), stop_before_pixels=True)
        assert source_uid(ds) == src_ds.SOPInstanceUID and src_ds.EchoNumbers == 2
        same = reference[int(ds.InstanceNumber)]
        assert np.abs(modality_values(ds) - modality_values(same)).max() <= float(ds.get("RescaleSlope", 1))


def test_a_second_copy_of_a_series_is_read_once(mr_files, tmp_path):
    from dualnet.dicom_out import find_dicom_series

    for sub in ("a", "b"):
        for f in mr_files:
            write_copy(f, tmp_path / "in" / sub / f.name)
    (series,), skipped = find_dicom_series(tmp_path / "in")
    assert series.n_slices == 4 and not series.refused
    assert {f.parent.name for f in series.files} == {"a"}
    (dup,) = skipped
    assert dup.count == 4 and "same SOP Instance UID" in dup.line() and str(tmp_path / "in" / "b") in dup.line()
    report = denoise(tmp_path / "in", tmp_path / "out")
    assert report.ok and len(report.outcomes[0].derived.files) == 4


def test_images_repeating_positions_that_nothing_separates_are_refused(mr_files, tmp_path):
    """The same slices twice under new SOP Instance UIDs (no echo, b-value, time or acquisition to
    tell them apart): refused with the reason, nothing written."""
    from dualnet.dicom_out import series_from_files
    from dualnet.errors import InputError

    src = tmp_path / "in"
    for f in mr_files:
        write_copy(f, src / f"a_{f.name}")
        write_copy(f, src / f"b_{f.name}", with_attrs(new_instance=True))
    report = denoise(src, tmp_path / "out")
    (outcome,) = report.outcomes
    assert outcome.status == "failed" and outcome.derived is None and not report.written_files
    assert str(src) in outcome.error and "8 images share 4 slice positions" in outcome.error
    assert "\n" not in outcome.error and not list((tmp_path / "out").glob("*"))
    with pytest.raises(InputError, match="share 4 slice positions"):
        series_from_files(sorted(src.glob("*.dcm")))


def test_a_multiframe_file_repeating_positions_is_refused(shared_data, tmp_path):
    """The real enhanced MR file with frame 2 moved onto frame 1's position (as a file holding two
    echoes or time points of one slice has): refused, not stacked as one volume."""
    from dualnet.dicom_out import find_dicom_series

    ds = pydicom.dcmread(str(shared_data / "dicom" / ENH / "0001.dcm"))
    frames = ds.PerFrameFunctionalGroupsSequence
    first = frames[0].PlanePositionSequence[0].ImagePositionPatient
    frames[1].PlanePositionSequence[0].ImagePositionPatient = list(first)
    src = tmp_path / "enh"
    src.mkdir()
    ds.save_as(str(src / "0001.dcm"))
    report = denoise(src, tmp_path / "out")
    assert report.outcomes[0].status == "failed" and "repeat slice positions" in report.outcomes[0].error
    (series,), _ = find_dicom_series(src)
    assert "frames repeat slice positions" in series.refused
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_classic_files_with_number_of_frames_1_are_one_series(mr_files, tmp_path):
    """Classic MR Image Storage files carrying NumberOfFrames = 1 were each taken as a multi-frame
    volume: one derived series per slice."""
    from dualnet.dicom_out import find_dicom_series

    src = tmp_path / "in"
    for f in mr_files:
        write_copy(f, src / f.name, with_attrs(NumberOfFrames=1))
    (series,), _ = find_dicom_series(src)
    assert series.n_slices == 4 and not series.multiframe
    report = denoise(src, tmp_path / "out")
    assert report.ok and len(report.outcomes) == 1 and len(report.written_files) == 4


# ----------------------------------------------------------------------------- instance order and references
def test_instance_numbers_follow_the_source_and_references_name_only_the_source(mr_files, tmp_path):
    """GDCM stacks this sagittal series against its InstanceNumbers; the derived instances keep the
    source's numbers (scroll order). Each instance references its own source instance only."""
    src = tmp_path / "in"
    for f in mr_files:
        write_copy(f, src / f.name)
    report = denoise(src, tmp_path / "out")
    files = report.outcomes[0].derived.files
    numbers = {str(pydicom.dcmread(str(f)).SOPInstanceUID): int(pydicom.dcmread(str(f)).InstanceNumber)
               for f in src.glob("*.dcm")}
    seen = []
    for f in files:
        ds = pydicom.dcmread(str(f))
        assert ds.InstanceNumber == numbers[source_uid(ds)]
        (item,) = ds.ReferencedSeriesSequence
        assert [str(r.ReferencedSOPInstanceUID) for r in item.ReferencedInstanceSequence] == [source_uid(ds)]
        seen.append(int(ds.InstanceNumber))
    assert seen == sorted(seen, reverse=True)  # GDCM's slice order runs against the source numbering
    errors, _ = dciodvfy(files, "instance numbers")
    assert not errors, errors


def test_repeated_instance_numbers_are_ranked(mr_files, tmp_path):
    src = tmp_path / "in"
    given = [20, 20, 10, 30]
    for f, number in zip(mr_files, given):
        write_copy(f, src / f.name, with_attrs(InstanceNumber=number))
    report = denoise(src, tmp_path / "out")
    by_uid = {str(pydicom.dcmread(str(f)).SOPInstanceUID): f.name for f in src.glob("*.dcm")}
    rank = {mr_files[2].name: 1, mr_files[3].name: 4}
    got = {by_uid[source_uid(pydicom.dcmread(str(f)))]: int(pydicom.dcmread(str(f)).InstanceNumber)
           for f in report.outcomes[0].derived.files}
    assert sorted(got.values()) == [1, 2, 3, 4]
    assert {k: got[k] for k in rank} == rank and {got[mr_files[0].name], got[mr_files[1].name]} == {2, 3}


# ----------------------------------------------------------------------------- lossy history
def test_a_lossy_compressed_source_marks_the_derived_series_lossy(mr_files, tmp_path):
    """dcmtk's dcmcjpeg (JPEG extended, lossy) copies, with the LossyImageCompression attributes
    removed as some archives deliver them: the transfer syntax alone tells the history."""
    exe = require_tool("dcmcjpeg")
    src = tmp_path / "jpeg"
    src.mkdir()
    for f in mr_files[:3]:
        subprocess.run([exe, "+ee", str(f), str(src / f.name)], check=True, capture_output=True, timeout=60)
        ds = pydicom.dcmread(str(src / f.name))
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.51"
        for kw in ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            delattr(ds, kw)
        ds.save_as(str(src / f.name))
    report = denoise(src, tmp_path / "out")
    assert report.ok
    for f in report.written_files:
        ds = pydicom.dcmread(str(f))
        assert ds.LossyImageCompression == "01" and ds.LossyImageCompressionMethod == "ISO_10918_1"
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    errors, _ = dciodvfy(report.written_files, "lossy source")
    assert not errors, errors


# ----------------------------------------------------------------------------- failures and cancel
def test_a_failed_uncertainty_write_leaves_nothing(mr_files, tmp_path):
    """The network's uncertainty series cannot be written (its folder gets a file after the checks):
    the series is failed and its denoised series is removed too, so ``--send`` has nothing of it."""
    src = tmp_path / "in"
    for f in mr_files:
        write_copy(f, src / f.name)
    unc = tmp_path / "unc"

    def occupy(series):
        unc.mkdir(exist_ok=True)
        (unc / "other.txt").write_text("someone else's file\n", encoding="utf-8")

    report = denoise(src, tmp_path / "out", method="dualnet", sigma=None, uncertainty_dir=unc, mc_samples=2, views=1,
                     device="cpu", progress_factory=occupy)
    (outcome,) = report.outcomes
    assert outcome.status == "failed" and "not empty" in outcome.error
    assert outcome.derived is None and outcome.uncertainty is None and report.written_files == []
    assert not (tmp_path / "out").exists() and [p.name for p in unc.iterdir()] == ["other.txt"]


def test_a_cancel_part_way_hands_back_the_series_already_written(mr_files, tmp_path):
    from dualnet.errors import CancelledError
    from dualnet.progress import CancelToken

    study = tmp_path / "study"
    other_uid = generate_uid()
    for f in mr_files[:3]:
        write_copy(f, study / "a" / f.name)
        write_copy(f, study / "b" / f.name, with_attrs(new_instance=True, SeriesInstanceUID=other_uid, SeriesNumber=9))
    token = CancelToken()
    calls = []

    def second_cancels(series):
        calls.append(series)
        if len(calls) == 2:
            token.cancel()

    with pytest.raises(CancelledError) as caught:
        denoise(study, tmp_path / "out", progress_factory=second_cancels, cancel=token)
    partial = caught.value.partial_report
    (done,) = partial.outcomes
    assert done.status == "ok" and len(partial.written_files) == 3 and all(f.is_file() for f in partial.written_files)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [done.derived.folder.name]


# ----------------------------------------------------------------------------- C-STORE
def test_warning_statuses_count_as_stored(mr_files, tmp_path):
    """A node (pynetdicom's storage SCP) answering each C-STORE with a DICOM Warning status
    (0001, 0107, 0116, Bxxx) stored the instance; a Refused status did not."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import MRImageStorage

    from dualnet.dicom_send import send_files

    statuses = [0x0001, 0x0107, 0x0116, 0xB123, 0xA700]
    files = []
    for i, status in enumerate(statuses):
        files.append(tmp_path / f"{i}.dcm")
        write_copy(mr_files[i % len(mr_files)], files[-1], with_attrs(new_instance=True))
    answers = dict(zip((str(pydicom.dcmread(str(f)).SOPInstanceUID) for f in files), statuses))
    lock = threading.Lock()

    def handle_store(event):
        with lock:
            return answers[str(event.dataset.SOPInstanceUID)]

    scp = AE(ae_title="WARNSCP")
    scp.add_supported_context(MRImageStorage)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    try:
        results = send_files(files, f"WARNSCP@127.0.0.1:{port}", timeout=20)
    finally:
        server.shutdown()
    assert [r.status for r in results] == statuses
    assert [r.stored for r in results] == [True, True, True, True, False]
    assert "ok   0x0107" in results[1].line() and "attribute list error" in results[1].line()
    assert results[3].message == "Warning" and "0xB123" in results[3].line()


def test_files_are_read_one_at_a_time_when_sending(shared_data, tmp_path):
    """All 35 real MR files (4.6 MB of pixels) sent to dcmtk's storescp: memory held at once stays
    well under the total (each file is read just before it is sent; about 1 MB in steady state).
    A first send of one file imports what sending needs, so the measure holds no imports."""
    from dualnet.dicom_send import send_files

    files = sorted((shared_data / "dicom" / MR).glob("*.dcm"))
    pixel_bytes = sum(256 * 256 * 2 for _ in files)
    proc, port = start_storescp(tmp_path / "pacs")
    try:
        assert send_files(files[:1], f"TESTSCP@127.0.0.1:{port}", timeout=20)[0].stored
        tracemalloc.start()
        try:
            results = send_files(files, f"TESTSCP@127.0.0.1:{port}", timeout=20)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        stop_process(proc)
    assert len(results) == 35 and all(r.stored for r in results)
    assert peak < pixel_bytes / 2, (peak, pixel_bytes)


def test_the_command_says_which_series_a_cancel_kept(mr_files, tmp_path, monkeypatch, capsys):
    """`dualnet denoise --dicom` said "cancelled; no output written" while the series finished before the
    cancel stayed on disk; it now lists them (and sends nothing)."""
    from dualnet.cli import main

    study = tmp_path / "study"
    other_uid = generate_uid()
    for f in mr_files[:3]:
        write_copy(f, study / "a" / f.name)
        write_copy(f, study / "b" / f.name, with_attrs(new_instance=True, SeriesInstanceUID=other_uid, SeriesNumber=9))
    interrupt_second_denoising(monkeypatch)
    code = main(["denoise", str(study), str(tmp_path / "out"), "--dicom", "--method", "gaussian", "--sigma", "25"])
    err = capsys.readouterr().err
    assert code == 130 and "the 1 series finished before are kept" in err and "no output written" not in err
    (kept,) = list((tmp_path / "out").iterdir())
    assert len(list(kept.glob("*.dcm"))) == 3


def test_second_review_of_the_stack_split(mr_files, tmp_path):
    """Session 35's second review: every image of a series at one position (a single-slice cine) became
    one derived series per image; stack values were rounded to 6 digits (acquisitions 1234567 and
    1234568 merged); malformed geometry stopped the discovery of the whole folder."""
    from dualnet.dicom_out import find_dicom_series

    phases = tmp_path / "cine"
    for t in range(4):  # one slice position, four trigger times
        write_copy(mr_files[0], phases / f"{t}.dcm", with_attrs(new_instance=True, TriggerTime=40.0 * t,
                                                                InstanceNumber=t + 1))
    (cine,), _ = find_dicom_series(phases)
    assert cine.n_slices == 4 and not cine.refused and not cine.stack  # one stack, as before session 35

    acquisitions = tmp_path / "acq"
    for k, acq in enumerate((1234567, 1234568)):
        for i, f in enumerate(mr_files):
            write_copy(f, acquisitions / f"{k}_{i}.dcm",
                       with_attrs(new_instance=True, AcquisitionNumber=acq, InstanceNumber=10 * k + i + 1))
    series, _ = find_dicom_series(acquisitions)
    assert [s.stack for s in series] == ["acquisition 1234567", "acquisition 1234568"]

    broken = tmp_path / "broken"
    write_copy(mr_files[0], broken / "a" / "0.dcm", with_attrs(new_instance=True, ImageOrientationPatient=[1, 0, 0]))
    for f in mr_files:
        write_copy(f, broken / "b" / f.name, with_attrs(new_instance=True, SeriesInstanceUID="1.2.3.4.5"))
    found, _ = find_dicom_series(broken)  # the good series is still found
    assert any(s.series_uid == "1.2.3.4.5" and s.n_slices == 4 for s in found)


def test_an_explicitly_lossless_source_stays_lossless(mr_files, tmp_path):
    from dualnet.dicom_out import _keep_lossy_history

    src = pydicom.dcmread(str(mr_files[0]))
    src.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.91"  # JPEG 2000: lossless or lossy
    out = pydicom.Dataset()
    src.LossyImageCompression = "00"
    _keep_lossy_history(out, src)
    assert "LossyImageCompression" not in out
    del src.LossyImageCompression
    _keep_lossy_history(out, src)
    assert out.LossyImageCompression == "01"
