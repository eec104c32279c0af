"""Slicer side of DICOM out, on a real MRML scene (``slicer-core`` wheel).

A node "loaded from DICOM" is built the way Slicer's DICOM plugins leave it: the volume read by
GDCM, a patient -> study -> series subject hierarchy with ``DICOM.*`` attributes and the series
item's ``DICOMInstanceUID`` list. Then :mod:`DualNetDenoiseLib.dicomexport`:

* puts the denoised node under the same study with the series attributes Slicer's *Export to
  DICOM* dialog reads (new series number avoiding the study's numbers, description, modality,
  frame of reference), also when the denoise logic itself made the result (in-process and
  through its child process);
* writes the full derived series with the core writer from the node (slices matched by position
  along the normal), checked with dciodvfy and against the source instances.

Slicer's export dialog and its CreateDICOMSeries CLI themselves need the application (not tested).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_helpers import dciodvfy, modality_values, require_tool, sitk_read_folder, tree_hashes

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DualNetDenoise"))

try:
    import slicer
except ImportError:  # pragma: no cover
    slicer = None
HAVE_MRML = slicer is not None and hasattr(slicer, "vtkMRMLScene")

CT = "ct_ge_hispeed_head_tilt"


@pytest.fixture
def scene():
    if not HAVE_MRML:
        pytest.skip("slicer-core wheel not installed (pip install slicer-core vtk==<its pin>)")
    s = slicer.vtkMRMLScene()
    yield s
    s.Clear(1)


@pytest.fixture
def loaded_ct(scene, shared_data):
    """The tilted CT as Slicer's DICOM import leaves it: node + patient/study/series items."""
    from DualNetDenoiseLib import nodes
    from dualnet.io import Volume

    src = shared_data / "dicom" / CT
    image, names = sitk_read_folder(src)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "2: CT head")
    nodes.update_node_from_volume(node, Volume.from_sitk(image))
    headers = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in names]
    study = add_dicom_items(scene, node, headers)
    files = {str(x.SOPInstanceUID): str(f) for x, f in zip(headers, names)}
    return node, study, files, src


def add_dicom_items(scene, node, headers):
    """Patient -> study -> series items for ``node`` as Slicer's DICOM plugin makes them, plus another
    series of the study numbered 1002; returns the study item."""
    h = headers[0]
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "patient")
    sh.SetItemAttribute(patient, "DICOM.PatientName", str(h.PatientName))
    sh.SetItemAttribute(patient, "DICOM.PatientID", str(h.PatientID))
    sh.SetItemUID(patient, "DICOM", str(h.PatientID))
    study = sh.CreateStudyItem(patient, "study")
    sh.SetItemAttribute(study, "DICOM.StudyInstanceUID", str(h.StudyInstanceUID))
    sh.SetItemUID(study, "DICOM", str(h.StudyInstanceUID))
    item = sh.CreateItem(study, node)
    sh.SetItemUID(item, "DICOM", str(h.SeriesInstanceUID))
    sh.SetItemUID(item, "DICOMInstanceUID", " ".join(str(x.SOPInstanceUID) for x in headers))
    for name, value in (("Modality", h.Modality), ("SeriesNumber", h.SeriesNumber),
                        ("FrameOfReferenceUID", h.FrameOfReferenceUID), ("Manufacturer", h.Manufacturer),
                        ("Model", h.ManufacturerModelName)):
        sh.SetItemAttribute(item, f"DICOM.{name}", str(value))
    # another series of the study already uses 1002: the derived series must not take it
    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "other")
    other_item = sh.CreateItem(study, other)
    sh.SetItemAttribute(other_item, "DICOM.SeriesNumber", "1002")
    return study


@pytest.fixture
def loaded_small_ct(scene, shared_data):
    """A small node (4 x 48 x 48 noisy HU) with the DICOM items of the first 4 tilted-CT files: enough
    for the logic, which never reads the files."""
    from DualNetDenoiseLib import nodes

    names = sorted((shared_data / "dicom" / CT).glob("*.dcm"))[:4]
    headers = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in names]
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "2: CT head")
    arr = np.random.default_rng(0).normal(40.0, 25.0, (4, 48, 48)).astype(np.int16)
    nodes.update_node_from_array(node, arr, np.diag([0.5, 0.5, 5.0, 1.0]))
    return node, add_dicom_items(scene, node, headers)


