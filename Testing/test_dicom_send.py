"""``--send AET@HOST:PORT``: C-STORE of the derived series to a real DICOM node.

The node is dcmtk's ``storescp`` on 127.0.0.1 (a free port), started and stopped by each test with
bounded timeouts. Checked: everything arrives (count and SOP Instance UIDs, read back with pydicom);
an unreachable node and a node that refuses the association give exit code 3 with the files kept.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from dicom_helpers import free_port, start_storescp, stop_process, tree_hashes

MR = "mr_siemens_t1_fl2d_sag"


@pytest.fixture
def small_series(shared_data, tmp_path) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    for f in sorted((shared_data / "dicom" / MR).glob("*.dcm"))[:5]:
        shutil.copy2(f, src / f.name)
    return src


def denoise_and_send(src: Path, out: Path, node: str, capsys):
    from dualnet.cli import main

    code = main(["denoise", str(src), str(out), "--dicom", "--method", "gaussian", "--sigma", "25", "-q", "--send", node])
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


def test_store_to_storescp_arrives_complete(small_series, tmp_path, capsys):
    received = tmp_path / "pacs"
    proc, port = start_storescp(received)
    try:
        before = tree_hashes(small_series)
        code, stdout, err = denoise_and_send(small_series, tmp_path / "out", f"TESTSCP@127.0.0.1:{port}", capsys)
    finally:
        stop_process(proc)
    assert code == 0, err
    written = sorted((tmp_path / "out").glob("*.dcm"))
    assert len(written) == 5  # files kept after sending
    lines = [line for line in stdout.splitlines() if line.startswith("C-STORE")]
    assert len(lines) == 5 and all(" ok " in line and "0x0000" in line for line in lines)
    assert f"sent 5/5 instances to TESTSCP@127.0.0.1:{port}" in stdout
    got = sorted(str(pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID) for f in received.iterdir())
    sent = sorted(str(pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID) for f in written)
    assert got == sent
    assert tree_hashes(small_series) == before


def test_unreachable_node_exits_nonzero_and_keeps_files(small_series, tmp_path, capsys):
    port = free_port()  # nothing listens there
    code, stdout, err = denoise_and_send(small_series, tmp_path / "out", f"PACS@127.0.0.1:{port}", capsys)
    assert code == 3
    assert "files kept on disk" in err and err.startswith("dualnet: error:")
    assert len(list((tmp_path / "out").glob("*.dcm"))) == 5


def test_refusing_node_exits_nonzero_and_keeps_files(small_series, tmp_path, capsys):
    proc, port = start_storescp(tmp_path / "pacs", "--refuse")
    try:
        code, stdout, err = denoise_and_send(small_series, tmp_path / "out", f"TESTSCP@127.0.0.1:{port}", capsys)
    finally:
        stop_process(proc)
    assert code == 3
    assert "refused the association" in err
    assert len(list((tmp_path / "out").glob("*.dcm"))) == 5
    assert not any((tmp_path / "pacs").iterdir())


def test_parse_node():
    from dualnet.dicom_send import parse_node
    from dualnet.errors import InputError

    node = parse_node("PACS@10.0.0.5:104")
    assert (node.ae_title, node.host, node.port) == ("PACS", "10.0.0.5", 104) and str(node) == "PACS@10.0.0.5:104"
    assert parse_node("ORTHANC@[::1]:4242").host == "::1"
    for bad in ("PACS", "PACS@host", "@host:104", "A" * 17 + "@h:104", "P@h:0", "P@h:70000", "P\\X@h:104"):
        with pytest.raises(InputError):
            parse_node(bad)


def test_a_reject_read_as_an_abort_is_still_named_a_refusal():
    """pynetdicom reads a node that rejects and closes at once as aborted (a race seen under load on
    2 cores); the A-ASSOCIATE-RJ PDU the reactor received still names it a refusal, with its reason."""
    from types import SimpleNamespace

    from pynetdicom.pdu import A_ASSOCIATE_RJ

    from dualnet.dicom_send import _note_rejection, _why_no_association

    pdu = A_ASSOCIATE_RJ()
    pdu.decode(bytes([0x03, 0x00, 0, 0, 0, 4, 0x00, 0x01, 0x01, 0x07]))  # permanent, service-user, called AE
    aborted = SimpleNamespace(is_rejected=False, is_aborted=True)
    seen: list = []
    _note_rejection(SimpleNamespace(pdu=pdu), seen)
    assert _why_no_association(aborted, seen).startswith("refused the association (Rejected (Permanent)")
    assert "Called AE title not recognised" in _why_no_association(aborted, seen)
    assert _why_no_association(aborted, []).startswith("no association (node unreachable")

