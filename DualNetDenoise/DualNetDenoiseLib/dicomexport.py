"""DICOM export of a denoised volume node: into the source's study, with provenance.

Two routes (docs/SLICER.md, "Exporting the result to DICOM"):

* :func:`place_in_source_study` (called by the denoise logic for every result) puts the result
  node's subject-hierarchy item under the study
  item of its DICOM-loaded input and sets the series attributes (``DICOM.Modality``,
  ``DICOM.SeriesDescription`` "Denoised (<method>, <model>)", a new ``DICOM.SeriesNumber``,
  ``DICOM.FrameOfReferenceUID`` ...) that Slicer's *Export to DICOM* dialog reads, so the
  stock exporter writes it as a new series of the same patient and study. The stock exporter
  (CreateDICOMSeries) cannot write ``ImageType DERIVED``, derivation codes or source
  references.
* :func:`export_derived_series` writes the full derived series (``DERIVED\\SECONDARY``,
  derivation description and code, SourceImageSequence, per-slice geometry of the source
  instances) with the ``dualnet`` core writer, from the result node and the source files
  (found through the input item's ``DICOMInstanceUID`` list and Slicer's DICOM database).

No Qt and no Slicer application import at module level: the MRML scene is passed in, and the
DICOM database lookup can be replaced (tests use a dict).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

#: Subject-hierarchy attribute / UID names (vtkMRMLSubjectHierarchyConstants), spelled out so the
#: pure parts need no Slicer import.
DICOM_PREFIX = "DICOM."
INSTANCE_UID_NAME = "DICOMInstanceUID"
STUDY_LEVEL = "Study"
SERIES_ATTRIBUTES = ("Modality", "SeriesNumber", "SeriesDescription", "FrameOfReferenceUID", "Manufacturer", "Model",
                     "SeriesDate", "SeriesTime", "ContentDate", "ContentTime")


def _sh_node(scene):
    import slicer

    return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)


def provenance_from_node(outputVolume, kind: str = "denoised"):
    """A :class:`dualnet.dicom_out.Provenance` from the ``DualNet.*`` attributes the denoise logic
    stores on a result node (method, model, parameters with the core's ``info``)."""
    from dualnet.dicom_out import provenance_from_info

    method = outputVolume.GetAttribute("DualNet.method") or "unknown"
    try:
        params = json.loads(outputVolume.GetAttribute("DualNet.parameters") or "{}")
    except ValueError:
        params = {}
    info = dict(params.get("info") or {})
    model = outputVolume.GetAttribute("DualNet.model")
    if model and model not in ("None", "") and "model" not in info and method == "dualnet":
        info["model"] = model
    modality = params.get("modality")
    if not modality or modality == "auto":  # the modality the core chose
        modality = info.get("modality") or ""
    return provenance_from_info(info, method, modality)


def source_series_attributes(shNode, itemID) -> Dict[str, str]:
    """The ``DICOM.*`` attributes of a subject-hierarchy item (the input's series item)."""
    return {name: shNode.GetItemAttribute(itemID, name) for name in shNode.GetItemAttributeNames(itemID)
            if name.startswith(DICOM_PREFIX)}


def place_in_source_study(scene, inputVolume, outputVolume, kind: str = "denoised") -> bool:
    """Put ``outputVolume`` in the study of its DICOM-loaded ``inputVolume``, ready for *Export to DICOM*.

    Returns False when the input was not loaded from DICOM (the scene has no subject hierarchy, or
    the input's item has no study parent); an output that an earlier result placed in a study (it
    carries ``DICOM.*`` attributes) is then taken out of it, since it now holds this input's result.
    Series numbers already used in the study are avoided. Called by the denoise logic after every
    result; ``kind="uncertainty"`` for an uncertainty map.
    """
    from dualnet.dicom_out import slicer_series_attributes

    if scene is None or scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode") is None:
        return False  # nothing was loaded through the DICOM module (and none is created here)
    sh = _sh_node(scene)
    in_item = sh.GetItemByDataNode(inputVolume)
    study = sh.GetItemParent(in_item) if in_item else 0
    if not study or sh.GetItemLevel(study) != STUDY_LEVEL:
        _leave_study(sh, outputVolume)
        return False
    out_item = sh.GetItemByDataNode(outputVolume) or sh.CreateItem(study, outputVolume)
    sh.SetItemParent(out_item, study)
    used = _used_series_numbers(sh, study, out_item)
    attrs = slicer_series_attributes(source_series_attributes(sh, in_item), provenance_from_node(outputVolume, kind),
                                     used_series_numbers=used, kind=kind)
    for name, value in attrs.items():
        sh.SetItemAttribute(out_item, name, value)
    return True


def _used_series_numbers(sh, study, exclude=0) -> List[int]:
    """The ``DICOM.SeriesNumber`` of every item under ``study`` but ``exclude``."""
    used = []
    for child in _children(sh, study):
        if child != exclude:
            try:
                used.append(int(sh.GetItemAttribute(child, DICOM_PREFIX + "SeriesNumber")))
            except ValueError:
                pass
    return used


def _export_series_tags(sh, in_item, out_item) -> Tuple[Optional[int], str, List[int]]:
    """(series number, description, numbers used in the study) for exporting ``out_item``: the
    number and description :func:`place_in_source_study` (or the user) set on it, if any."""
    number, description = None, ""
    if out_item:
        try:
            number = int(sh.GetItemAttribute(out_item, DICOM_PREFIX + "SeriesNumber"))
        except ValueError:
            number = None
        description = sh.GetItemAttribute(out_item, DICOM_PREFIX + "SeriesDescription") or ""
    study = sh.GetItemParent(in_item) if in_item else 0
    used = _used_series_numbers(sh, study, out_item) if study and sh.GetItemLevel(study) == STUDY_LEVEL else []
    return number, description, used


def _leave_study(sh, node) -> None:
    """Move ``node``'s item to the top of the hierarchy and drop its ``DICOM.*`` attributes, if an
    earlier result placed it in a study (a result of a non-DICOM input belongs to no patient)."""
    item = sh.GetItemByDataNode(node)
    if not item:
        return
    names = [name for name in sh.GetItemAttributeNames(item) if name.startswith(DICOM_PREFIX)]
    if not names:
        return
    for name in names:
        sh.RemoveItemAttribute(item, name)
    sh.SetItemParent(item, sh.GetSceneItemID())


def _children(sh, parent) -> list:
    import vtk

    ids = vtk.vtkIdList()
    sh.GetItemChildren(parent, ids)
    return [ids.GetId(i) for i in range(ids.GetNumberOfIds())]


def _database_lookup(uid: str) -> str:  # pragma: no cover - needs the Slicer application
    import slicer

    return slicer.dicomDatabase.fileForInstance(uid)


def export_derived_series(scene, inputVolume, outputVolume, outputFolder, *,
                          fileForInstance: Optional[Callable[[str], str]] = None, kind: str = "denoised",
                          rescale: str = "source"):
    """Write ``outputVolume`` as a derived DICOM series of ``inputVolume``'s source instances.

    Its series number and description are the node's ``DICOM.SeriesNumber`` /
    ``DICOM.SeriesDescription`` (set by :func:`place_in_source_study`) when present; else a new
    number avoiding those of the source's study.

    Args:
        scene: the MRML scene.
        inputVolume: the DICOM-loaded input node (its subject-hierarchy item lists the instance UIDs).
        outputVolume: the denoised node (same grid; ``DualNet.*`` provenance attributes).
        outputFolder: new or empty folder, not inside the source's folder.
        fileForInstance: SOP Instance UID -> file path (default: ``slicer.dicomDatabase.fileForInstance``).
        kind: ``"denoised"`` or ``"uncertainty"``.
        rescale: ``"source"`` or ``"max"`` (see :func:`dualnet.dicom_out.choose_rescale`).

    Returns:
        The :class:`dualnet.dicom_out.DerivedSeries` written.
    """
    from dualnet.dicom_out import reorder_to_series, series_from_files, write_derived_series
    from dualnet.errors import InputError

    from . import nodes

    sh = _sh_node(scene)
    in_item = sh.GetItemByDataNode(inputVolume)
    uids = (sh.GetItemUID(in_item, INSTANCE_UID_NAME) if in_item else "").split()
    if not uids:
        raise InputError(f"{inputVolume.GetName()}: not loaded from DICOM (no instance UIDs); use another export")
    lookup = fileForInstance or _database_lookup
    files = []
    for uid in dict.fromkeys(uids):
        path = lookup(uid)
        if not path or not Path(path).is_file():
            raise InputError(f"{inputVolume.GetName()}: DICOM file of instance {uid} not found")
        files.append(path)
    series = series_from_files(files)
    volume = reorder_to_series(nodes.volume_from_node(outputVolume, squeeze_2d=False), series)
    sources = {str(Path(f).parent) for f in files}
    number, description, used = _export_series_tags(sh, in_item, sh.GetItemByDataNode(outputVolume))
    return write_derived_series(volume, series, Path(outputFolder), provenance_from_node(outputVolume, kind),
                                kind=kind, series_number=number, description=description or None,
                                used_series_numbers=used, rescale=rescale, inputs=sorted(sources))
