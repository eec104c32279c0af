"""DICOM out: denoised results written back as new, derived DICOM series.

Finding the series of a folder (nested folders, a whole exported study), reading each one with
SimpleITK's GDCM reader, denoising it with :func:`dualnet.api.denoise_volume` and writing the
result as a **new derived series** with :mod:`pydicom`:

* one classic single-frame instance per slice (also for an enhanced multi-frame source: CT and
  MR results are written as *CT Image Storage* / *MR Image Storage*, per-frame geometry taken
  from the source's functional groups), Explicit VR Little Endian, uncompressed;
* the source's patient, study and frame of reference kept; new Series and SOP Instance UIDs
  (:func:`pydicom.uid.generate_uid`), a new ``SeriesNumber`` (source + 1000, bumped past any
  number already used in the study), ``SeriesDescription`` ``Denoised (<method>, <model>)``;
* ``ImageType`` ``DERIVED\\SECONDARY`` (the source's values 3+ kept), ``DerivationDescription``
  (method, modality, noise level, model file, model SHA-256, DualNet version),
  ``DerivationCodeSequence`` (DCM 113087 "Smoothing", CID 7203 Image Derivation; DCM 113061
  "Standard Deviation" for the uncertainty series), ``SourceImageSequence`` (per instance: the
  source instance and frame it came from, purpose DCM 121322 "Source image for image processing
  operation"), ``ReferencedSeriesSequence`` (per instance: its source instance) and a
  ``ContributingEquipmentSequence`` item for DualNet (DCM 109102 "Processing Equipment");
  ``InstanceNumber`` in the source's order (the source instance's number where unique);
  ``LossyImageCompression`` ``01`` when the source was lossy compressed (attribute or transfer syntax);
* geometry copied slice by slice from the source instance (or frame) each slice came from:
  ``ImagePositionPatient``, ``ImageOrientationPatient``, ``PixelSpacing``, ``SliceThickness``,
  ``SpacingBetweenSlices``, ``SliceLocation``; gantry-tilted, oblique and unevenly spaced series
  keep their exact per-slice positions. The slice <-> file mapping is GDCM's sorted file order,
  the order in which SimpleITK stacked the volume that was denoised. Images of one series sharing
  slice positions (echoes, b-values, phases) are split into stacks, each its own derived series
  (description ``... echo 2``); a series that cannot be split is refused;
* pixel data in the source's pixel type (16-bit, the source's signedness) with
  ``RescaleSlope`` / ``RescaleIntercept`` chosen so every float result is stored within half a
  rescale step (``rescale="source"``: the source's own step, i.e. 1 HU for CT; ``"max"``: the
  smallest power-of-two step that fits the range). Results with NaN / Inf are refused.

Every file is written atomically (temporary name + ``os.replace``) into an output folder that is
new or empty and neither is, contains nor lies inside an input folder; a failure part-way removes
the files this call wrote. Private tags, overlays, icons, LUTs and other pixel-dependent
attributes of the source are not copied. Pure Python: no Slicer or Qt import.
"""

from __future__ import annotations

import copy
import datetime
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import DualNetError, InputError
from .io import Volume, atomic_write_bytes

PathLike = Union[str, os.PathLike]

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
#: Source SOP classes this module can denoise -> SOP class of the derived (classic) instances.
OUTPUT_SOP_CLASS = {
    CT_IMAGE: CT_IMAGE,
    "1.2.840.10008.5.1.4.1.1.2.1": CT_IMAGE,  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2": CT_IMAGE,  # Legacy Converted Enhanced CT Image Storage
    MR_IMAGE: MR_IMAGE,
    "1.2.840.10008.5.1.4.1.1.4.1": MR_IMAGE,  # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.4": MR_IMAGE,  # Legacy Converted Enhanced MR Image Storage
}
#: Enhanced and legacy converted (multi-frame) SOP classes: a file of these is its own volume.
MULTIFRAME_SOP_CLASSES = frozenset(uid for uid, out in OUTPUT_SOP_CLASS.items() if uid != out)
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
#: Transfer syntaxes whose pixel data may have been lossy compressed -> LossyImageCompressionMethod
#: ("" where the method has no defined term); derived instances then carry LossyImageCompression 01.
LOSSY_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",  # JPEG 2000 (lossy or lossless: not told apart)
    "1.2.840.10008.1.2.4.93": "",  # JPEG 2000 Part 2 Multi-component
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",  # High-Throughput JPEG 2000
    "1.2.840.10008.1.2.4.111": "",  # JPEG XL JPEG Recompression
    "1.2.840.10008.1.2.4.112": "ISO_18181_1",  # JPEG XL
}
#: Slice positions along the normal closer than this (mm) are one position.
POSITION_TOLERANCE_MM = 0.01
#: Attributes that tell apart images sharing slice positions in one series -> name in the stack label.
STACK_KEYS = (("EchoNumbers", "echo"), ("DiffusionBValue", "b-value"),
              ("TemporalPositionIdentifier", "temporal position"), ("AcquisitionNumber", "acquisition"),
              ("TriggerTime", "trigger time"))
#: DICOM Modality (0008,0060) -> dualnet noise model.

# Coded concepts (code value, scheme, meaning).
CODE_SMOOTHING = ("113087", "DCM", "Smoothing")  # CID 7203 Image Derivation
CODE_STANDARD_DEVIATION = ("113061", "DCM", "Standard Deviation")  # CID 7203
CODE_SOURCE_IMAGE = ("121322", "DCM", "Source image for image processing operation")  # CID 7202
CODE_PROCESSING_EQUIPMENT = ("109102", "DCM", "Processing Equipment")  # CID 7005

SERIES_NUMBER_OFFSET = {"denoised": 1000, "uncertainty": 2000}
#: Smallest rescale step written (keeps the DS string short and exact).
MIN_SLOPE = 2.0 ** -12

_HEADER_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "Modality", "SeriesNumber",
    "SeriesDescription", "NumberOfFrames", "Rows", "Columns", "ImageOrientationPatient", "ImagePositionPatient",
    "InstanceNumber", *(keyword for keyword, _ in STACK_KEYS),
]

# Attributes never copied from a source instance: pixel-dependent, signatures, acquisition
# workflow items that do not describe a derived series, enhanced-only (multi-frame) attributes.
_DROP_KEYWORDS = {
    # pixel description and pixel-value dependent
    "PixelData", "FloatPixelData", "DoubleFloatPixelData", "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
    "SmallestImagePixelValue", "LargestImagePixelValue", "SmallestPixelValueInSeries", "LargestPixelValueInSeries",
    "SmallestImagePixelValueInPlane", "LargestImagePixelValueInPlane", "PixelPaddingValue", "PixelPaddingRangeLimit",
    "RedPaletteColorLookupTableDescriptor", "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor", "RedPaletteColorLookupTableData", "GreenPaletteColorLookupTableData",
    "BluePaletteColorLookupTableData", "PaletteColorLookupTableUID", "ICCProfile", "ColorSpace", "IconImageSequence",
    "ModalityLUTSequence", "VOILUTSequence", "RealWorldValueMappingSequence", "PixelIntensityRelationship",
    "PixelIntensityRelationshipSign", "PlanarConfiguration", "NumberOfFrames", "FrameIncrementPointer",
    "PixelDataProviderURL", "DataSetTrailingPadding", "RescaleSlope", "RescaleIntercept", "RescaleType",
    "BitsStored", "HighBit", "BitsAllocated", "PixelRepresentation", "SamplesPerPixel", "Rows", "Columns",
    # integrity and history of the source instance, not of this one
    "DigitalSignaturesSequence", "MACParametersSequence", "EncryptedAttributesSequence", "OriginalAttributesSequence",
    "InstanceCreatorUID", "SourceImageSequence", "DerivationCodeSequence", "DerivationDescription",
    "ReferencedSeriesSequence", "StudiesContainingOtherReferencedInstancesSequence",
    # acquisition workflow (the derived series was not produced by that procedure step)
    "ReferencedPerformedProcedureStepSequence", "PerformedProcedureStepID", "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime", "PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime",
    "PerformedProcedureStepDescription", "PerformedProtocolCodeSequence",
    # enhanced multi-frame only (functional groups are flattened into classic attributes)
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "DimensionOrganizationSequence",
    "DimensionIndexSequence", "DimensionOrganizationType", "ReferencedImageEvidenceSequence",
    "SourceImageEvidenceSequence", "PixelPresentation", "VolumetricProperties", "VolumeBasedCalculationTechnique",
    "ComplexImageComponent", "AcquisitionContrast", "ContentQualification", "PulseSequenceName",
    "EchoPulseSequence", "MultipleSpinEcho", "MultiPlanarExcitation", "PhaseContrast", "TimeOfFlightContrast",
    "SteadyStatePulseSequence", "EchoPlanarPulseSequence", "SaturationRecovery", "SpectrallySelectedSuppression",
    "OversamplingPhase", "GeometryOfKSpaceTraversal", "SegmentedKSpaceTraversal",
    "RectilinearPhaseEncodeReordering", "KSpaceFiltering", "NumberOfKSpaceTrajectories", "CoverageOfKSpace",
    "ResonantNucleus", "ApplicableSafetyStandardAgency", "ApplicableSafetyStandardDescription",
    "AcquisitionDuration", "B1rms", "PresentationLUTShape", "ConcatenationUID", "ConcatenationFrameOffsetNumber",
    "InConcatenationNumber", "InConcatenationTotalNumber", "RepresentativeFrameNumber", "AcquisitionContextSequence",
    "IsocenterPosition", "StackID", "InStackPositionNumber", "IssueDateOfImagingServiceRequest",
}