def denoised_node(scene, node, reverse: bool = False):
    """What the denoise logic stores: the result on the input grid plus DualNet.* provenance.
    ``reverse``: the same voxels stacked in the opposite slice order (as a reader may stack them)."""
    from DualNetDenoiseLib import nodes
    from dualnet.api import denoise_volume
    from dualnet.io import Volume

    res = denoise_volume(nodes.volume_from_node(node, squeeze_2d=False), method="gaussian", modality="ct", sigma=25.0)
    out = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "2: CT head denoised (gaussian)")
    vol = res.volume
    if reverse:
        d = np.array(vol.direction).reshape(3, 3)
        last = np.array(vol.origin) + (vol.array.shape[0] - 1) * vol.spacing[2] * d[:, 2]
        d[:, 2] *= -1
        vol = Volume(vol.array[::-1].copy(), vol.spacing, tuple(last), tuple(d.ravel()))
    nodes.update_node_from_volume(out, vol)
    out.SetAttribute("DualNet.method", "gaussian")
    out.SetAttribute("DualNet.model", "None")
    out.SetAttribute("DualNet.parameters", json.dumps({"modality": "ct", "method": "gaussian", "info": res.info}))
    return out, res.volume.array.astype(np.float64)


def test_result_goes_into_the_source_study_with_export_attributes(scene, loaded_ct):
    from DualNetDenoiseLib.dicomexport import place_in_source_study

    node, study, _, _ = loaded_ct
    out, _ = denoised_node(scene, node)
    assert place_in_source_study(scene, node, out)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = sh.GetItemByDataNode(out)
    assert sh.GetItemParent(item) == study
    attr = {n: sh.GetItemAttribute(item, n) for n in sh.GetItemAttributeNames(item)}
    in_item = sh.GetItemByDataNode(node)
    assert attr["DICOM.Modality"] == "CT"
    assert attr["DICOM.SeriesNumber"] == "2002"  # 2 + 1000 is taken in this study
    assert attr["DICOM.SeriesDescription"] == "Denoised (gaussian)"
    assert attr["DICOM.FrameOfReferenceUID"] == sh.GetItemAttribute(in_item, "DICOM.FrameOfReferenceUID")
    assert attr["DICOM.SeriesDate"] and attr["DICOM.ContentTime"]
    # the names are those Slicer's export dialog reads (vtkMRMLSubjectHierarchyConstants)
    consts = slicer.vtkMRMLSubjectHierarchyConstants
    assert consts.GetDICOMSeriesModalityAttributeName() in attr and consts.GetDICOMSeriesNumberAttributeName() in attr
    assert consts.GetDICOMFrameOfReferenceUIDAttributeName() in attr
    assert sh.GetItemLevel(study) == consts.GetDICOMLevelStudy()


def item_attributes(sh, item) -> dict:
    return {n: sh.GetItemAttribute(item, n) for n in sh.GetItemAttributeNames(item)}


@pytest.mark.parametrize("in_process", [True, False])
def test_denoise_logic_puts_its_result_into_the_source_study(scene, loaded_small_ct, in_process):
    """What the panel's *Apply* does (``DenoiseLogicBase.process``, cheap gaussian) on a DICOM-loaded
    input: the result lands under the input's study, ready for *Export to DICOM*."""
    from DualNetDenoiseLib.logic import DenoiseLogicBase

    node, study = loaded_small_ct
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    in_item = sh.GetItemByDataNode(node)
    before = item_attributes(sh, in_item)
    out = DenoiseLogicBase().process(node, None, modality="ct", method="gaussian", noiseLevel=25.0,
                                     inProcess=in_process)
    item = sh.GetItemByDataNode(out)
    assert item and sh.GetItemParent(item) == study and sh.GetItemParent(in_item) == study
    attr = item_attributes(sh, item)
    assert attr["DICOM.Modality"] == "CT" and attr["DICOM.SeriesNumber"] == "2002"  # 1002 is taken
    assert attr["DICOM.SeriesDescription"] == "Denoised (gaussian)"
    assert attr["DICOM.FrameOfReferenceUID"] == before["DICOM.FrameOfReferenceUID"]
    assert attr["DICOM.Manufacturer"] == before["DICOM.Manufacturer"] and attr["DICOM.SeriesDate"]
    assert not sh.GetItemUID(item, "DICOM") and not sh.GetItemUID(item, "DICOMInstanceUID")  # a new series
    patient = sh.GetItemParent(study)  # the exporter takes patient and study tags from the parents
    assert sh.GetItemAttribute(patient, "DICOM.PatientID") and sh.GetItemAttribute(study, "DICOM.StudyInstanceUID")
    assert item_attributes(sh, in_item) == before  # the input's item is untouched
    # a second run into the same node keeps its place and number
    DenoiseLogicBase().process(node, out, modality="ct", method="gaussian", noiseLevel=25.0)
    assert sh.GetItemByDataNode(out) == item and sh.GetItemAttribute(item, "DICOM.SeriesNumber") == "2002"


