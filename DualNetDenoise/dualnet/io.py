"""Reading and writing volumes with their geometry (NRRD, NIfTI, MHA, DICOM series, PNG/TIFF).

A :class:`Volume` is a numpy array in (z, y, x) order (or (y, x) for 2D images) plus ITK
geometry: ``spacing`` and ``origin`` in millimetres and ``direction`` as a row-major
direction-cosine matrix, all in ITK (x, y, z) order and LPS space. Files are written
atomically (temporary file in the same folder, then rename) and never over an input path.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import os
import re
import socket
import struct
import sys
import tempfile
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import InputError

PathLike = Union[str, os.PathLike]

#: Extensions SimpleITK writes, longest first so ".nii.gz" wins over ".gz".
WRITABLE_EXTENSIONS = (".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd", ".png", ".tif", ".tiff")
#: Formats that hold whole numbers only: a float result is cast to 8 or 16 bits.
INTEGER_FORMATS = (".png",)
#: Formats that hold one 2D picture without origin, direction or slice spacing: refused for 3D volumes.
FLAT_FORMATS = (".png", ".tif", ".tiff")
#: Formats that keep a volume's geometry (offered when a flat format is refused).
VOLUME_FORMATS = (".nrrd", ".nii.gz", ".mha")


@dataclass
class Volume:
    """An image array with its physical geometry.

    Attributes:
        array: voxel values, (z, y, x) for 3D or (y, x) for 2D.
        spacing: voxel size in mm, (x, y, z) order (ITK).
        origin: physical position of voxel (0, 0, 0) in mm, LPS, (x, y, z) order.
        direction: row-major direction-cosine matrix, ``ndim * ndim`` values (ITK).
        metadata: string tags carried along (e.g. DICOM ``0008|0060`` modality).
        path: file it was read from, if any.
    """

    array: np.ndarray
    spacing: Tuple[float, ...] = (1.0, 1.0, 1.0)
    origin: Tuple[float, ...] = (0.0, 0.0, 0.0)
    direction: Tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    metadata: Dict[str, str] = field(default_factory=dict)
    path: Optional[str] = None

    def __post_init__(self) -> None:
        nd = self.array.ndim
        if nd not in (2, 3):
            raise InputError(f"expected a 2D or 3D scalar array, got shape {self.array.shape}")
        if len(self.spacing) != nd:  # default geometry for 2D arrays
            self.spacing = tuple(self.spacing[:nd]) if len(self.spacing) > nd else (1.0,) * nd
        if len(self.origin) != nd:
            self.origin = tuple(self.origin[:nd]) if len(self.origin) > nd else (0.0,) * nd
        if len(self.direction) != nd * nd:
            self.direction = tuple(np.eye(nd).ravel())
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = tuple(float(d) for d in self.direction)

    @property
    def ndim(self) -> int:
        return self.array.ndim

    @property
    def spacing_zyx(self) -> Tuple[float, ...]:
        """Spacing in array axis order ((z, y, x) or (y, x))."""
        return tuple(reversed(self.spacing))

    def with_array(self, array: np.ndarray, spacing: Optional[Sequence[float]] = None) -> "Volume":
        """A new volume with the same geometry (and optionally a new spacing, x-y-z order)."""
        return Volume(
            np.asarray(array),
            tuple(spacing) if spacing is not None else self.spacing,
            self.origin,
            self.direction,
            dict(self.metadata),
            None,
        )

    def same_grid(self, other: "Volume", atol: float = 1e-4) -> bool:
        """True when both volumes share shape, spacing, origin and direction."""
        return (
            self.array.shape == other.array.shape
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol * 10)
            and np.allclose(self.direction, other.direction, atol=atol)
        )

    def to_sitk(self):
        """Convert to a ``SimpleITK.Image`` with the same geometry."""
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(self.array)
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img

    @classmethod
    def from_sitk(cls, image, path: Optional[str] = None) -> "Volume":
        """Wrap a scalar ``SimpleITK.Image`` (array copied, geometry kept)."""
        import SimpleITK as sitk

        meta = {}
        for key in image.GetMetaDataKeys():
            try:
                meta[key] = image.GetMetaData(key)
            except Exception:  # pragma: no cover - exotic tags
                pass
        return cls(
            sitk.GetArrayFromImage(image),
            image.GetSpacing(),
            image.GetOrigin(),
            image.GetDirection(),
            meta,
            path,
        )


def _ext(path: PathLike) -> str:
    name = str(path).lower()
    for ext in WRITABLE_EXTENSIONS + (".dcm", ".gz", ".jpg", ".jpeg", ".bmp"):
        if name.endswith(ext):
            return ext
    return Path(name).suffix


#: Largest distance of a slice from where a regular volume puts it, as a fraction of the slice
#: spacing, before a DICOM folder is refused (gantry tilt, uneven or missing slices).
GRID_TOLERANCE = 0.1


def _read_dicom_series(folder: Path, irregular_ok: bool = False):
    """The one DICOM series in ``folder`` as a SimpleITK image (3D, or 2D for one classic slice).

    Refuses a folder with several series (it lists them), and, unless ``irregular_ok``, slices that
    are not on the regular grid a volume file stores: such a file would misplace them."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    ids = reader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise InputError(f"{folder}: folder holds no DICOM series")
    series = sorted(((sid, reader.GetGDCMSeriesFileNames(str(folder), sid)) for sid in ids), key=lambda t: -len(t[1]))
    if len(series) > 1:
        listed = "; ".join(f"{_series_label(files[0])} ({len(files)} files)" for _, files in series)
        raise InputError(f"{folder}: folder holds {len(series)} DICOM series ({listed}); point to a folder with "
                         "one series, or use `dualnet denoise --dicom`, which writes every series")
    files = series[0][1]
    if len(files) == 1:  # one classic slice, or one enhanced multi-frame object (its frames are the slices)
        image = sitk.ReadImage(files[0])
        if image.GetDimension() == 4 and image.GetSize()[3] == 1:
            size = list(image.GetSize())
            image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
        return image
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    reader.LoadPrivateTagsOn()
    image = reader.Execute()
    if not irregular_ok:
        _check_regular_grid(folder, reader, image, len(files))
    for key in ("0008|0060", "0008|0070", "0018|0015"):
        if reader.HasMetaDataKey(0, key):
            image.SetMetaData(key, reader.GetMetaData(0, key).strip())
    return image