# Functional-group attributes flattened into a classic instance: keyword in the macro -> classic keyword.
_FG_COPY = {k: k for k in (
    "PixelSpacing", "SliceThickness", "SpacingBetweenSlices", "ImagePositionPatient", "ImageOrientationPatient",
    "WindowCenter", "WindowWidth", "WindowCenterWidthExplanation", "VOILUTFunction",
    "RepetitionTime", "EchoTrainLength", "FlipAngle", "NumberOfAverages", "PixelBandwidth",
    "ReceiveCoilName", "TransmitCoilName", "PercentSampling", "PercentPhaseFieldOfView",
    "InPlanePhaseEncodingDirection", "KVP", "ConvolutionKernel", "ReconstructionDiameter",
    "DataCollectionDiameter", "GantryDetectorTilt", "TableHeight", "RotationDirection", "ExposureTime",
    "XRayTubeCurrent", "Exposure", "FilterType", "FocalSpots", "GeneratorPower", "SingleCollimationWidth",
    "TotalCollimationWidth", "SpiralPitchFactor", "ReferencedImageSequence",
)}
_FG_COPY.update({"EffectiveEchoTime": "EchoTime", "TransmitterFrequency": "ImagingFrequency"})
# Functional-group attributes read (not copied) to describe the source.
_FG_READ = ("RescaleSlope", "RescaleIntercept", "InversionTimes", "InversionRecovery", "Spoiling", "T2Preparation",
            "MagnetizationTransfer", "FlowCompensation", "PartialFourier", "PartialFourierDirection",
            "FrameAcquisitionDateTime")


# ----------------------------------------------------------------------------- data classes
@dataclass
class DicomSeries:
    """One source image volume: a classic series (one file per slice) or one multi-frame file.

    Attributes:
        files: the file of each slice in slice (z) order: GDCM's sorted file names, i.e. the order
            in which SimpleITK stacks the volume. A multi-frame file repeats once per frame.
        frames: 0-based frame index of each slice in a multi-frame file; None for classic files.
        sop_class_uid: SOP class of the source instances.
        modality: the DICOM Modality (0008,0060) value, e.g. ``"CT"``.
        stack: which of several stacks of one series this is (e.g. ``"echo 2"``); "" when the
            series is one stack.
        refused: why the series cannot be denoised as one volume (e.g. images repeating slice
            positions); "" when it can. :func:`read_series` raises it.
    """

    series_uid: str
    study_uid: str
    files: List[Path]
    frames: List[Optional[int]]
    sop_class_uid: str
    modality: str
    series_number: Optional[int] = None
    description: str = ""
    folder: Optional[Path] = None
    stack: str = ""
    refused: str = ""

    @property
    def n_slices(self) -> int:
        return len(self.files)

    @property
    def multiframe(self) -> bool:
        return bool(self.frames) and self.frames[0] is not None

    def label(self) -> str:
        number = "?" if self.series_number is None else str(self.series_number)
        desc = f" '{self.description}'" if self.description else ""
        desc += f" {self.stack}" if self.stack else ""
        kind = "multi-frame file" if self.multiframe else "files"
        n_files = 1 if self.multiframe else len(self.files)
        return f"series {number}{desc} ({self.modality}, {self.n_slices} slices, {n_files} {kind})"


@dataclass
class SkippedObject:
    """A file or series that was not denoised, with the reason (one line)."""

    path: Path
    reason: str
    count: int = 1
    dicom: bool = True

    def line(self) -> str:
        what = f"{self.count} files in {self.path}" if self.count > 1 else str(self.path)
        return f"skipped {what}: {self.reason}"


@dataclass
class Provenance:
    """What produced a derived series; written into DerivationDescription and the equipment item."""

    method: str
    modality: str
    version: str = ""
    model: Optional[str] = None
    model_sha256: Optional[str] = None
    model_version: Optional[str] = None
    sigma: Optional[float] = None
    sigma_estimated: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)

    def model_label(self) -> str:
        if not self.model:
            return ""
        name = Path(self.model).name
        return f"{name} v{self.model_version}" if self.model_version else name

    def description(self, kind: str = "denoised") -> str:
        from . import __version__

        what = "Monte Carlo dropout standard deviation of a denoising" if kind == "uncertainty" else "Denoised"
        parts = [f"{what} by DualNet {self.version or __version__}", f"method {self.method}",
                 f"noise model {self.modality}"]
        if self.sigma is not None:
            parts.append(f"sigma {self.sigma:.6g}{' (estimated)' if self.sigma_estimated else ''}")
        if self.model:
            parts.append(f"model {self.model_label()}")
        if self.model_sha256:
            parts.append(f"model sha256 {self.model_sha256}")
        for key, value in self.extra.items():
            parts.append(f"{key} {value}")
        return "; ".join(parts)[:1024]

    def series_description(self, kind: str = "denoised") -> str:
        inside = ", ".join(p for p in (self.method, Path(self.model).stem if self.model else "") if p)
        head = "Uncertainty" if kind == "uncertainty" else "Denoised"
        return f"{head} ({inside})"[:64]


def provenance_from_info(info: Mapping[str, Any], method: str, modality: str) -> Provenance:
    """Provenance of a :func:`dualnet.api.denoise_volume` run from its ``info`` dict.

    For a network method the model's SHA-256 is taken from its model card (the hash checked on
    every load, see :mod:`dualnet.modelfile`).
    """
    from . import __version__

    prov = Provenance(method=str(method), modality=str(modality), version=__version__)
    model = info.get("model")
    if model:
        prov.model = str(model)
        prov.model_version = info.get("model_version")
        try:
            from .modelfile import read_card

            prov.model_sha256 = read_card(model).get("sha256")
        except DualNetError:
            prov.model_sha256 = None
    if info.get("sigma") is not None:
        prov.sigma = float(info["sigma"])
        prov.sigma_estimated = bool(info.get("sigma_estimated"))
    if int(info.get("inference_tta") or 1) > 1:  # the network's run, as api.denoise_volume reports it
        prov.extra["tta"] = f"x{int(info['inference_tta'])}"
    if int(info.get("inference_views") or 1) > 1:
        prov.extra["views"] = "z, y and x averaged"
    return prov


@dataclass
class DerivedSeries:
    """A written derived series."""

    folder: Path
    files: List[Path]
    series_uid: str
    sop_instance_uids: List[str]
    series_number: int
    description: str
    rescale_slope: float
    rescale_intercept: float
    kind: str = "denoised"


@dataclass
class SeriesOutcome:
    """Result of one source series in :func:`denoise_dicom_folder`."""

    source: DicomSeries
    status: str  # "ok" | "failed"
    derived: Optional[DerivedSeries] = None
    uncertainty: Optional[DerivedSeries] = None
    modality: str = ""
    info: Dict[str, Any] = field(default_factory=dict)
    error: str = ""
    seconds: float = 0.0
    #: name of the Python package whose import failed (every further series would fail the same way)
    missing_package: str = ""

    def line(self) -> str:
        if self.status != "ok" or self.derived is None:
            return f"FAILED {self.source.label()}: {self.error}"
        d = self.derived
        text = (f"{self.source.label()} -> {d.folder} (series {d.series_number} '{d.description}', "
                f"{len(d.files)} instances, {self.modality}, {self.seconds:.1f} s)")
        if self.uncertainty is not None:
            text += f"; uncertainty -> {self.uncertainty.folder} (series {self.uncertainty.series_number})"
        return text