def test_uncertainty_map_goes_into_the_study_too(scene, loaded_small_ct):
    """The logic's store step with an uncertainty array (what a network run returns; stubbed here
    with arrays so no network runs): both nodes are new series of the study, numbers distinct; a
    noise-branch map is stored in a node of its own but left out of the study."""
    from DualNetDenoiseLib import nodes
    from DualNetDenoiseLib.logic import DenoiseLogicBase

    node, study = loaded_small_ct
    logic = DenoiseLogicBase()
    params = logic._parameters("ct", "dualnet", None, None, "cpu", False, True)
    out = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "out")
    arr = nodes.array_from_node(node).astype(np.float32)
    maps = logic._store(node, out, nodes.get_ijk_to_ras(node), arr, params, {"sigma": 25.0},
                        {"uncertainty": np.ones_like(arr), "noise_map": np.ones_like(arr)})
    unc = maps["uncertainty"]
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    a, b = (item_attributes(sh, sh.GetItemByDataNode(n)) for n in (out, unc))
    assert all(sh.GetItemParent(sh.GetItemByDataNode(n)) == study for n in (out, unc))
    assert a["DICOM.SeriesDescription"].startswith("Denoised (dualnet")
    assert b["DICOM.SeriesDescription"].startswith("Uncertainty (dualnet")
    assert len({a["DICOM.SeriesNumber"], b["DICOM.SeriesNumber"], "2", "1002"}) == 4
    # the noise branch's map has no DICOM form: a node of its own, not put in the study
    noise_map = maps["noise_map"]
    assert noise_map.GetID() not in (out.GetID(), unc.GetID())
    item = sh.GetItemByDataNode(noise_map)
    assert not item or sh.GetItemParent(item) != study


def test_denoise_logic_leaves_a_scene_without_dicom_alone(scene):
    """No DICOM input, no subject hierarchy: the logic adds none (and no study item)."""
    from DualNetDenoiseLib import nodes
    from DualNetDenoiseLib.logic import DenoiseLogicBase

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "plain")
    nodes.update_node_from_array(node, np.random.default_rng(0).normal(100, 10, (3, 16, 16)).astype(np.float32),
                                 np.eye(4))
    out = DenoiseLogicBase().process(node, None, modality="mri", method="gaussian", noiseLevel=5.0)
    assert out is not None and scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode") is None


def test_input_not_from_dicom_is_left_alone(scene):
    from DualNetDenoiseLib import nodes
    from DualNetDenoiseLib.dicomexport import place_in_source_study

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "plain")
    nodes.update_node_from_array(node, np.zeros((2, 4, 4), np.int16), np.eye(4))
    out = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "out")
    assert not place_in_source_study(scene, node, out)