def _series_label(first_file: str) -> str:
    """``modality number "description"`` of a DICOM file, for naming a series in a message."""
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(first_file)
    try:
        r.ReadImageInformation()
    except RuntimeError:
        return Path(first_file).name
    tag = lambda k: r.GetMetaData(k).strip() if r.HasMetaDataKey(k) else ""  # noqa: E731
    return " ".join(x for x in (tag("0008|0060"), tag("0020|0011"), repr(tag("0008|103e")) if tag("0008|103e") else "")
                    if x) or Path(first_file).name


def _check_regular_grid(folder: Path, reader, image, n: int) -> None:
    """Refuse slices whose ImagePositionPatient (0020,0032) lies more than :data:`GRID_TOLERANCE`
    of the slice spacing from ``origin + k * spacing_z * normal`` (a tilted or unevenly spaced series)."""
    if image.GetDimension() != 3:
        return
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing_z = float(image.GetSpacing()[2])
    try:
        ipp = np.array([[float(v) for v in reader.GetMetaData(k, "0020|0032").split("\\")] for k in range(n)])
    except (RuntimeError, ValueError):
        return  # positions unreadable: ITK's own geometry is all there is
    grid = np.asarray(image.GetOrigin(), dtype=float) + np.arange(n)[:, None] * spacing_z * direction[:, 2]
    worst = float(np.max(np.linalg.norm(ipp - grid, axis=1)))
    if worst > max(GRID_TOLERANCE * spacing_z, 1e-3):
        raise InputError(
            f"{folder}: the slices are not on a regular grid (one lies {worst:.1f} mm from where a volume of "
            f"{spacing_z:.3g} mm slices puts it: gantry tilt, uneven or missing slices); a volume file would "
            "misplace them. Use `dualnet denoise --dicom` (each slice keeps its position) or resample the series first")


