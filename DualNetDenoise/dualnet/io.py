"""Reading and writing volumes with their geometry (NRRD, NIfTI, MHA, DICOM series, PNG/TIFF).

A :class:`Volume` is a numpy array in (z, y, x) order (or (y, x) for 2D images) plus ITK
geometry: ``spacing`` and ``origin`` in millimetres and ``direction`` as a row-major
direction-cosine matrix, all in ITK (x, y, z) order and LPS space. Files are written
atomically (temporary file in the same folder, then rename) and never over an input path.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import InputError

PathLike = Union[str, os.PathLike]

#: Extensions SimpleITK writes, longest first so ".nii.gz" wins over ".gz".
WRITABLE_EXTENSIONS = (".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd", ".png", ".tif", ".tiff")
_INTEGER_2D_FORMATS = (".png",)


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


def _read_dicom_series(folder: Path):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    ids = reader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise InputError(f"{folder}: folder holds no DICOM series")
    # Take the series with the most files, say so if there were several.
    files = max((reader.GetGDCMSeriesFileNames(str(folder), sid) for sid in ids), key=len)
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    reader.LoadPrivateTagsOn()
    image = reader.Execute()
    for key in ("0008|0060", "0008|0070", "0018|0015"):
        if reader.HasMetaDataKey(0, key):
            image.SetMetaData(key, reader.GetMetaData(0, key).strip())
    return image


def read_volume(
    path: PathLike,
    *,
    frame: Optional[int] = None,
    check_finite: bool = True,
    allow_2d: bool = True,
) -> Volume:
    """Read a scalar 2D or 3D image (file or DICOM folder) keeping its geometry.

    Args:
        path: NRRD, NIfTI, MHA/MHD, PNG/TIFF file, or a folder holding one DICOM series.
        frame: for a 4D file, which volume (0-based) along the 4th axis to take.
        check_finite: reject NaN / Inf voxels.
        allow_2d: accept 2D images (PNG etc.).

    Raises:
        InputError: one line naming the file and what is wrong with it.
    """
    import SimpleITK as sitk

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    try:
        if p.is_dir():
            image = _read_dicom_series(p)
        else:
            if p.stat().st_size == 0:
                raise InputError(f"{p}: file is empty")
            image = sitk.ReadImage(str(p))
    except InputError:
        raise
    except RuntimeError as err:
        zero = _header_zero_size(p)
        if zero:
            raise InputError(f"{p}: image has a zero-size axis ({zero})") from None
        first = str(err).strip().splitlines()
        detail = next((line for line in first if "ERROR" in line or "Exception" in line), "")
        detail = detail.split(":")[-1].strip() if detail else "unreadable or truncated image file"
        raise InputError(f"{p}: cannot read image ({detail or 'unsupported format'})") from None

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


def check_output_path(path: PathLike, inputs: Iterable[PathLike] = (), force: bool = False) -> Path:
    """Validate an output path before long work starts.

    Refuses to write over any of ``inputs`` (unless ``force``), into a missing folder, or to a
    format SimpleITK cannot write.
    """
    out = Path(path)
    for src in inputs:
        if src is not None and same_path(out, src) and not force:
            raise InputError(f"{out}: output path is the input file; choose another name (inputs are never overwritten)")
        if src is not None and Path(src).is_dir() and str(out.resolve()).startswith(str(Path(src).resolve()) + os.sep):
            raise InputError(f"{out}: output would be written inside the input DICOM folder")
    if _ext(out) not in WRITABLE_EXTENSIONS:
        raise InputError(f"{out}: unsupported output format; use one of {', '.join(WRITABLE_EXTENSIONS)}")
    if not out.parent.exists():
        raise InputError(f"{out}: output folder {out.parent} does not exist")
    return out


def write_volume(
    volume: Volume,
    path: PathLike,
    *,
    inputs: Iterable[PathLike] = (),
    force: bool = False,
    dtype: Optional[np.dtype] = None,
    compress: bool = True,
) -> Path:
    """Write ``volume`` atomically to ``path`` (format from the extension).

    Args:
        volume: the image and geometry to write.
        path: output file; its folder must exist.
        inputs: paths that must never be overwritten (the sources of this output).
        force: allow writing over one of ``inputs``.
        dtype: cast the voxels first (integer types are rounded and clipped). PNG output
            is cast to uint8 (or uint16 if values exceed 255) when the array is float.
        compress: ask the writer to compress (NIfTI .gz is compressed by its extension).

    Returns:
        The path written.
    """
    import SimpleITK as sitk

    out = check_output_path(path, inputs, force)
    arr = volume.array
    if dtype is not None:
        arr = cast_like(arr, dtype)
    ext = _ext(out)
    if ext in _INTEGER_2D_FORMATS and not np.issubdtype(arr.dtype, np.integer):
        arr = cast_like(arr, np.uint16 if np.nanmax(arr) > 255 else np.uint8)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    image = volume.with_array(arr).to_sitk()
    with atomic_path(out, suffix=f".tmp{ext}") as tmp:
        sitk.WriteImage(image, str(tmp), compress and ext != ".png")
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, else delete it.

    The suffix lets format-sniffing writers (SimpleITK) see the right extension.
    """
    out = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=suffix, dir=str(out.parent))
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write bytes to ``path`` through a temporary file, fsync and a rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)
