"""Sending written DICOM files to a DICOM node (PACS) with C-STORE (pynetdicom).

Nothing is ever sent unless asked (``dualnet denoise ... --dicom --send AET@HOST:PORT``). Files
stay on disk whatever happens; the caller reports one status line per instance and exits non-zero
when the node is unreachable, refuses the association, or any instance was not stored.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

from .errors import DualNetError, InputError

PathLike = Union[str, os.PathLike]

#: C-STORE status codes that mean "stored": 0x0000 success and every DICOM Warning status
#: (0001, 0107, 0116, Bxxx: PS3.7 C.4); the named ones with their meaning.
_STORED = {0x0000: "Success", 0x0001: "Warning: requested optional attributes are not supported",
           0x0107: "Warning: attribute list error", 0x0116: "Warning: attribute value out of range",
           0xB000: "Warning: coercion of data elements", 0xB006: "Warning: elements discarded",
           0xB007: "Warning: data set does not match SOP class"}
_FAILURES = {0xA700: "Refused: out of resources", 0xA900: "Error: data set does not match SOP class",
             0xC000: "Error: cannot understand", 0x0122: "Refused: SOP class not supported",
             0x0124: "Refused: not authorised", 0x0211: "Unrecognised operation", 0x0212: "Mistyped argument"}


def stored_message(code: int) -> Optional[str]:
    """The meaning of a C-STORE status that means "stored" (success or a warning), else None."""
    if code in _STORED:
        return _STORED[code]
    if 0xB000 <= code <= 0xBFFF:
        return "Warning"
    return None


class SendError(DualNetError):
    """The node could not be reached or refused the association (files are kept)."""


@dataclass(frozen=True)
class DicomNode:
    """A DICOM application entity to send to: ``AET@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


def parse_node(text: str) -> DicomNode:
    """Parse ``AET@HOST:PORT`` (IPv6 hosts in brackets: ``AET@[::1]:104``).

    Raises:
        InputError: one line saying what is wrong.
    """
    m = re.fullmatch(r"([^@]+)@(\[[^\]]+\]|[^:@\[\]]+):(\d{1,5})", str(text).strip())
    if not m:
        raise InputError(f"--send {text!r}: expected AET@HOST:PORT, e.g. PACS@192.168.1.10:104")
    aet, host, port = m.group(1), m.group(2).strip("[]"), int(m.group(3))
    if not 1 <= len(aet) <= 16 or "\\" in aet or any(ord(c) < 32 for c in aet) or not aet.strip():
        raise InputError(f"--send {text!r}: AE title must be 1-16 characters without backslash or control characters")
    if not 1 <= port <= 65535:
        raise InputError(f"--send {text!r}: port must be 1..65535")
    return DicomNode(aet, host, port)


@dataclass
class StoreStatus:
    """The outcome of one C-STORE."""

    path: Path
    sop_instance_uid: str
    status: Optional[int]
    stored: bool
    message: str

    def line(self) -> str:
        code = "----" if self.status is None else f"0x{self.status:04X}"
        return f"C-STORE {'ok  ' if self.stored else 'FAIL'} {code} {self.sop_instance_uid} {self.path.name}: {self.message}"


@contextmanager
def _quiet_pynetdicom() -> Iterator[None]:
    """pynetdicom logs connection failures as errors; this module reports them itself."""
    logger = logging.getLogger("pynetdicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _note_rejection(event, rejections: list) -> None:
    """pynetdicom handler (reactor thread): keep each A-ASSOCIATE-RJ PDU the node sends.

    pynetdicom can report a refusal as an abort: when the node sends its reject and closes the
    connection before the requesting thread looks, the association reads as aborted, not rejected.
    The PDU itself is the evidence that the node answered and refused.
    """
    from pynetdicom.pdu import A_ASSOCIATE_RJ

    if isinstance(event.pdu, A_ASSOCIATE_RJ):
        rejections.append(event.pdu)


def _why_no_association(assoc, rejections: list) -> str:
    """Why no association was made: a refusal (with the node's own reason) or no answer."""
    if assoc.is_rejected or rejections:
        if rejections:
            pdu = rejections[0]
            return f"refused the association ({pdu.result_str}, {pdu.source_str}: {pdu.reason_str})"
        return "refused the association"
    return "no association (node unreachable, or it aborted the request)"


def _sop_classes(files: Sequence[Path]) -> List[str]:
    """The SOP classes of ``files`` (headers only), each once, in order.

    Raises:
        InputError: a file is not readable DICOM.
    """
    import pydicom

    classes: List[str] = []
    for f in files:
        try:
            sop = str(pydicom.dcmread(str(f), stop_before_pixels=True, specific_tags=["SOPClassUID"]).SOPClassUID)
        except Exception as err:
            raise InputError(f"{f}: cannot read DICOM file to send ({type(err).__name__})") from None
        if sop not in classes:
            classes.append(sop)
    return classes


def _store_one(assoc, f: Path) -> StoreStatus:
    """C-STORE of one file, read just before it is sent (one data set in memory at a time)."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(f))
    except Exception as err:
        return StoreStatus(f, "?", None, False, f"not sent: cannot read the file ({type(err).__name__})")
    uid = str(ds.get("SOPInstanceUID", "?"))
    if not assoc.is_established:
        return StoreStatus(f, uid, None, False, "not sent: association lost")
    try:
        status = assoc.send_c_store(ds)
    except (ValueError, RuntimeError) as err:  # no accepted presentation context
        return StoreStatus(f, uid, None, False, f"not sent: {err}")
    code = int(status.Status) if status is not None and "Status" in status else None
    if code is None:
        return StoreStatus(f, uid, None, False, "no response (timeout or connection lost)")
    message = stored_message(code)
    if message is not None:
        return StoreStatus(f, uid, code, True, message)
    message = _FAILURES.get(code) or ("Refused" if code >> 12 == 0xA else "Error" if code >> 12 == 0xC else "Failure")
    return StoreStatus(f, uid, code, False, message)


def send_files(paths: Sequence[PathLike], node: Union[DicomNode, str], *, calling_ae: str = "DUALNET",
               timeout: float = 30.0) -> List[StoreStatus]:
    """Store ``paths`` on ``node`` in one association; one :class:`StoreStatus` per file, in order.

    A success or warning status counts as stored. Headers are read first (for the SOP classes to
    propose); each file is read whole just before it is sent.

    Raises:
        InputError: a file is not readable DICOM (checked before the association).
        SendError: the node is unreachable, refused or aborted the association (nothing stored
            or status unknown; the files are untouched).
    """
    try:
        from pynetdicom import AE, evt
    except ImportError:  # pragma: no cover - declared dependency
        raise DualNetError("sending needs pynetdicom: pip install pynetdicom") from None
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if isinstance(node, str):
        node = parse_node(node)
    files = [Path(p) for p in paths]
    if not files:
        return []
    contexts = _sop_classes(files)
    ae = AE(ae_title=calling_ae)
    for attr in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
        if hasattr(ae, attr):
            setattr(ae, attr, timeout)
    for sop in contexts:
        ae.add_requested_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    with _quiet_pynetdicom():
        rejections: list = []
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title,
                             evt_handlers=[(evt.EVT_PDU_RECV, _note_rejection, [rejections])])
        if not assoc.is_established:
            raise SendError(f"{node}: {_why_no_association(assoc, rejections)}; {len(files)} files kept on disk")
        try:
            return [_store_one(assoc, f) for f in files]
        finally:
            if assoc.is_established:
                assoc.release()