def read_frames(path: PathLike, centre: int, max_frames: int = 9) -> np.ndarray:
    """Up to ``max_frames`` consecutive volumes of a 4D file around frame ``centre``, as a float32
    (t, z, y, x) array (SimpleITK reads the file once; read it with :func:`read_volume` first,
    which checks it and says what is wrong). For noise estimates from repeats."""
    import SimpleITK as sitk

    try:
        with quiet_itk():
            image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise InputError(f"{path}: cannot read image ({err})") from None
    if image.GetDimension() != 4 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: not a scalar 4D image")
    n = int(image.GetSize()[3])
    lo = max(0, min(int(centre) - max_frames // 2, n - max_frames))
    hi = min(n, lo + max_frames)
    return sitk.GetArrayViewFromImage(image)[lo:hi].astype(np.float32)


def read_volume(
    path: PathLike,
    *,
    frame: Optional[int] = None,
    check_finite: bool = True,
    allow_2d: bool = True,
    irregular_ok: bool = False,
) -> Volume:
    """Read a scalar 2D or 3D image (file or DICOM folder) keeping its geometry.

    Args:
        path: NRRD, NIfTI, MHA/MHD, PNG/TIFF file, or a folder holding one DICOM series (classic
            slices or one enhanced multi-frame file).
        frame: for a 4D file, which volume (0-based) along the 4th axis to take.
        check_finite: reject NaN / Inf voxels.
        allow_2d: accept 2D images (PNG etc.).
        irregular_ok: read a DICOM folder whose slices are off a regular grid (gantry tilt, uneven
            gaps) onto ITK's grid anyway, for uses that write no image (a noise estimate).

    Raises:
        InputError: one line naming the file and what is wrong with it.
    """
    import SimpleITK as sitk

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    log = _Captured()
    try:
        if p.is_dir():
            with quiet_itk() as log:
                image = _read_dicom_series(p, irregular_ok)
        else:
            if p.stat().st_size == 0:
                raise InputError(f"{p}: file is empty")
            if _ext(p) in (".nii", ".nii.gz"):
                check_nifti_data(p, check_finite=check_finite)
            with quiet_itk() as log:
                image = sitk.ReadImage(str(p))
            _check_read_log(p, log.text)
    except InputError:
        raise
    except RuntimeError as err:
        zero = _header_zero_size(p)
        if zero:
            raise InputError(f"{p}: image has a zero-size axis ({zero})") from None
        raise InputError(f"{p}: cannot read image ({_read_failure(str(err), log.text)})") from None
    except OSError as err:
        raise InputError(f"{p}: cannot read ({err.strerror or err})") from None

    if image.GetNumberOfComponentsPerPixel() != 1:
        if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
            # RGB(A) screenshots of grey-scale images: take the luminance.
            image = sitk.VectorIndexSelectionCast(image, 0) if _all_channels_equal(image) else _luminance(image)
        else:
            raise InputError(
                f"{p}: vector image with {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                "a scalar volume is needed"
            )
    dim = image.GetDimension()
    size = image.GetSize()
    if dim == 4:
        if frame is None:
            raise InputError(f"{p}: 4D image of size {size}; choose one volume (frame) along the 4th axis")
        if not 0 <= frame < size[3]:
            raise InputError(f"{p}: frame {frame} out of range 0..{size[3] - 1}")
        image = sitk.Extract(image, size[:3] + (0,), (0, 0, 0, frame))
        dim = 3
    # A one-slice 3D file stays 3D (shape (1, y, x)): squeezing it would drop the through-plane
    # spacing and the oblique direction. 2D formats (PNG, TIFF) are read as 2D by SimpleITK.
    if dim not in (2, 3):
        raise InputError(f"{p}: {dim}D image; a 2D or 3D scalar image is needed")
    if dim == 2 and not allow_2d:
        raise InputError(f"{p}: 2D image; a 3D volume is needed")
    if any(s == 0 for s in image.GetSize()):
        raise InputError(f"{p}: image has a zero-size axis {image.GetSize()}")
    vol = Volume.from_sitk(image, str(p))
    if check_finite and np.issubdtype(vol.array.dtype, np.floating) and not np.isfinite(vol.array).all():
        bad = int((~np.isfinite(vol.array)).sum())
        raise InputError(f"{p}: {bad} voxels are NaN or Inf")
    return vol


class _Captured:
    """Text a C library printed on stderr inside :func:`quiet_itk` (filled when the block ends)."""

    text: str = ""


@contextmanager
def quiet_itk() -> Iterator[_Captured]:
    """Capture what ITK, GDCM and libtiff print on the process's stderr (file descriptor 2).

    Their messages never reach the terminal; callers turn the relevant ones into one-line errors.
    """
    cap = _Captured()
    try:
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):  # pragma: no cover - closed or replaced stderr
        pass
    try:
        saved = os.dup(2)
    except OSError:  # pragma: no cover - no stderr descriptor (some embedded interpreters)
        yield cap
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield cap
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            cap.text = sink.read(1 << 16).decode("utf-8", "replace")


def _read_failure(error: str, log: str) -> str:
    """The cause of a failed read, from SimpleITK's exception and what ITK printed."""
    text = f"{log}\n{error}"
    low = text.lower()
    if "not read completely" in low:  # MetaImage: "ideal = N : actual = M"
        m = re.search(r"ideal\s*=\s*(\d+)\s*:\s*actual\s*=\s*(\d+)", text)
        tail = f" ({m.group(1)} bytes expected, {m.group(2)} found)" if m else ""
        return f"truncated: the voxel data the header promises is not all in the file{tail}"
    for line in text.splitlines():
        if "expected" in line and "received" in line or "fread got only" in line:
            return "truncated: " + line.split(":", 1)[-1].strip().split("[nrrd]")[0].strip(" :")
    lines = error.strip().splitlines()
    detail = next((line for line in lines if "ERROR" in line or "Exception" in line), "")
    detail = detail.split(":")[-1].strip() if detail else "unreadable or truncated image file"
    return detail or "unsupported format"


#: libtiff messages of a file cut short (it then returns the pages it could read, silently).
_TIFF_TRUNCATED = ("Failed to read directory", "Can not read TIFF directory", "Read error on strip",
                   "Read error at scanline")


def _check_read_log(path: Path, log: str) -> None:
    """Turn problems a reader only printed (and read past) into an error: a truncated TIFF."""
    if any(msg in log for msg in _TIFF_TRUNCATED):
        raise InputError(f"{path}: truncated or corrupt TIFF (a directory of the file cannot be read)")


#: deflate never compresses more than ~1032:1; a gzip file promising more data is truncated.
_MAX_DEFLATE_RATIO = 1040
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def _nifti_layout(head: bytes) -> Optional[Tuple[str, Tuple[int, ...], int, int, int]]:
    """``(byte order, dims, datatype, bitpix, data offset)`` of a single-file NIfTI-1/2 header, else None."""
    for order in "<>":
        if len(head) < 4:
            return None
        size = struct.unpack(order + "i", head[:4])[0]
        if size == 348 and len(head) >= 348 and head[344:347] == b"n+1":
            dim = struct.unpack(order + "8h", head[40:56])
            datatype, bitpix = struct.unpack(order + "2h", head[70:74])
            offset = max(int(struct.unpack(order + "f", head[108:112])[0]), 352)
        elif size == 540 and len(head) >= 540 and head[4:7] == b"n+2":
            datatype, bitpix = struct.unpack(order + "2h", head[12:16])
            dim = struct.unpack(order + "8q", head[16:80])
            offset = max(int(struct.unpack(order + "q", head[168:176])[0]), 544)
        else:
            continue
        dims = tuple(int(d) for d in dim[1 : dim[0] + 1]) if 1 <= dim[0] <= 7 else ()
        if not dims or min(dims) <= 0 or bitpix <= 0:
            return None  # the reader reports these
        return order, dims, int(datatype), int(bitpix), offset
    return None


def _human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"  # pragma: no cover


def check_nifti_data(path: PathLike, check_finite: bool = True) -> None:
    """Check a ``.nii`` / ``.nii.gz`` holds all the voxel data its header promises (and, for float
    data with ``check_finite``, no NaN / Inf, which ITK's NIfTI reader silently turns into 0).

    Runs before the image is read, so a header claiming a huge size is refused without allocating.

    Raises:
        InputError: one line naming the file: truncated, implausible size, or non-finite voxels.
    """
    p = Path(path)
    compressed = _ext(p) == ".nii.gz"
    try:
        with (gzip.open(p, "rb") if compressed else open(p, "rb")) as fh:
            head = fh.read(540)
    except (OSError, EOFError, zlib.error):
        return  # not gzip / unreadable: the image reader names the problem
    layout = _nifti_layout(head)
    if layout is None:
        return
    order, dims, datatype, bitpix, offset = layout
    nbytes = -(-int(np.prod(dims, dtype=np.float64)) * bitpix // 8)
    expected = offset + nbytes
    size = p.stat().st_size
    shape = "x".join(str(d) for d in dims)
    if compressed and expected > _MAX_DEFLATE_RATIO * size:
        raise InputError(f"{p}: truncated or corrupt: the header promises {shape} voxels "
                         f"({_human_bytes(nbytes)}) but the compressed file holds {_human_bytes(size)}")
    if not compressed and size < expected:
        raise InputError(f"{p}: truncated: the header promises {shape} voxels ({_human_bytes(expected)} with "
                         f"the header), the file holds {_human_bytes(size)}")
    dtype = np.dtype(order + _NIFTI_FLOATS[datatype]) if check_finite and datatype in _NIFTI_FLOATS else None
    if compressed or dtype is not None:
        found, bad = _scan_nifti(p, compressed, offset, expected, dtype)
        if found < expected:
            raise InputError(f"{p}: truncated: the header promises {shape} voxels ({_human_bytes(expected)} "
                             f"uncompressed), the file holds {_human_bytes(found)}")
        if bad:
            raise InputError(f"{p}: {bad} voxels are NaN or Inf")


def _scan_nifti(path: Path, compressed: bool, offset: int, expected: int,
                dtype: Optional[np.dtype]) -> Tuple[int, int]:
    """Stream a NIfTI file: ``(bytes found up to expected, non-finite voxels when dtype is given)``."""
    found, bad, pending = 0, 0, b""
    try:
        with open(path, "rb") as fh:
            for block in (_gunzip_blocks(fh) if compressed else iter(lambda: fh.read(1 << 22), b"")):
                block = block[: expected - found]
                start = max(0, offset - found)
                found += len(block)
                if dtype is not None and start < len(block):
                    data = pending + block[start:]
                    usable = len(data) - len(data) % dtype.itemsize
                    values = np.frombuffer(data[:usable], dtype=dtype)
                    bad += int(values.size - np.count_nonzero(np.isfinite(values)))
                    pending = data[usable:]
                if found >= expected:
                    break
    except zlib.error as err:
        raise InputError(f"{path}: corrupt compressed data ({err})") from None
    return found, bad


def _gunzip_blocks(fh, chunk: int = 1 << 20, most: int = 1 << 22) -> Iterator[bytes]:
    """Decompressed blocks (at most ``most`` bytes each) of a possibly multi-member gzip stream;
    stops quietly where the file ends, so a truncated stream yields what it holds."""
    d = zlib.decompressobj(31)
    raw = b""
    while True:
        if not raw:
            raw = fh.read(chunk)
            if not raw:
                return
        out = d.decompress(raw, most)
        raw = d.unconsumed_tail
        if out:
            yield out
        if d.eof:
            raw = d.unused_data + raw
            if not raw[:2] == b"\x1f\x8b":
                return  # trailing bytes after the last member
            d = zlib.decompressobj(31)


def _header_zero_size(path: Path) -> str:
    """For text headers (NRRD, MHA/MHD), the size field when one of its entries is 0, else ''."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096).decode("latin-1", "replace")
    except OSError:
        return ""
    for line in head.splitlines():
        key, _, value = line.partition(":") if ":" in line else line.partition("=")
        if key.strip().lower() in ("sizes", "dimsize"):
            numbers = value.split()
            if any(n == "0" for n in numbers):
                return f"{key.strip()} {' '.join(numbers)}"
    return ""


def _all_channels_equal(image) -> bool:
    import SimpleITK as sitk

    arr = sitk.GetArrayViewFromImage(image)
    return bool(np.all(arr[..., :1] == arr[..., : min(3, arr.shape[-1])]))


def _luminance(image):
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    lum = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
    out = sitk.GetImageFromArray(lum)
    out.CopyInformation(sitk.VectorIndexSelectionCast(image, 0))
    return out


def cast_like(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast ``array`` to ``dtype``, rounding and clipping to its range for integer types."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(array), info.min, info.max).astype(dtype)
    return np.asarray(array, dtype=dtype)


def same_path(a: PathLike, b: PathLike) -> bool:
    """True when two paths name the same file or folder (resolving links and case)."""
    pa, pb = Path(a), Path(b)
    try:
        if pa.exists() and pb.exists():
            return os.path.samefile(pa, pb)
    except OSError:
        pass
    return os.path.normcase(str(pa.resolve())) == os.path.normcase(str(pb.resolve()))


def check_output_path(
    path: PathLike,
    inputs: Iterable[PathLike] = (),
    force: bool = False,
    *,
    outputs: Iterable[PathLike] = (),
    ndim: Optional[int] = None,
    formats: Optional[Sequence[str]] = WRITABLE_EXTENSIONS,
) -> Path:
    """The one guard every path the project writes goes through, before the work starts.

    Refuses, with one line naming the path: any of ``inputs`` (unless ``force``) or a path inside
    an input folder; any of ``outputs`` (the other outputs of the same call); an existing folder
    or non-regular file (``/dev/null``, ``/proc/...``); a missing or unwritable folder (probed by
    creating a file there); an extension outside ``formats`` (``None``: any); a flat 2D format
    (PNG, TIFF) for a 3D volume when ``ndim`` is 3. Temporaries of ``path`` left by a killed
    writer are removed.
    """
    out = Path(path)
    if not str(path).strip():
        raise InputError("empty output path")
    for src in inputs:
        if src is None:
            continue
        if same_path(out, src) and not force:
            raise InputError(f"{out}: output path is the input file; choose another name (inputs are never overwritten)")
        if Path(src).is_dir() and _inside(out, Path(src)):
            raise InputError(f"{out}: output would be written inside the input folder {src}")
    for other in outputs:
        if other is not None and same_path(out, other):
            raise InputError(f"{out}: the same path is given for two outputs of this command")
    if out.is_dir():
        raise InputError(f"{out}: is a folder; give a file name")
    if out.exists() and not out.is_file():
        raise InputError(f"{out}: exists and is not a regular file")
    if formats is not None and _ext(out) not in formats:
        raise InputError(f"{out}: unsupported output format; use one of {', '.join(formats)}")
    if ndim is not None:
        check_output_format(out, ndim)
    if not out.parent.is_dir():
        raise InputError(f"{out}: output folder {out.parent} does not exist")
    _probe_writable(out)
    remove_stale_temporaries(out)
    return out


def check_output_format(path: PathLike, ndim: int) -> None:
    """Refuse a flat 2D format (PNG, TIFF) for a 3D volume: it would drop origin, direction and
    slice spacing (and PNG all but one slice)."""
    ext = _ext(path)
    if ndim == 3 and ext in FLAT_FORMATS:
        raise InputError(f"{path}: {ext} holds a 2D picture without origin, direction or slice spacing; "
                         f"write a 3D volume as {', '.join(VOLUME_FORMATS)}")


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _probe_writable(out: Path) -> None:
    """Create and delete a file beside ``out``: a read-only or pseudo file system fails here, before any work."""
    try:
        fd, probe = tempfile.mkstemp(prefix=_temp_prefix(out), suffix=".probe", dir=str(out.parent))
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise InputError(f"{out}: cannot write in {out.parent} ({err.strerror or err})") from None


def write_volume(
    volume: Volume,
    path: PathLike,
    *,
    inputs: Iterable[PathLike] = (),
    force: bool = False,
    dtype: Optional[np.dtype] = None,
    compress: bool = True,
    outputs: Iterable[PathLike] = (),
    check_finite: bool = True,
) -> Path:
    """Write ``volume`` atomically to ``path`` (format from the extension).

    Args:
        volume: the image and geometry to write.
        path: output file; its folder must exist. PNG / TIFF only for 2D images.
        inputs: paths that must never be overwritten (the sources of this output).
        force: allow writing over one of ``inputs``.
        dtype: cast the voxels first (integer types are rounded and clipped). PNG output
            is cast to uint8 (or uint16 if values exceed 255) when the array is float.
        compress: ask the writer to compress (NIfTI .gz is compressed by its extension).
        outputs: the other outputs of the same call (never written over).
        check_finite: refuse float voxels that are NaN or Inf (a failed computation).

    Returns:
        The path written.

    Raises:
        InputError: one line naming ``path`` (see :func:`check_output_path`, or the write failed:
            disk full, folder removed...); nothing is left behind.
    """
    import SimpleITK as sitk

    out = check_output_path(path, inputs, force, outputs=outputs, ndim=volume.ndim)
    arr = volume.array
    if check_finite and np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise InputError(f"{out}: not written: the result has {bad} NaN or Inf voxels")
    if dtype is not None:
        arr = cast_like(arr, dtype)
    ext = _ext(out)
    if ext in INTEGER_FORMATS and not np.issubdtype(arr.dtype, np.integer):
        if arr.size and float(arr.min()) < 0:
            raise InputError(f"{out}: PNG cannot hold negative values (minimum {float(arr.min()):.4g}); "
                             f"write {', '.join(VOLUME_FORMATS)}")
        arr = cast_like(arr, np.uint16 if np.nanmax(arr) > 255 else np.uint8)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    image = volume.with_array(arr).to_sitk()
    if ext in _DETACHED_FORMATS:
        _write_detached(image, out, compress, inputs if not force else ())
        return out
    with atomic_path(out, suffix=f".tmp{ext}") as tmp:
        _sitk_write(image, tmp, out, compress and ext != ".png")
    return out


#: Header formats whose voxels go to a second file named after the header.
_DETACHED_FORMATS = (".nhdr", ".mhd")


def _sitk_write(image, target: Path, out: Path, compress: bool) -> None:
    """``sitk.WriteImage`` with ITK's messages captured and failures as one line naming ``out``."""
    import SimpleITK as sitk

    with quiet_itk() as log:
        try:
            sitk.WriteImage(image, str(target), compress)
        except RuntimeError as err:
            raise InputError(f"{out}: cannot write ({_write_failure(str(err), log.text)})") from None


def _write_detached(image, out: Path, compress: bool, inputs: Iterable[PathLike]) -> None:
    """Write a header + data file pair (``.nhdr``, ``.mhd``) in a temporary folder beside ``out``
    under their final names, then move the data file(s) and last the header into place."""
    import shutil

    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), suffix=".tmpdir", dir=str(out.parent)))
    except OSError as err:
        raise InputError(f"{out}: cannot write in {out.parent} ({err.strerror or err})") from None
    try:
        _sitk_write(image, tmpdir / out.name, out, compress)
        files = sorted(tmpdir.iterdir(), key=lambda f: f.name == out.name)  # the header last
        protected = [Path(src) for src in inputs if src is not None]
        protected += [d for src in protected for d in detached_data_files(src)]
        for f in files:
            target = out.parent / f.name
            if any(same_path(target, src) for src in protected):
                raise InputError(f"{out}: its data file {target.name} would overwrite an input")
        for f in files:
            os.replace(f, out.parent / f.name)
    except OSError as err:
        raise InputError(f"{out}: cannot write ({'disk full' if err.errno == 28 else err.strerror or err})") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def detached_data_files(header: PathLike) -> List[Path]:
    """The data file(s) a detached header (``.nhdr``, ``.mhd``) names, beside it (``[]`` for any
    other file, an unreadable header or a data list / pattern it does not spell out one by one)."""
    h = Path(header)
    if _ext(h) not in _DETACHED_FORMATS or not h.is_file():
        return []
    key = "data file" if _ext(h) == ".nhdr" else "elementdatafile"
    sep = ":" if key == "data file" else "="
    try:
        with open(h, "r", encoding="latin-1") as fh:
            head = fh.read(65536)
    except OSError:
        return []
    for line in head.splitlines():
        name, found, value = line.partition(sep)
        if found and name.strip().lower() in (key, "datafile"):
            value = value.strip()
            if not value or value.split()[0].upper() in ("LIST", "LOCAL") or "%" in value:
                return []
            data = Path(value)
            return [data if data.is_absolute() else h.parent / data]
    return []