@dataclass
class DicomRunReport:
    """Everything :func:`denoise_dicom_folder` did: one outcome per image series, the skipped objects."""

    outcomes: List[SeriesOutcome] = field(default_factory=list)
    skipped: List[SkippedObject] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.outcomes) and all(o.status == "ok" for o in self.outcomes)

    @property
    def written_files(self) -> List[Path]:
        files: List[Path] = []
        for o in self.outcomes:
            for d in (o.derived, o.uncertainty):
                if d is not None:
                    files.extend(d.files)
        return files

    def summary_lines(self, failed: bool = True) -> List[str]:
        """One line per series (``failed=False``: successful ones only), then the skipped objects."""
        lines = [o.line() for o in self.outcomes if failed or o.status == "ok"]
        lines += [s.line() for s in self.skipped if s.dicom]
        other = sum(s.count for s in self.skipped if not s.dicom)
        if other:
            lines.append(f"ignored {other} non-DICOM file{'s' if other != 1 else ''}")
        return lines

    def to_json(self) -> Dict[str, Any]:
        def derived(d: Optional[DerivedSeries]):
            if d is None:
                return None
            return {"folder": str(d.folder), "series_instance_uid": d.series_uid, "series_number": d.series_number,
                    "series_description": d.description, "instances": len(d.files),
                    "rescale_slope": d.rescale_slope, "rescale_intercept": d.rescale_intercept}

        return {
            "series": [{"source_series_instance_uid": o.source.series_uid, "source": o.source.label(),
                        "status": o.status, "error": o.error, "modality": o.modality, "seconds": o.seconds,
                        "derived": derived(o.derived), "uncertainty": derived(o.uncertainty),
                        "info": o.info} for o in self.outcomes],
            "skipped": [{"path": str(s.path), "reason": s.reason, "count": s.count} for s in self.skipped],
        }


# ----------------------------------------------------------------------------- helpers
def _pydicom():
    try:
        import pydicom
    except ImportError:  # pragma: no cover - dependency declared in pyproject
        raise DualNetError("DICOM output needs pydicom: pip install pydicom") from None
    return pydicom


def _pydicom_major() -> int:
    return int(_pydicom().__version__.split(".")[0])


def _real(path: PathLike) -> str:
    return os.path.normcase(os.path.realpath(os.fspath(path)))


def _inside(child: str, parent: str) -> bool:
    """True when ``child`` is ``parent`` or lies below it (both real, normalised paths)."""
    try:
        return os.path.commonpath([child, parent]) == parent
    except ValueError:  # different drives
        return False


def path_inside(path: PathLike, folder: PathLike) -> bool:
    """True when ``path`` is ``folder`` or lies below it (links resolved)."""
    return _inside(_real(path), _real(folder))


def _int_or_none(value) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _normal(iop: Sequence[float]) -> np.ndarray:
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:6], float)
    n = np.cross(row, col)
    norm = np.linalg.norm(n)
    return n / norm if norm > 0 else np.array([0.0, 0.0, 1.0])


def format_ds(value: float) -> str:
    """A DICOM Decimal String (at most 16 characters) for ``value``; ``float()`` of it is the value used."""
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    text = repr(float(value))
    if len(text) <= 16:
        return text
    for digits in range(15, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    raise InputError(f"cannot write {value!r} as a DICOM decimal string")  # pragma: no cover


# ----------------------------------------------------------------------------- discovery
def _read_header(path: Path):
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except Exception:  # not DICOM (InvalidDicomError) or unreadable: not ours to report in detail
        return None


def _sop_class(ds) -> str:
    uid = ds.get("SOPClassUID")
    if not uid and getattr(ds, "file_meta", None) is not None:
        uid = ds.file_meta.get("MediaStorageSOPClassUID")
    return str(uid or "")


def _sop_class_name(uid: str) -> str:
    try:
        from pydicom.uid import UID

        name = UID(uid).name
        return name if name and name != uid else f"SOP class {uid}"
    except Exception:  # pragma: no cover
        return f"SOP class {uid}"


def _gdcm_sorted(folder: Path, series_uid: str, files: Sequence[Path]) -> Optional[List[Path]]:
    """GDCM's sorted file names for ``series_uid`` in ``folder``, if they are exactly ``files``."""
    import SimpleITK as sitk

    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid)
    except RuntimeError:
        return None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)
    got = [Path(n) for n in names]
    if sorted(_real(p) for p in got) != sorted(_real(p) for p in files):
        return None
    return got


def _sort_along_normal(headers: Sequence[Tuple[Path, Any]]) -> List[Path]:
    """Sort classic slices by position along the slice normal (GDCM's criterion), then instance order."""
    iop = headers[0][1].get("ImageOrientationPatient")
    n = _normal([float(v) for v in iop]) if iop else np.array([0.0, 0.0, 1.0])

    def key(item):
        ipp = item[1].get("ImagePositionPatient")
        pos = float(np.dot(n, [float(v) for v in ipp])) if ipp else 0.0
        return (pos, str(item[0]))

    return [p for p, _ in sorted(headers, key=key)]


def find_dicom_series(path: PathLike, recursive: bool = True) -> Tuple[List[DicomSeries], List[SkippedObject]]:
    """Every CT / MR image volume under ``path`` (a folder, nested folders, or one file).

    Files are grouped by Series Instance UID (a file repeating a SOP Instance UID is skipped); a
    classic series whose slices have different sizes or orientations is split into one volume per
    (rows, columns, orientation), and images sharing slice positions into one stack per echo,
    b-value, temporal position, acquisition or trigger time (:func:`_split_stacks`; a series no
    such key separates is returned ``refused``). An enhanced / legacy converted file, or one with
    more than one frame, is its own volume (refused when its frames repeat a position). Slices are
    in GDCM's sorted order when the series lies in one folder (the order SimpleITK stacks them),
    else sorted along the slice normal. Non-image objects (SR, RT, presentation states,
    segmentations...) and images of other SOP classes are returned as :class:`SkippedObject`, one
    per series; non-DICOM files as one non-DICOM entry per folder.
    """
    root = Path(path)
    if not root.exists():
        raise InputError(f"{root}: no such file or folder")
    if root.is_file():
        candidates = [root]
    else:
        walker = os.walk(root) if recursive else [(str(root), [], [p.name for p in root.iterdir() if p.is_file()])]
        candidates = []
        for dirpath, dirnames, filenames in walker:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            candidates += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    skipped: List[SkippedObject] = []
    non_dicom: Dict[Path, int] = {}
    groups: Dict[str, List[Tuple[Path, Any]]] = {}
    others: Dict[Tuple[str, str], List[Path]] = {}
    for f in candidates:
        ds = _read_header(f)
        if ds is None:
            non_dicom[f.parent] = non_dicom.get(f.parent, 0) + 1
            continue
        sop = _sop_class(ds)
        if sop == MEDIA_DIRECTORY or f.name.upper() == "DICOMDIR":
            skipped.append(SkippedObject(f, "DICOMDIR (media directory, not an image)"))
            continue
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        if sop not in OUTPUT_SOP_CLASS:
            others.setdefault((series_uid, sop), []).append(f)
            continue
        if not series_uid:
            skipped.append(SkippedObject(f, "no Series Instance UID"))
            continue
        groups.setdefault(series_uid, []).append((f, ds))
    for (uid, sop), files in others.items():
        modality = ""
        ds = _read_header(files[0])
        if ds is not None:
            modality = str(ds.get("Modality", "") or "")
        where = files[0] if len(files) == 1 else files[0].parent
        skipped.append(SkippedObject(where, f"{_sop_class_name(sop)}{' (' + modality + ')' if modality else ''} "
                                            "is not a CT or MR image; not denoised", count=len(files)))
    for folder, count in non_dicom.items():
        skipped.append(SkippedObject(folder, "not DICOM", count=count, dicom=False))

    series: List[DicomSeries] = []
    for uid, items in groups.items():
        series += _volumes_of_series(uid, items, skipped)
    series.sort(key=lambda s: (s.study_uid, s.series_number if s.series_number is not None else 1 << 30,
                               s.series_uid))  # stable: a series' volumes stay in _volumes_of_series order
    return series, skipped


def _volumes_of_series(uid: str, items: List[Tuple[Path, Any]], skipped: List[SkippedObject]) -> List[DicomSeries]:
    """The image volumes of one series: each multi-frame file, then each classic stack."""
    items = _drop_duplicates(items, skipped)
    first = items[0][1]
    common = dict(series_uid=uid, study_uid=str(first.get("StudyInstanceUID", "") or ""),
                  sop_class_uid=_sop_class(first), modality=str(first.get("Modality", "") or ""),
                  series_number=_int_or_none(first.get("SeriesNumber")),
                  description=str(first.get("SeriesDescription", "") or ""))
    volumes: List[DicomSeries] = []
    classic: Dict[tuple, List[Tuple[Path, Any]]] = {}
    for f, ds in items:
        if _is_multiframe(ds):
            volumes.append(_multiframe_volume(f, ds, common))
            continue
        iop = ds.get("ImageOrientationPatient")
        iop_key = tuple(round(float(v), 4) for v in iop) if iop else None
        classic.setdefault((ds.get("Rows"), ds.get("Columns"), iop_key), []).append((f, ds))
    for members in classic.values():
        stacks, refused = _split_stacks(members)
        for stack, part in stacks:
            files = [f for f, _ in part]
            folders = {f.parent for f in files}
            ordered = None
            if len(classic) == 1 and len(stacks) == 1 and len(folders) == 1:
                ordered = _gdcm_sorted(next(iter(folders)), uid, files)
            if ordered is None:
                ordered = _sort_along_normal(part)
            folder = Path(os.path.commonpath([str(f.parent) for f in ordered]))
            volumes.append(DicomSeries(files=ordered, frames=[None] * len(ordered), folder=folder, stack=stack,
                                       refused=refused, **common))
    return volumes