def test_a_result_node_reused_for_a_non_dicom_input_leaves_the_study(scene, loaded_small_ct):
    """A's result node, in A's study with A's export attributes, reused for a plain input B: it kept
    A's patient and study, so *Export to DICOM* would have filed B's pixels under patient A."""
    from DualNetDenoiseLib import nodes
    from DualNetDenoiseLib.logic import DenoiseLogicBase

    node, study = loaded_small_ct
    out = DenoiseLogicBase().process(node, None, modality="ct", method="gaussian", noiseLevel=25.0)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = sh.GetItemByDataNode(out)
    assert sh.GetItemParent(item) == study
    plain = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "plain")
    nodes.update_node_from_array(plain, nodes.array_from_node(node).astype(np.float32), np.eye(4))
    DenoiseLogicBase().process(plain, out, modality="ct", method="gaussian", noiseLevel=25.0)
    assert sh.GetItemByDataNode(out) == item and sh.GetItemParent(item) == sh.GetSceneItemID()
    assert not [n for n in sh.GetItemAttributeNames(item) if n.startswith("DICOM.")]


def test_the_panel_makes_a_new_node_for_another_inputs_result(scene, loaded_small_ct):
    """The panel's run (newNodesForOtherResults): A's result node left selected for input B is not
    overwritten; B's result goes to a new node outside any study (a script's explicit node is used as given,
    above)."""
    from DualNetDenoiseLib import nodes
    from DualNetDenoiseLib.logic import DenoiseLogicBase

    node, study = loaded_small_ct
    out = DenoiseLogicBase().process(node, None, modality="ct", method="gaussian", noiseLevel=25.0)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    plain = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "plain")
    nodes.update_node_from_array(plain, nodes.array_from_node(node).astype(np.float32), np.eye(4))
    before = nodes.array_from_node(out).copy()
    again = DenoiseLogicBase().process(plain, out, modality="ct", method="gaussian", noiseLevel=25.0,
                                       newNodesForOtherResults=True)
    assert again is not out and np.array_equal(nodes.array_from_node(out), before)
    assert sh.GetItemParent(sh.GetItemByDataNode(out)) == study


@pytest.mark.parametrize("reverse", [False, True])
def test_export_full_derived_series_from_the_node(scene, loaded_ct, tmp_path, reverse):
    from DualNetDenoiseLib.dicomexport import export_derived_series

    require_tool("dciodvfy")
    node, _, files, src = loaded_ct
    before = tree_hashes(src)
    out, expected = denoised_node(scene, node, reverse)
    derived = export_derived_series(scene, node, out, tmp_path / "export", fileForInstance=files.get)
    assert len(derived.files) == 28
    errors, _ = dciodvfy(derived.files, "Slicer node export")
    assert not errors, errors[:10]
    uid_index = {uid: k for k, uid in enumerate(files)}  # node slice k <- files in GDCM order
    for f in derived.files:
        ds = pydicom.dcmread(str(f))
        uid = str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
        h = pydicom.dcmread(files[uid], stop_before_pixels=True)
        assert ds.ImagePositionPatient == h.ImagePositionPatient and ds.ImageOrientationPatient == h.ImageOrientationPatient
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"] and ds.StudyInstanceUID == h.StudyInstanceUID
        assert np.abs(modality_values(ds) - expected[uid_index[uid]]).max() <= 0.5 + 1e-6
    assert tree_hashes(src) == before


def test_export_uses_the_nodes_series_tags_or_avoids_the_studys_numbers(scene, loaded_ct, tmp_path):
    """The full export numbered the series source + 1000 whatever the study held (1002, which another
    series of this study has), and ignored the number and description the node carries for *Export
    to DICOM* (set by place_in_source_study, possibly edited by the user)."""
    from DualNetDenoiseLib.dicomexport import export_derived_series, place_in_source_study

    node, _, files, _ = loaded_ct
    out, _ = denoised_node(scene, node)
    plain = export_derived_series(scene, node, out, tmp_path / "plain", fileForInstance=files.get)
    assert plain.series_number == 2002 and plain.description == "Denoised (gaussian)"  # 1002 is taken
    assert place_in_source_study(scene, node, out)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = sh.GetItemByDataNode(out)
    sh.SetItemAttribute(item, "DICOM.SeriesNumber", "77")
    sh.SetItemAttribute(item, "DICOM.SeriesDescription", "Denoised for review")
    placed = export_derived_series(scene, node, out, tmp_path / "placed", fileForInstance=files.get)
    assert (placed.series_number, placed.description) == (77, "Denoised for review")
    ds = pydicom.dcmread(str(placed.files[0]), stop_before_pixels=True)
    assert ds.SeriesNumber == 77 and ds.SeriesDescription == "Denoised for review"