def _write_failure(error: str, log: str) -> str:
    text = f"{log}\n{error}".strip()
    low = text.lower()
    if "no space" in low or "disk full" in low:
        return "disk full"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = next((line for line in lines if "ERROR" in line or "rror" in line), lines[-1] if lines else "")
    return detail.split(":")[-1].strip() or "write failed"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Temporaries are named ``.<name>.dualnet-<host>-<pid>-<random><suffix>`` so a later run can
#: tell those of a killed writer (dead pid on this host) from those of a live one.
_TMP_TAG = ".dualnet-"
_STALE_AGE_S = 3600.0


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _temp_prefix(out: Path) -> str:
    return f".{out.name}{_TMP_TAG}{_host_tag()}-{os.getpid()}-"


def _pid_alive(pid: int) -> Optional[bool]:
    """Whether a process runs on this host (None: cannot tell, e.g. on Windows)."""
    if os.name == "nt":
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_stale_temporaries(path: PathLike) -> List[Path]:
    """Delete the temporaries of ``path`` that a killed writer left beside it; returns them.

    A temporary is stale when the process that made it no longer runs on this host, or (other
    host, Windows, files from older versions) when it is over an hour old.
    """
    out = Path(path)
    removed: List[Path] = []
    now, host = time.time(), _host_tag()
    try:
        candidates = glob.glob(os.path.join(glob.escape(str(out.parent)), "." + glob.escape(out.name) + ".*"))
    except OSError:  # pragma: no cover
        return removed
    for name in candidates:
        tmp = Path(name)
        rest = tmp.name[len(out.name) + 1:]
        if ".tmp" not in rest and not rest.endswith(".probe"):
            continue
        stale = False
        if rest.startswith(_TMP_TAG):
            parts = rest[len(_TMP_TAG):].split("-")
            alive = _pid_alive(int(parts[1])) if len(parts) > 2 and parts[0] == host and parts[1].isdigit() else None
            stale = alive is False
        if not stale:
            try:
                stale = now - tmp.stat().st_mtime > _STALE_AGE_S
            except OSError:
                continue
        if stale:
            try:
                if tmp.is_dir() and tmp.name.endswith(".tmpdir"):
                    import shutil

                    shutil.rmtree(tmp)
                else:
                    tmp.unlink()
                removed.append(tmp)
            except OSError:  # pragma: no cover - removed meanwhile or not ours to remove
                pass
    return removed