def _drop_duplicates(items: List[Tuple[Path, Any]], skipped: List[SkippedObject]) -> List[Tuple[Path, Any]]:
    """``items`` without files repeating an earlier file's SOP Instance UID (one skipped entry for them)."""
    seen: Dict[str, Path] = {}
    kept, repeats = [], []
    for f, ds in items:
        uid = str(ds.get("SOPInstanceUID", "") or "")
        if uid and uid in seen:
            repeats.append((f, seen[uid]))
            continue
        if uid:
            seen[uid] = f
        kept.append((f, ds))
    if repeats:
        where = repeats[0][0] if len(repeats) == 1 else Path(os.path.commonpath([str(f.parent) for f, _ in repeats]))
        skipped.append(SkippedObject(where, f"same SOP Instance UID as a file already read (e.g. {repeats[0][1]}); "
                                            "duplicate not read twice", count=len(repeats)))
    return kept


def _is_multiframe(ds) -> bool:
    """An enhanced / legacy converted instance, or any file with more than one frame."""
    return _sop_class(ds) in MULTIFRAME_SOP_CLASSES or (_int_or_none(ds.get("NumberOfFrames")) or 1) > 1


def _multiframe_volume(f: Path, ds, common: Mapping[str, Any]) -> DicomSeries:
    """One multi-frame file as a volume, refused when its frames repeat a slice position."""
    frames = _int_or_none(ds.get("NumberOfFrames")) or 1
    series = DicomSeries(files=[f] * frames, frames=list(range(frames)), folder=f.parent, **common)
    try:
        positions = slice_positions(series)
    except (InputError, ValueError, TypeError, IndexError):  # no usable per-frame geometry: reading or writing reports it
        return series
    ids = _position_ids(positions)
    repeats = max(Counter(ids).values())
    if repeats > 1 and len(set(ids)) > 1:  # (all frames at one position: a 2D+t series, one stack as before)
        series.refused = (f"multi-frame file {f.name}: its {frames} frames repeat slice positions (up to {repeats} "
                          "at one position: echoes, b-values or time points in one file); one 3D stack per file "
                          "is supported")
    return series


def _positions(members: Sequence[Tuple[Path, Any]]) -> Optional[np.ndarray]:
    """Position of each classic slice along the normal of the first one (None if any lacks geometry)."""
    iop = members[0][1].get("ImageOrientationPatient")
    ipps = [ds.get("ImagePositionPatient") for _, ds in members]
    if not iop or any(not ipp or len(ipp) != 3 for ipp in ipps):
        return None
    try:
        return np.asarray([[float(v) for v in ipp] for ipp in ipps], dtype=np.float64) @ _normal([float(v) for v in iop])
    except (ValueError, TypeError, IndexError):  # malformed geometry: as none (reading the series reports it)
        return None


def _position_ids(positions: np.ndarray) -> List[int]:
    """Index of each slice's position, positions within POSITION_TOLERANCE_MM of a neighbour being one."""
    order = np.argsort(positions, kind="stable")
    ids = [0] * len(positions)
    current = 0
    for rank in range(1, len(order)):
        if positions[order[rank]] - positions[order[rank - 1]] > POSITION_TOLERANCE_MM:
            current += 1
        ids[order[rank]] = current
    return ids


def _stack_value(ds, keyword: str) -> Optional[str]:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    values = [value] if isinstance(value, (str, bytes, int, float)) or not hasattr(value, "__iter__") else list(value)
    texts = []
    for v in values:
        try:
            texts.append(repr(float(v)).removesuffix(".0"))  # every digit: 1234567 and 1234568 stay apart
        except (TypeError, ValueError):
            texts.append(str(v).strip())
    return "\\".join(texts)


def _value_order(value: Optional[str]) -> tuple:
    try:
        return (0, float(value.split("\\")[0]), value) if value is not None else (2, 0.0, "")
    except ValueError:
        return (1, 0.0, value)


def _split_stacks(members: List[Tuple[Path, Any]]) -> Tuple[List[Tuple[str, List[Tuple[Path, Any]]]], str]:
    """``([(stack label, members)], refusal)`` of one classic volume.

    Images sharing a slice position are split by the first of :data:`STACK_KEYS` whose groups
    each hold unique positions and are as many as the images at one position, or all of two
    slices or more (never one stack per slice); with no such key the whole is one refused stack.
    """
    positions = _positions(members)
    if positions is None:
        return [("", members)], ""
    ids = _position_ids(positions)
    repeats = max(Counter(ids).values())
    if repeats == 1 or len(set(ids)) == 1:  # one image per position, or all at one (2D+t): one stack as before
        return [("", members)], ""
    for keyword, name in STACK_KEYS:
        groups: Dict[Optional[str], List[int]] = {}
        for k, (_, ds) in enumerate(members):
            groups.setdefault(_stack_value(ds, keyword), []).append(k)
        unique = all(len({ids[k] for k in g}) == len(g) for g in groups.values())
        stacks_like = len(groups) == repeats or all(len(g) > 1 for g in groups.values())
        if len(groups) > 1 and unique and stacks_like:
            return [(f"{name} {value if value is not None else 'none'}", [members[k] for k in groups[value]])
                    for value in sorted(groups, key=_value_order)], ""
    keys = ", ".join(k for k, _ in STACK_KEYS)
    reason = (f"{len(members)} images share {len(set(ids))} slice positions (up to {repeats} at one position: "
              f"several echoes, b-values, phases or copies in one series) and none of {keys} separates them "
              "into stacks; not denoised")
    return [("", members)], reason


def series_from_files(files: Sequence[PathLike]) -> DicomSeries:
    """The one image volume made of exactly ``files`` (e.g. the instances Slicer loaded a node from).

    Raises:
        InputError: the files are not one CT / MR volume (several series, orientations, sizes or
            stacks), or not one that can be denoised (see ``DicomSeries.refused``).
    """
    paths = [Path(f) for f in files]
    if not paths:
        raise InputError("no DICOM files given")
    items = []
    for f in paths:
        ds = _read_header(f)
        if ds is None:
            raise InputError(f"{f}: not a readable DICOM file")
        if _sop_class(ds) not in OUTPUT_SOP_CLASS:
            raise InputError(f"{f}: {_sop_class_name(_sop_class(ds))} is not a CT or MR image")
        items.append((f, ds))
    uids = {str(ds.get("SeriesInstanceUID", "")) for _, ds in items}
    if len(uids) != 1:
        raise InputError(f"{paths[0].parent}: the files belong to {len(uids)} series; one is needed")
    skipped: List[SkippedObject] = []
    volumes = _volumes_of_series(uids.pop(), items, skipped)
    if len(volumes) != 1:
        raise InputError(f"{paths[0].parent}: the files make {len(volumes)} volumes (different sizes, orientations, "
                         "echoes, b-values or time points, or several multi-frame files); one is needed")
    if volumes[0].refused:
        raise InputError(f"{paths[0].parent}: {volumes[0].refused}")
    return volumes[0]


def slice_positions(series: DicomSeries) -> np.ndarray:
    """Position of each slice along the slice normal (mm, LPS), from ImagePositionPatient of its
    instance or frame; the normal is that of the first slice's ImageOrientationPatient."""
    pydicom = _pydicom()
    cache: Dict[str, Any] = {}
    ipps, iop = [], None
    for f, frame in zip(series.files, series.frames):
        key = _real(f)
        if key not in cache:
            cache[key] = pydicom.dcmread(str(f), stop_before_pixels=True)
        src = cache[key]
        if frame is None:
            ipp, o = src.get("ImagePositionPatient"), src.get("ImageOrientationPatient")
        else:
            fv = _frame_values(src, frame)
            ipp = fv["ImagePositionPatient"].value if "ImagePositionPatient" in fv else None
            o = fv["ImageOrientationPatient"].value if "ImageOrientationPatient" in fv else None
        if ipp is None or o is None:
            raise InputError(f"{f}: slice without ImagePositionPatient / ImageOrientationPatient")
        iop = iop if iop is not None else [float(v) for v in o]
        ipps.append([float(v) for v in ipp])
    return np.asarray(ipps, dtype=np.float64) @ _normal(iop)


