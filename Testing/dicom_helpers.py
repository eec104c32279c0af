"""Shared helpers of the DICOM tests: real tools (dciodvfy, storescp), independent readers, hashes,
a tiny non-image object (Basic Text SR) to be skipped.

The checks read results with tools other than the project's own writer: dicom3tools' ``dciodvfy``
for IOD conformance, SimpleITK's GDCM series reader and pydicom for geometry and values.
A missing tool makes the test FAIL with the package to install (never a silent skip).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
import subprocess
import warnings
from collections import Counter
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pytest

TOOLS = {"dciodvfy": "dicom3tools", "storescp": "dcmtk", "dcmcjpeg": "dcmtk", "dcmdump": "dcmtk"}


class DicomValidatorWarning(UserWarning):
    """dciodvfy warnings of written instances (listed in pytest's warnings summary)."""


def require_tool(name: str) -> str:
    """Path of the Debian tool ``name``; virtual environments' bin folders (this one's, and any other
    on PATH, e.g. an activated one) are skipped, since pynetdicom installs Python apps of the same
    names (``storescp``, ``echoscu``, ...) there."""
    venv_bin = os.path.dirname(sys.executable)

    def is_venv_bin(d: str) -> bool:
        d = os.path.abspath(d)
        return d == os.path.abspath(venv_bin) or os.path.isfile(os.path.join(os.path.dirname(d), "pyvenv.cfg"))

    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not is_venv_bin(d)]
    path = shutil.which(name, path=os.pathsep.join(dirs))
    if not path:
        pytest.fail(f"{name} not found: install the Debian package {TOOLS.get(name, name)} "
                    f"(apt-get install -y {TOOLS.get(name, name)}); .ci/run does this before the tests")
    return path


def dciodvfy(files: Sequence[Path], label: str = "") -> Tuple[List[str], Counter]:
    """Run dciodvfy on every file; return (error lines, warning counts) and report the warnings."""
    exe = require_tool("dciodvfy")
    errors: List[str] = []
    warns: Counter = Counter()
    for f in files:
        proc = subprocess.run([exe, str(f)], capture_output=True, text=True, timeout=60)
        for line in (proc.stdout + proc.stderr).splitlines():
            if line.startswith("Error"):
                errors.append(f"{Path(f).name}: {line}")
            elif line.startswith("Warning"):
                warns[line] += 1
    if warns:
        text = "\n".join(f"  {n}x {w}" for w, n in sorted(warns.items()))
        print(f"dciodvfy warnings ({label or Path(files[0]).parent}, {len(files)} files):\n{text}")
        warnings.warn(DicomValidatorWarning(f"dciodvfy {label or Path(files[0]).parent.name}: "
                                            f"{len(warns)} kinds of warning\n{text}"))
    return errors, warns


def tree_hashes(root: Path) -> Dict[str, str]:
    """sha256 of every file under ``root`` (relative posix path -> digest)."""
    out = {}
    for f in sorted(Path(root).rglob("*")):
        if f.is_file():
            out[f.relative_to(root).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def sitk_read_folder(folder: Path):
    """(image, sorted file names) of the one series in ``folder`` as SimpleITK's GDCM reader stacks it.

    A multi-frame file read this way comes back 4D with one time point; it is reduced to 3D.
    """
    import SimpleITK as sitk

    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        assert len(ids) == 1, f"{folder}: expected one series, GDCM found {ids}"
        names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0])
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(names)
        image = reader.Execute()
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        assert size[3] == 1
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
    return image, [Path(n) for n in names]


def grid(image) -> dict:
    return {"size": image.GetSize(), "spacing": np.array(image.GetSpacing()), "origin": np.array(image.GetOrigin()),
            "direction": np.array(image.GetDirection()).reshape(3, 3)}


def assert_same_grid(a, b, allow_reversed_slices: bool = False) -> bool:
    """Same size, spacing, origin and direction (ITK). With ``allow_reversed_slices``, ``b`` may be
    the same grid stacked in the opposite slice order (same voxel centres); returns True then."""
    ga, gb = grid(a), grid(b)
    assert ga["size"] == gb["size"]
    assert np.allclose(ga["spacing"], gb["spacing"], atol=1e-5), (ga["spacing"], gb["spacing"])
    assert np.allclose(ga["direction"][:, :2], gb["direction"][:, :2], atol=1e-6)
    same = np.allclose(ga["origin"], gb["origin"], atol=1e-4) and np.allclose(ga["direction"], gb["direction"], atol=1e-6)
    if same or not allow_reversed_slices:
        assert same, (ga["origin"], gb["origin"], ga["direction"], gb["direction"])
        return False
    last = ga["origin"] + (ga["size"][2] - 1) * ga["spacing"][2] * ga["direction"][:, 2]
    assert np.allclose(last, gb["origin"], atol=1e-3), (last, gb["origin"])
    assert np.allclose(ga["direction"][:, 2], -gb["direction"][:, 2], atol=1e-6)
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0) -> bool:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def start_storescp(folder: Path, *extra: str):
    """dcmtk's ``storescp`` (AE title TESTSCP) on a free loopback port, writing into ``folder``; (process, port)."""
    exe = require_tool("storescp")
    folder.mkdir(exist_ok=True)
    port = free_port()
    proc = subprocess.Popen([exe, "--aetitle", "TESTSCP", "--output-directory", str(folder), "--socket-timeout", "20",
                             "--acse-timeout", "20", *extra, str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if not wait_for_port(port, 10.0):
        proc.kill()
        out = proc.communicate(timeout=5)[0].decode(errors="replace")
        pytest.fail(f"storescp did not start listening on port {port}: {out[-500:]}")
    return proc, port


def stop_process(proc) -> None:
    """Terminate a process started by a test (kill after 5 s)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def basic_text_sr(like: Path, path: Path) -> None:
    """A small Basic Text SR in the same study as ``like`` (a non-image object to skip)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    src = pydicom.dcmread(str(like), stop_before_pixels=True)
    ds = Dataset()
    for kw in ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID"):
        setattr(ds, kw, src.get(kw, ""))
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.SeriesNumber = 99
    ds.ValueType = "CONTAINER"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    pydicom.dcmwrite(str(path), ds, enforce_file_format=True)


def modality_values(ds) -> np.ndarray:
    """Stored pixel values of a pydicom dataset through its rescale (modality LUT), float64."""
    arr = ds.pixel_array.astype(np.float64)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return arr * slope + intercept


def interrupt_second_denoising(monkeypatch) -> None:
    """Make the second ``dualnet.api.denoise_volume`` call raise KeyboardInterrupt (a Ctrl-C during the
    second series of a ``--dicom`` run); the first runs as usual."""
    import dualnet.api as api

    real, calls = api.denoise_volume, []

    def second_is_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "denoise_volume", second_is_interrupted)