@contextmanager
def atomic_path(path: PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, else delete it.

    The suffix lets format-sniffing writers (SimpleITK) see the right extension. An ``OSError``
    (disk full, folder gone) becomes an :class:`InputError` naming ``path``.
    """
    out = Path(path)
    remove_stale_temporaries(out)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(out), suffix=suffix, dir=str(out.parent))
    except OSError as err:
        raise InputError(f"{out}: cannot write in {out.parent} ({err.strerror or err})") from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, out)
    except OSError as err:
        _remove_quietly(tmp)
        detail = "disk full" if getattr(err, "errno", None) == 28 else (err.strerror or str(err))
        raise InputError(f"{out}: cannot write ({detail})") from None
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: PathLike) -> None:
    try:
        if os.path.exists(path):
            os.remove(path)
    except OSError:  # pragma: no cover
        pass


def atomic_write_bytes(
    path: PathLike,
    data: bytes,
    *,
    inputs: Iterable[PathLike] = (),
    outputs: Iterable[PathLike] = (),
) -> Path:
    """Write bytes to ``path`` through a temporary file, fsync and a rename, after
    :func:`check_output_path` (never one of ``inputs`` or ``outputs``, any extension)."""
    out = check_output_path(path, inputs, outputs=outputs, formats=None)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return out


def save_figure(fig: object, path: PathLike, *, inputs: Iterable[PathLike] = (), **savefig_kw: object) -> Path:
    """Render a matplotlib figure to PNG (or the extension's format) and write it through
    :func:`atomic_write_bytes` (the output guard, atomic)."""
    import io as _stdio

    buf = _stdio.BytesIO()
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    fig.savefig(buf, format=fmt, **savefig_kw)  # type: ignore[attr-defined]
    return atomic_write_bytes(path, buf.getvalue(), inputs=inputs)