def reorder_to_series(volume: Volume, series: DicomSeries) -> Volume:
    """``volume`` (a result on the source's grid, slices possibly stacked in another order, e.g.
    by Slicer) with its slices reordered to ``series`` order, matching slices by rank of their
    position along the slice normal (robust to gantry tilt and uneven gaps, where a regular grid
    does not reproduce the exact slice positions).

    Raises:
        InputError: different slice count or slice size, or in-plane axes that differ from the source.
    """
    arr = np.asarray(volume.array)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.shape[0] != series.n_slices:
        raise InputError(f"volume has {arr.shape[0]} slices, the DICOM series {series.n_slices}")
    d = np.asarray(volume.direction, dtype=np.float64).reshape(3, 3)
    src_pos = slice_positions(series)
    normal = _normal(_first_iop(series))
    if not (np.allclose(d[:, 0], _first_iop(series)[:3], atol=1e-3) and np.allclose(d[:, 1], _first_iop(series)[3:], atol=1e-3)):
        raise InputError("volume's in-plane axes differ from the DICOM series' ImageOrientationPatient")
    origin = np.asarray(volume.origin, dtype=np.float64)
    vol_pos = np.array([float(np.dot(origin + k * volume.spacing[2] * d[:, 2], normal)) for k in range(arr.shape[0])])
    order_src = np.argsort(src_pos, kind="stable")
    order_vol = np.argsort(vol_pos, kind="stable")
    out = np.empty_like(arr)
    out[order_src] = arr[order_vol]
    return Volume(out, volume.spacing, volume.origin, volume.direction, dict(volume.metadata), volume.path)


def _first_iop(series: DicomSeries) -> List[float]:
    pydicom = _pydicom()
    src = pydicom.dcmread(str(series.files[0]), stop_before_pixels=True)
    if series.frames[0] is not None:
        fv = _frame_values(src, series.frames[0])
        if "ImageOrientationPatient" in fv:
            return [float(v) for v in fv["ImageOrientationPatient"].value]
    return [float(v) for v in src.ImageOrientationPatient]


# ----------------------------------------------------------------------------- reading
def read_series(series: DicomSeries) -> Volume:
    """The series as a :class:`Volume`, read by SimpleITK's GDCM reader in ``series.files`` order.

    The array is (z, y, x) with slice ``k`` from ``series.files[k]`` (frame ``series.frames[k]``);
    geometry (spacing, origin, direction) is ITK's, as ``dualnet.io.read_volume`` reads a folder.
    ITK's own warnings (e.g. non-uniform slice spacing of a gantry-tilted CT) are not printed.

    Raises:
        InputError: a ``refused`` series (with its reason), or one SimpleITK cannot read as stacked.
    """
    import SimpleITK as sitk

    where = series.folder or series.files[0].parent
    if series.refused:
        raise InputError(f"{where}: {series.refused}")
    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        if series.multiframe:
            image = sitk.ReadImage(str(series.files[0]))
        else:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames([str(f) for f in series.files])
            image = reader.Execute()
    except RuntimeError as err:
        detail = str(err).strip().splitlines()[-1] if str(err).strip() else "unreadable"
        raise InputError(f"{where}: cannot read DICOM series {series.series_uid} ({detail})") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        if size[3] != 1:
            raise InputError(f"{where}: 4D DICOM object ({size}); one volume per series is supported")
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{where}: colour DICOM image; a grey-scale CT or MR series is needed")
    vol = Volume.from_sitk(image, str(where))
    if vol.array.ndim == 2:  # a single 2D slice: keep it 3D with one slice
        vol = Volume(vol.array[None], tuple(vol.spacing) + (1.0,), tuple(vol.origin) + (0.0,),
                     (vol.direction[0], vol.direction[1], 0.0, vol.direction[2], vol.direction[3], 0.0, 0, 0, 1.0),
                     vol.metadata, vol.path)
    if vol.array.shape[0] != series.n_slices:
        raise InputError(f"{where}: SimpleITK read {vol.array.shape[0]} slices but the series has {series.n_slices}")
    # slice 0 of the volume must be the first file (frame): the slice <-> instance mapping relies on it
    first = _pydicom().dcmread(str(series.files[0]), stop_before_pixels=True)
    ipp = first.get("ImagePositionPatient")
    if series.frames[0] is not None:
        fv = _frame_values(first, series.frames[0])
        ipp = fv["ImagePositionPatient"].value if "ImagePositionPatient" in fv else None
    if ipp is not None and not np.allclose([float(v) for v in ipp], vol.origin, atol=1e-3):
        raise InputError(f"{series.files[0]}: SimpleITK stacked the slices in another order than the files; "
                         "cannot map slices to source instances")
    vol.metadata["0008|0060"] = series.modality
    vol.metadata["0020|000e"] = series.series_uid
    return vol


# ----------------------------------------------------------------------------- writing
def check_output_folder(out_dir: PathLike, inputs: Iterable[PathLike], must_be_empty: bool = True) -> Path:
    """Validate a DICOM output folder before any work: never the input, never inside or around it.

    Args:
        out_dir: folder to create (its parent must exist) or an existing empty folder.
        inputs: input files and folders; for a file, its folder counts as the input folder.
        must_be_empty: refuse an existing folder that holds anything.

    Raises:
        InputError: one line naming the folder and the problem.
    """
    out = Path(out_dir)
    real_out = _real(out)
    for src in inputs:
        if src is None:
            continue
        src_path = Path(src)
        real_src = _real(src_path if src_path.is_dir() or not src_path.exists() else src_path.parent)
        if _inside(real_out, real_src) or _inside(real_src, real_out):
            raise InputError(f"{out}: output folder overlaps the input folder {src_path} "
                             "(it must not be, contain or lie inside an input folder)")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if out.is_dir():
        if must_be_empty and any(out.iterdir()):
            raise InputError(f"{out}: output folder is not empty; choose a new or empty folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise InputError(f"{out}: output folder is not writable")
    else:
        if not out.parent.is_dir():
            raise InputError(f"{out}: parent folder {out.parent} does not exist")
        if not os.access(out.parent, os.W_OK | os.X_OK):
            raise InputError(f"{out}: cannot create the folder ({out.parent} is not writable)")
    return out


def choose_rescale(lo: float, hi: float, dtype, source_slope: float = 1.0, source_intercept: float = 0.0,
                   precision: str = "source") -> Tuple[str, str]:
    """RescaleSlope / RescaleIntercept (as DICOM DS strings) to store values in ``[lo, hi]`` in ``dtype``.

    ``precision="source"`` keeps the source's step (and intercept when the range fits), so a CT
    stays in whole HU as the scanner wrote it; ``"max"`` uses the smallest power-of-two step (down
    to 2**-12) whose range covers the values. Stored values are ``round((v - intercept) / slope)``,
    so every value is within half a step of the float result.
    """
    info = np.iinfo(np.dtype(dtype))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise InputError("result has NaN or Inf voxels")

    def fits(s: float, b: float) -> bool:
        return math.floor((lo - b) / s + 0.5) >= info.min and math.floor((hi - b) / s + 0.5) <= info.max

    def intercept_for(s: float) -> float:
        return float(math.floor(lo - info.min * s))

    if precision not in ("source", "max"):
        raise InputError(f"unknown rescale precision {precision!r}; use 'source' or 'max'")
    if precision == "source":
        s0 = float(source_slope) if source_slope and source_slope > 0 else 1.0
        s_str, b_str = format_ds(s0), format_ds(float(source_intercept))
        if fits(float(s_str), float(b_str)):
            return s_str, b_str
        steps = [s0 * 2.0 ** k for k in range(0, 64)]
    else:
        steps = [2.0 ** k for k in range(int(math.log2(MIN_SLOPE)), 64)]
    for s in steps:
        s_str = format_ds(s)
        b_str = format_ds(intercept_for(float(s_str)))
        if fits(float(s_str), float(b_str)):
            return s_str, b_str
    raise InputError(f"value range [{lo}, {hi}] cannot be stored in {np.dtype(dtype).name}")  # pragma: no cover


def quantize(array: np.ndarray, slope: float, intercept: float, dtype) -> np.ndarray:
    """Stored values ``round((array - intercept) / slope)`` in ``dtype`` (checked in range)."""
    info = np.iinfo(np.dtype(dtype))
    q = np.floor((np.asarray(array, dtype=np.float64) - intercept) / slope + 0.5)
    if q.size and (q.min() < info.min or q.max() > info.max):  # pragma: no cover - choose_rescale prevents it
        raise InputError("stored values out of range for the pixel type")
    return q.astype(np.dtype(dtype).newbyteorder("<"))


def _code_item(code: Tuple[str, str, str]):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def _frame_values(src, frame: int) -> Dict[str, Any]:
    """Classic-attribute values of one frame of a multi-frame source (per-frame over shared groups)."""
    values: Dict[str, Any] = {}
    groups = []
    shared = src.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    per_frame = src.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame):
        groups.append(per_frame[frame])
    for group in groups:
        for macro in group:
            if macro.VR != "SQ" or macro.tag.is_private or not macro.value:
                continue
            for elem in macro.value[0]:
                if elem.tag.is_private or not elem.keyword:
                    continue
                if elem.keyword in _FG_COPY or elem.keyword in _FG_READ:
                    values[elem.keyword] = elem
    return values


def _source_rescale(src, frame: Optional[int]) -> Tuple[float, float]:
    slope, intercept = src.get("RescaleSlope"), src.get("RescaleIntercept")
    if frame is not None:
        fv = _frame_values(src, frame)
        if "RescaleSlope" in fv:
            slope = fv["RescaleSlope"].value
        if "RescaleIntercept" in fv:
            intercept = fv["RescaleIntercept"].value
    try:
        slope = float(slope) if slope not in (None, "") else 1.0
        intercept = float(intercept) if intercept not in (None, "") else 0.0
    except (TypeError, ValueError):
        slope, intercept = 1.0, 0.0
    return (slope if slope > 0 else 1.0), intercept


def _flatten_multiframe(src, frame: int):
    """A classic-instance dataset for one frame of a multi-frame source (top level + functional groups)."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    for elem in src:
        if elem.tag.is_private or elem.tag.group == 0x0002 or elem.keyword in _DROP_KEYWORDS or not elem.keyword:
            continue
        ds.add(copy.deepcopy(elem))
    fv = _frame_values(src, frame)
    for keyword, elem in fv.items():
        target = _FG_COPY.get(keyword)
        if target:
            setattr(ds, target, copy.deepcopy(elem.value))
    if "InversionTimes" in fv and fv["InversionTimes"].value is not None:
        times = fv["InversionTimes"].value
        first = times if isinstance(times, (int, float, str)) else list(times)[0]
        ds.InversionTime = format_ds(float(first))
    if "FrameAcquisitionDateTime" in fv and fv["FrameAcquisitionDateTime"].value:
        dt = str(fv["FrameAcquisitionDateTime"].value)
        ds.AcquisitionDateTime = dt
        ds.AcquisitionDate, ds.AcquisitionTime = dt[:8], dt[8:] or "000000"
    if str(src.get("Modality", "")) == "MR":
        _classic_mr_terms(ds, src, fv)
    return ds


def _classic_mr_terms(ds, src, fv: Mapping[str, Any]) -> None:
    """ScanningSequence, SequenceVariant, ScanOptions, SequenceName, ImagedNucleus of a classic MR
    instance, derived from the enhanced MR pulse-sequence and modifier attributes."""
    def val(key):
        return str(fv[key].value) if key in fv and fv[key].value is not None else ""

    echo = str(src.get("EchoPulseSequence", "") or "")
    seq = []
    if echo in ("SPIN", "BOTH"):
        seq.append("SE")
    if echo in ("GRADIENT", "BOTH"):
        seq.append("GR")
    if str(src.get("EchoPlanarPulseSequence", "")) == "YES":
        seq.append("EP")
    if val("InversionRecovery") == "YES":
        seq.append("IR")
    ds.ScanningSequence = seq or ["RM"]
    variant = []
    if str(src.get("SegmentedKSpaceTraversal", "SINGLE") or "SINGLE") != "SINGLE":
        variant.append("SK")
    if val("MagnetizationTransfer") not in ("", "NONE"):
        variant.append("MTC")
    if str(src.get("SteadyStatePulseSequence", "NONE") or "NONE") != "NONE":
        variant.append("SS")
    if val("Spoiling") not in ("", "NONE"):
        variant.append("SP")
    if val("InversionRecovery") == "YES" or val("T2Preparation") == "YES":
        variant.append("MP")
    if str(src.get("OversamplingPhase", "NONE") or "NONE") != "NONE":
        variant.append("OSP")
    ds.SequenceVariant = variant or ["NONE"]
    options = []
    if val("PartialFourier") == "YES":
        options.append("PFF" if val("PartialFourierDirection") == "FREQUENCY" else "PFP")
    if val("FlowCompensation") not in ("", "NONE"):
        options.append("FC")
    ds.ScanOptions = options
    if src.get("PulseSequenceName"):
        ds.SequenceName = str(src.PulseSequenceName)[:16]
    if src.get("ResonantNucleus"):
        ds.ImagedNucleus = str(src.ResonantNucleus)[:16]


def _classic_base(src):
    """A copy of a classic source instance without pixel data, private tags, overlays or dropped attributes."""
    ds = copy.deepcopy(src)
    ds.remove_private_tags()
    for elem in list(ds):
        group = elem.tag.group
        if group == 0x0002 or (0x6000 <= group <= 0x60FF and group % 2 == 0) or (0x5000 <= group <= 0x50FF) \
                or elem.keyword in _DROP_KEYWORDS:
            del ds[elem.tag]
    return ds


def _fill_type2(ds, sop_class: str) -> None:
    """Type 2 attributes present (possibly empty), so a source that omitted them does not make the
    derived instance invalid; and the de-identification note dciodvfy requires."""
    type2 = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
             "ReferringPhysicianName", "StudyID", "AccessionNumber", "Manufacturer", "PositionReferenceIndicator",
             "SliceThickness", "InstanceNumber"]
    if sop_class == CT_IMAGE:
        type2 += ["KVP", "AcquisitionNumber"]
    if sop_class == MR_IMAGE:
        type2 += ["ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength"]
        seq = list(ds.get("ScanningSequence") or [])
        if "EP" not in seq and "RM" not in seq:
            type2.append("RepetitionTime")
        if "IR" in seq:
            type2.append("InversionTime")
        if "ScanningSequence" not in ds or not ds.ScanningSequence:
            ds.ScanningSequence = ["RM"]
        if "SequenceVariant" not in ds or not ds.SequenceVariant:
            ds.SequenceVariant = ["NONE"]
    for keyword in type2:
        if keyword not in ds:
            setattr(ds, keyword, None)
    if str(ds.get("PatientIdentityRemoved", "")).upper() == "YES" and not ds.get("DeidentificationMethod") \
            and not ds.get("DeidentificationMethodCodeSequence"):
        ds.DeidentificationMethod = "not stated in the source instances"


def _now() -> Tuple[str, str, str]:
    now = datetime.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f"), now.strftime("%Y%m%d%H%M%S.%f")


def _encode(ds) -> bytes:
    """The dataset as a DICOM Part 10 file (Explicit VR Little Endian)."""
    from io import BytesIO

    pydicom = _pydicom()
    buf = BytesIO()
    if _pydicom_major() >= 3:
        pydicom.dcmwrite(buf, ds, enforce_file_format=True, implicit_vr=False, little_endian=True)
    else:  # pragma: no cover - pydicom 2.x
        ds.is_little_endian, ds.is_implicit_VR = True, False
        pydicom.dcmwrite(buf, ds, write_like_original=False)
    return buf.getvalue()


def derived_description(provenance: Provenance, kind: str = "denoised", stack: str = "") -> str:
    """SeriesDescription of a derived series: ``Denoised (<method>, <model>)`` and the stack, if any
    (64 characters at most)."""
    head = provenance.series_description(kind)
    if not stack:
        return head
    stack = stack[:32]
    return f"{head[:63 - len(stack)]} {stack}"


def next_series_number(source_number: Optional[int], used: Iterable[Optional[int]] = (), kind: str = "denoised") -> int:
    """A series number for the derived series: source + 1000 (2000 for uncertainty), bumped by
    1000 until it differs from every number in ``used`` (the study's existing series)."""
    taken = {int(u) for u in used if u is not None}
    offset = SERIES_NUMBER_OFFSET.get(kind, 1000)
    number = (source_number or 0) + offset
    while number in taken:
        number += 1000
    return number


def write_derived_series(
    volume: Volume,
    series: DicomSeries,
    out_dir: PathLike,
    provenance: Provenance,
    *,
    kind: str = "denoised",
    series_number: Optional[int] = None,
    used_series_numbers: Iterable[Optional[int]] = (),
    description: Optional[str] = None,
    rescale: str = "source",
    inputs: Iterable[PathLike] = (),
) -> DerivedSeries:
    """Write ``volume`` (on the grid of ``series``, as read by :func:`read_series`) as a derived series.

    Args:
        volume: float result, array (z, y, x) with one slice per source slice.
        series: the source series (slice ``k`` came from ``series.files[k]`` / ``series.frames[k]``).
        out_dir: new or empty folder; never an input folder, inside one, or around one.
        provenance: method, model, model hash, version (see :func:`provenance_from_info`).
        kind: ``"denoised"`` or ``"uncertainty"`` (changes the derivation code, description, number).
        series_number: default :func:`next_series_number` of the source's.
        used_series_numbers: series numbers already in the study, avoided.
        description: SeriesDescription; default ``Denoised (<method>, <model>)`` and the
            source's stack (e.g. ``echo 2``) when the series has several.
        rescale: ``"source"`` or ``"max"`` (see :func:`choose_rescale`).
        inputs: further paths that must not overlap ``out_dir`` (the source folder always counts).

    Returns:
        The :class:`DerivedSeries` written (files in slice order ``0001.dcm`` ...).
    """
    pydicom = _pydicom()
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DSequence
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    arr = np.asarray(volume.array)
    if arr.ndim == 2:
        arr = arr[None]
    n = series.n_slices
    if arr.ndim != 3 or arr.shape[0] != n:
        raise InputError(f"{series.folder}: result has shape {arr.shape}, the series has {n} slices")
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise InputError(f"{series.folder}: result has {bad} NaN or Inf voxels; no DICOM written")
    out = check_output_folder(out_dir, [series.folder, *series.files[:1], *inputs])

    # Source headers, each file read once (a multi-frame file is one read).
    headers: Dict[str, Any] = {}
    for f in dict.fromkeys(series.files):
        try:
            headers[_real(f)] = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception as err:
            raise InputError(f"{f}: cannot read DICOM header ({type(err).__name__})") from None
    first = headers[_real(series.files[0])]
    rows, cols = int(first.Rows), int(first.Columns)
    if arr.shape[1:] != (rows, cols):
        raise InputError(f"{series.files[0]}: result slices are {arr.shape[1:]}, the source has {(rows, cols)}")
    out_class = OUTPUT_SOP_CLASS.get(series.sop_class_uid)
    if out_class is None:
        raise InputError(f"{series.files[0]}: {_sop_class_name(series.sop_class_uid)} cannot be written as a derived series")
    signed = int(first.get("PixelRepresentation", 0) or 0) == 1
    dtype = np.dtype("<i2" if signed else "<u2")
    src_slope, src_intercept = _source_rescale(first, series.frames[0])
    if kind == "uncertainty":
        precision = "max"
    else:
        precision = rescale
    slope_str, intercept_str = choose_rescale(float(arr.min()), float(arr.max()), dtype, src_slope, src_intercept,
                                              precision)
    slope, intercept = float(slope_str), float(intercept_str)
    stored = quantize(arr, slope, intercept, dtype)

    series_uid = generate_uid()
    number = series_number if series_number is not None else next_series_number(
        series.series_number, used_series_numbers, kind)
    desc = description or derived_description(provenance, kind, series.stack)
    derivation = provenance.description(kind)
    code = CODE_STANDARD_DEVIATION if kind == "uncertainty" else CODE_SMOOTHING
    date, tm, dt = _now()
    for_uid = str(first.get("FrameOfReferenceUID", "") or "") or generate_uid()
    instance_numbers = _instance_numbers(series, headers)
    from . import __version__

    if kind == "uncertainty":
        finite = arr[np.isfinite(arr)]
        hi = float(np.percentile(finite, 99.5)) if finite.size else 1.0
        window = (format_ds(hi / 2), format_ds(max(hi, slope)))
    else:
        window = None

    width = max(4, len(str(n)))
    written: List[Path] = []
    uids: List[str] = []
    created = not out.exists()
    out.mkdir(exist_ok=True)
    try:
        for k in range(n):
            src = headers[_real(series.files[k])]
            frame = series.frames[k]
            ds = _flatten_multiframe(src, frame) if frame is not None else _classic_base(src)
            sop_uid = generate_uid()
            ds.SOPClassUID = out_class
            ds.SOPInstanceUID = sop_uid
            ds.InstanceCreationDate, ds.InstanceCreationTime = date, tm
            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = number
            ds.SeriesDescription = desc
            ds.SeriesDate, ds.SeriesTime = date, tm
            ds.ContentDate, ds.ContentTime = date, tm
            ds.InstanceNumber = instance_numbers[k]
            ds.FrameOfReferenceUID = for_uid
            tail = [str(v) for v in list(src.get("ImageType") or [])[2:]]
            if out_class == CT_IMAGE and not tail:
                tail = ["AXIAL"]
            ds.ImageType = ["DERIVED", "SECONDARY"] + tail
            ds.DerivationDescription = derivation
            ds.DerivationCodeSequence = DSequence([_code_item(code)])
            ref = Dataset()
            ref.ReferencedSOPClassUID = src.SOPClassUID
            ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
            if frame is not None:
                ref.ReferencedFrameNumber = frame + 1
            ref.PurposeOfReferenceCodeSequence = DSequence([_code_item(CODE_SOURCE_IMAGE)])
            ds.SourceImageSequence = DSequence([ref])
            ds.ReferencedSeriesSequence = _referenced_series(series.series_uid, src)
            _keep_lossy_history(ds, src)
            equipment = Dataset()
            equipment.Manufacturer = "DualNet"
            equipment.ManufacturerModelName = "dualnet"
            equipment.SoftwareVersions = __version__
            equipment.ContributionDateTime = dt
            equipment.ContributionDescription = derivation
            equipment.PurposeOfReferenceCodeSequence = DSequence([_code_item(CODE_PROCESSING_EQUIPMENT)])
            previous = list(src.get("ContributingEquipmentSequence") or [])
            ds.ContributingEquipmentSequence = DSequence([copy.deepcopy(e) for e in previous] + [equipment])
            # geometry must be there (Image Plane module of CT / MR)
            for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
                if keyword not in ds or not ds.get(keyword):
                    raise InputError(f"{series.files[k]}: source slice has no {keyword}; cannot write its geometry")
            # pixels
            ds.SamplesPerPixel = 1
            photometric = str(src.get("PhotometricInterpretation", "MONOCHROME2"))
            ds.PhotometricInterpretation = photometric if photometric in ("MONOCHROME1", "MONOCHROME2") \
                else "MONOCHROME2"
            ds.Rows, ds.Columns = rows, cols
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
            ds.PixelRepresentation = 1 if signed else 0
            if out_class == CT_IMAGE or slope != 1.0 or intercept != 0.0:
                ds.RescaleIntercept = intercept_str
                ds.RescaleSlope = slope_str
                if out_class == CT_IMAGE:
                    ds.RescaleType = "HU"
            if window is not None:
                ds.WindowCenter, ds.WindowWidth = window
                if "WindowCenterWidthExplanation" in ds:
                    del ds.WindowCenterWidthExplanation
            ds.add_new(0x7FE00010, "OW", stored[k].tobytes())
            _fill_type2(ds, out_class)
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = out_class
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            meta.ImplementationVersionName = f"DUALNET_{__version__}"[:16]
            ds.file_meta = meta
            path = out / f"{k + 1:0{width}d}.dcm"
            atomic_write_bytes(path, _encode(ds))
            written.append(path)
            uids.append(sop_uid)
    except BaseException:
        for path in written:
            try:
                path.unlink()
            except OSError:
                pass
        if created:
            try:
                out.rmdir()
            except OSError:
                pass
        raise
    return DerivedSeries(out, written, series_uid, uids, number, desc, slope, intercept, kind)


def _referenced_series(series_uid: str, src):
    """ReferencedSeriesSequence of one derived instance: the source instance it came from."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DSequence

    ref = Dataset()
    ref.ReferencedSOPClassUID = src.SOPClassUID
    ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
    item = Dataset()
    item.SeriesInstanceUID = series_uid
    item.ReferencedInstanceSequence = DSequence([ref])
    return DSequence([item])


def _instance_numbers(series: DicomSeries, headers: Mapping[str, Any]) -> List[int]:
    """InstanceNumber of each derived slice, in the source's order: the source instance's number
    when unique in the volume, else its rank by that number; the frame number for a multi-frame file."""
    if series.multiframe:
        return [int(frame) + 1 for frame in series.frames]
    numbers = [_int_or_none(headers[_real(f)].get("InstanceNumber")) for f in series.files]
    if None not in numbers and len(set(numbers)) == len(numbers):
        return [int(v) for v in numbers]
    order = sorted(range(len(numbers)), key=lambda k: (numbers[k] is None, numbers[k] or 0, k))
    ranks = [0] * len(numbers)
    for rank, k in enumerate(order, start=1):
        ranks[k] = rank
    return ranks


def _keep_lossy_history(ds, src) -> None:
    """LossyImageCompression 01 when the source was lossy compressed (its attribute, or its transfer
    syntax: then also the method, unless the source gave a ratio or method, copied with it)."""
    meta = getattr(src, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
    method = LOSSY_TRANSFER_SYNTAXES.get(syntax)
    stated = str(src.get("LossyImageCompression", "") or "").strip()
    if stated == "00" or (method is None and stated != "01"):  # an explicit "00" (lossless JPEG 2000 / -LS) holds
        return
    ds.LossyImageCompression = "01"
    if method and "LossyImageCompressionMethod" not in ds and "LossyImageCompressionRatio" not in ds:
        ds.LossyImageCompressionMethod = method


# ----------------------------------------------------------------------------- the whole path
def modality_for(series: DicomSeries, requested: Optional[str] = None,
                 array: Optional[np.ndarray] = None) -> Tuple[str, str]:
    """(noise model, note): ``requested`` when given (not None / ``"auto"``), else from the DICOM
    Modality tag, else (a tag without a noise model, e.g. OT) from the voxels ``array``
    (:func:`dualnet.modality.modality_from_intensities`)."""
    from .modality import check_modality, modality_from_dicom, modality_from_intensities

    tag = series.modality.upper()
    from_tag = modality_from_dicom(tag)
    if requested and str(requested).lower() != "auto":
        chosen = check_modality(requested)
        note = "" if from_tag in (None, chosen) else f"--modality {chosen} overrides the DICOM Modality {tag}"
        return chosen, note
    if from_tag is not None:
        return from_tag, f"modality {from_tag} from DICOM Modality {tag}"
    if array is None:
        raise InputError(f"{series.folder}: DICOM Modality {tag or '(empty)'} has no noise model; give the modality")
    chosen, reason = modality_from_intensities(array)
    return chosen, f"modality {chosen} from the intensities ({reason}); DICOM Modality {tag or '(empty)'} has no noise model"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:40] or "series"


def denoise_dicom_folder(
    input_path: PathLike,
    output_dir: PathLike,
    *,
    method: str = "dualnet",
    modality: Optional[str] = None,
    sigma: Optional[float] = None,
    model: Optional[PathLike] = None,
    device: str = "auto",
    tta: Union[bool, int, None] = None,
    mc_samples: int = 8,
    tile: Optional[int] = None,
    seed: int = 0,
    guard: Optional[bool] = None,
    views: Optional[int] = None,
    uncertainty_dir: Optional[PathLike] = None,
    precision: str = "auto",
    rescale: str = "source",
    layout: str = "auto",
    recursive: bool = True,
    progress_factory: Optional[Callable[[DicomSeries], Any]] = None,
    log: Optional[Callable[[str], None]] = None,
    cancel=None,
) -> DicomRunReport:
    """Find every CT / MR series under ``input_path``, denoise each, write one derived series per source.

    Args:
        input_path: a DICOM folder (nested folders, an exported study) or one DICOM file.
        output_dir: where the derived series go. ``layout="auto"``: with one source series its
            instances go directly into ``output_dir`` (new or empty); with several, into
            ``output_dir/<NNN>_<modality>_<description>/`` (``output_dir`` may already exist;
            each subfolder must be new). ``layout="subfolders"`` always uses subfolders.
        method, sigma, model, device, tta, mc_samples, tile, seed, guard, views, precision: as
            :func:`dualnet.api.denoise_volume`.
        modality: noise model for every series; None (default): from each series' DICOM Modality
            (CT -> ct, MR -> mri, US -> us); a series with another modality fails with a reason.
        uncertainty_dir: also write the Monte Carlo dropout standard deviation (network only) as
            its own derived series here (same layout).
        rescale: ``"source"`` or ``"max"`` (see :func:`choose_rescale`).
        progress_factory: ``series -> progress callback`` (or None) for each series.
        log: called with one line per finished or failed series.
        cancel: a :class:`dualnet.progress.CancelToken`, checked inside denoising.

    Returns:
        A :class:`DicomRunReport`: one outcome per image series (a failing series does not stop
        the others; ``CancelledError`` does) and the skipped non-image objects. A failed series
        leaves no files (also not its denoised series when its uncertainty series fails).

    Raises:
        InputError: input missing, no image series found, or an output folder that overlaps the input.
        CancelledError, KeyboardInterrupt: re-raised with ``partial_report``, the report of the
            series finished before (their files stay; the interrupted series' files are removed).
    """
    from .api import denoise_volume
    from .errors import CancelledError

    src_root = Path(input_path)
    series_list, skipped = find_dicom_series(src_root, recursive=recursive)
    if not series_list:
        reasons = "; ".join(s.line() for s in skipped if s.dicom)[:300]
        raise InputError(f"{src_root}: no CT or MR DICOM image series found{': ' + reasons if reasons else ''}")
    out_root = Path(output_dir)
    flat = layout == "auto" and len(series_list) == 1
    if layout not in ("auto", "subfolders"):
        raise InputError(f"unknown layout {layout!r}")
    inputs = [src_root]
    check_output_folder(out_root, inputs, must_be_empty=flat)
    if uncertainty_dir is not None:
        if path_inside(uncertainty_dir, out_root) or path_inside(out_root, uncertainty_dir):
            raise InputError(f"{uncertainty_dir}: uncertainty folder must not be, contain or lie inside the output folder")
        check_output_folder(uncertainty_dir, inputs, must_be_empty=flat)
    if not flat:
        out_root.mkdir(exist_ok=True)
        if uncertainty_dir is not None:
            Path(uncertainty_dir).mkdir(exist_ok=True)
    used_numbers: Dict[str, set] = {}
    for s in series_list:
        used_numbers.setdefault(s.study_uid, set()).add(s.series_number)
    report = DicomRunReport(skipped=skipped)
    names: Dict[str, int] = {}
    for index, series in enumerate(series_list, start=1):
        start = time.perf_counter()
        label = series.description or (f"series{series.series_number}" if series.series_number is not None else "series")
        label += f" {series.stack}" if series.stack else ""
        name = f"{index:03d}_{series.modality or 'XX'}_{_slug(label)}"
        names[name] = names.get(name, 0) + 1
        target = out_root if flat else out_root / name
        unc_target = None
        if uncertainty_dir is not None:
            unc_target = Path(uncertainty_dir) if flat else Path(uncertainty_dir) / name
        outcome = SeriesOutcome(source=series, status="failed")
        try:
            check_output_folder(target, inputs)
            volume = read_series(series)
            chosen, note = modality_for(series, modality, volume.array)
            outcome.modality = chosen
            if note:
                outcome.info["modality_note"] = note
            progress = progress_factory(series) if progress_factory else None
            try:
                result = denoise_volume(volume, method=method, modality=chosen, sigma=sigma, model=model,
                                        device=device, tta=tta, uncertainty=unc_target is not None,
                                        mc_samples=mc_samples, tile=tile, seed=seed, progress=progress,
                                        cancel=cancel, guard=guard, views=views, precision=precision)
            finally:
                if progress is not None and hasattr(progress, "close"):
                    progress.close()
            outcome.info.update(result.info)
            prov = provenance_from_info(result.info, method, chosen)
            used = used_numbers.setdefault(series.study_uid, set())
            target_existed = target.exists()
            derived = write_derived_series(result.volume, series, target, prov, used_series_numbers=used,
                                           rescale=rescale, inputs=inputs)
            try:
                if unc_target is not None and result.uncertainty is not None:
                    outcome.uncertainty = write_derived_series(
                        result.uncertainty, series, unc_target, prov, kind="uncertainty",
                        used_series_numbers=used | {derived.series_number}, inputs=inputs + [out_root])
            except BaseException:  # the series failed as a whole: its denoised series goes too
                _remove_series(derived, remove_folder=not target_existed)
                raise
            outcome.derived = derived
            used.add(derived.series_number)
            if outcome.uncertainty is not None:
                used.add(outcome.uncertainty.series_number)
            outcome.status = "ok"
        except (CancelledError, KeyboardInterrupt) as err:
            err.partial_report = report  # type: ignore[union-attr]  # the series finished before, for the caller
            raise
        except DualNetError as err:
            outcome.error = str(err)
        except MemoryError:
            outcome.error = "out of memory"
        except Exception as err:  # one broken series must not stop the others; reported as failed
            outcome.error = f"unexpected {type(err).__name__}: {err}"
            if isinstance(err, ImportError):
                outcome.missing_package = (getattr(err, "name", None) or "?").split(".")[0]
        outcome.seconds = round(time.perf_counter() - start, 3)
        report.outcomes.append(outcome)
        if log:
            log(outcome.line())
    return report


def _remove_series(derived: DerivedSeries, remove_folder: bool) -> None:
    """Delete a written derived series (and its folder when this run created it)."""
    for path in derived.files:
        try:
            path.unlink()
        except OSError:
            pass
    if remove_folder:
        try:
            derived.folder.rmdir()
        except OSError:
            pass


# ----------------------------------------------------------------------------- Slicer export attributes
def slicer_series_attributes(source: Mapping[str, str], provenance: Provenance, *,
                             used_series_numbers: Iterable[Optional[int]] = (), kind: str = "denoised") -> Dict[str, str]:
    """Subject-hierarchy attributes (``DICOM.<Tag>``) for a result node so that Slicer's *Export to
    DICOM* writes it as a new series of the source's study.

    Slicer's export dialog takes the patient and study tags from the parent items and each series
    tag (``Modality``, ``SeriesDescription``, ``SeriesNumber``, ``Manufacturer``, ``Model``,
    ``FrameOfReferenceUID``, dates) from the series item's ``DICOM.<Tag>`` attribute when present.
    ``source`` holds the source series item's attributes (``DICOM.Modality`` ...).
    """
    date, tm, _ = _now()
    src_number = _int_or_none(source.get("DICOM.SeriesNumber"))
    attrs = {
        "DICOM.Modality": source.get("DICOM.Modality", "") or "",
        "DICOM.SeriesDescription": provenance.series_description(kind),
        "DICOM.SeriesNumber": str(next_series_number(src_number, used_series_numbers, kind)),
        "DICOM.SeriesDate": date,
        "DICOM.SeriesTime": tm,
        "DICOM.ContentDate": date,
        "DICOM.ContentTime": tm,
        "DICOM.FrameOfReferenceUID": source.get("DICOM.FrameOfReferenceUID", "") or "",
        "DICOM.Manufacturer": source.get("DICOM.Manufacturer", "") or "",
        "DICOM.Model": source.get("DICOM.Model", "") or "",
    }
    return attrs
