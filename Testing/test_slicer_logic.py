"""Slicer logic on a real MRML scene (``slicer-core`` wheel), outside the Slicer application.

What runs here for real: the MRML scene, ``vtkMRMLScalarVolumeNode`` / labelmap / segmentation /
table / plot nodes, ``vtkSlicerSegmentationsModuleLogic``, slicer-core's ``slicer.util``, Slicer's
own ``slicer.parameterNodeWrapper`` (an unmodified copy read from ``../shared/third_party/slicer``;
the tests fail, not skip, when it is missing), the ``DualNetDenoiseLib`` glue and the ``dualnet``
core (cheap ``gaussian`` method), in-process and in a child process.

What is stubbed, only where a module file (``DualNetDenoise.py`` / ``DualNetTraining.py``) is
imported (:func:`_install_gui_stubs`): the GUI layer the wheel lacks - ``qt``, ``ctk``, Slicer's Qt
widget classes, ``slicer.i18n``, ``slicer.app`` and ``slicer.ScriptedLoadableModule`` (whose
``getParameterNode`` reproduces Slicer's singleton parameter node). The panels' ``setup()`` runs
with fake widgets named after the .ui files; binding real widgets is left to the in-Slicer
self-test (docs/SLICER.md). Each other stand-in (installers, Windows ``subprocess`` parts, child
processes) is named in the docstring of the test that uses it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import pytest

try:
    import slicer
except ImportError:  # the pure-Lib tests below still run
    slicer = None
HAVE_MRML = slicer is not None and hasattr(slicer, "vtkMRMLScene")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DualNetDenoise"))

from DualNetDenoiseLib import nodes  # noqa: E402
from DualNetDenoiseLib.logic import DenoiseJob, DenoiseLogicBase, result_summary  # noqa: E402


def oblique_matrix() -> np.ndarray:
    """A non-trivial IJK-to-RAS: rotated about two axes, anisotropic voxels, offset origin."""
    a, b = 0.35, -0.2
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    m = np.eye(4)
    m[:3, :3] = rz @ rx @ np.diag([0.7, 1.3, 2.9])
    m[:3, 3] = [12.5, -33.25, 47.0]
    return m


@pytest.fixture(autouse=True)
def _one_thread_children(monkeypatch):
    """Child processes (worker.py) inherit this: no thread oversubscription on small shared machines."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def scene():
    if not HAVE_MRML:
        pytest.skip("slicer-core wheel not installed (pip install slicer-core vtk==<its pin>)")
    s = slicer.vtkMRMLScene()
    yield s
    s.Clear(1)


@pytest.fixture
def mri_node(scene, mri_crop):
    """16 slices of the real T1 crop with added Gaussian noise (sigma 60, about 5 % of the range)."""
    rng = np.random.default_rng(1)
    noisy = mri_crop[:16] + rng.normal(0.0, 60.0, mri_crop[:16].shape)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "T1 crop")
    nodes.update_node_from_array(node, np.clip(noisy, 0, None).astype(np.int16), oblique_matrix())
    return node


def array_checksum(node) -> tuple:
    arr = nodes.array_from_node(node, copy=False)
    return arr.shape, arr.dtype.str, float(arr.astype(np.float64).sum()), hash(arr.tobytes())


# ------------------------------------------------------------------------------- geometry
def test_array_order_is_kji(scene):
    arr = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)  # (z, y, x)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    nodes.update_node_from_array(node, arr, np.eye(4))
    image = node.GetImageData()
    assert image.GetDimensions() == (5, 4, 3)
    assert image.GetScalarComponentAsDouble(4, 2, 1, 0) == arr[1, 2, 4]
    assert np.array_equal(nodes.array_from_node(node), arr)


def test_ras_lps_conversion_matches_simpleitk_physical_points(scene):
    """Independent reference: SimpleITK maps index -> LPS point; Slicer's matrix maps IJK -> RAS."""
    m = oblique_matrix()
    spacing, origin, direction = nodes.itk_geometry_from_ijk_to_ras(m)
    assert np.allclose(spacing, [0.7, 1.3, 2.9])
    from dualnet.io import Volume

    img = Volume(np.zeros((4, 5, 6), np.float32), spacing, origin, direction).to_sitk()
    for ijk in [(0, 0, 0), (5, 4, 3), (2, 1, 3)]:
        lps = np.array(img.TransformIndexToPhysicalPoint(ijk))
        ras = (m @ np.array([*ijk, 1.0]))[:3]
        assert np.allclose(lps * [-1, -1, 1], ras, atol=1e-9)
    assert np.allclose(nodes.ijk_to_ras_from_itk_geometry(spacing, origin, direction), m, atol=1e-12)


def test_node_volume_round_trip_keeps_geometry(scene, mri_node):
    vol = nodes.volume_from_node(mri_node)
    assert vol.array.shape == nodes.array_from_node(mri_node).shape
    out = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    nodes.update_node_from_volume(out, vol)
    assert np.allclose(nodes.get_ijk_to_ras(out), oblique_matrix(), atol=1e-12)
    assert np.array_equal(nodes.array_from_node(out), nodes.array_from_node(mri_node))
    with pytest.raises(ValueError):
        nodes.itk_geometry_from_ijk_to_ras(np.diag([1.0, 0.0, 1.0, 1.0]))


def test_file_round_trip_through_core_io(scene, mri_node, tmp_path):
    """Node -> NRRD (core writer, LPS) -> node: what the child-process path relies on."""
    from dualnet.io import read_volume, write_volume

    write_volume(nodes.volume_from_node(mri_node), tmp_path / "v.nrrd")
    back = read_volume(tmp_path / "v.nrrd")
    m = nodes.ijk_to_ras_from_itk_geometry(back.spacing, back.origin, back.direction)
    assert np.allclose(m, oblique_matrix(), atol=1e-5)


# ------------------------------------------------------------------------------- denoising
def test_process_in_process_gaussian(scene, mri_node):
    before = array_checksum(mri_node)
    logic = DenoiseLogicBase()
    fractions = []
    out = logic.process(mri_node, None, modality="mri", method="gaussian", device="cuda",  # the panel's choice: unused
                        progressCallback=lambda f, m: fractions.append(f))
    assert out is not mri_node and out.GetName() == "T1 crop denoised (gaussian)"
    assert np.array_equal(nodes.get_ijk_to_ras(out), nodes.get_ijk_to_ras(mri_node))  # bit for bit
    assert array_checksum(mri_node) == before  # input untouched
    a_in = nodes.array_from_node(mri_node).astype(np.float64)
    a_out = nodes.array_from_node(out).astype(np.float64)
    assert a_out.shape == a_in.shape
    # smoother: the high-frequency residual (Laplacian energy) drops
    lap = lambda a: np.abs(np.diff(a, 2, axis=2)).mean()
    assert lap(a_out) < 0.8 * lap(a_in)
    assert abs(a_out.mean() - a_in.mean()) < 0.05 * abs(a_in.mean())
    assert out.GetAttribute("DualNet.method") == "gaussian"
    params = json.loads(out.GetAttribute("DualNet.parameters"))
    assert params["modality"] == "mri" and params["method"] == "gaussian" and params["tta"] is None
    assert params["device"] == "auto"  # network-only, like the model: not passed to a classical method
    assert params["info"]["sigma"] > 0  # estimated by the core, recorded
    assert out.GetAttribute("DualNet.sourceNodeID") == mri_node.GetID()
    assert fractions and fractions[-1] == pytest.approx(1.0)
    # a second run into the same output node reuses it
    again = logic.process(mri_node, out, modality="mri", method="gaussian", noiseLevel=5.0)
    assert again is out and json.loads(out.GetAttribute("DualNet.parameters"))["sigma"] == 5.0


def test_network_with_uncertainty_node(scene, mri_node, tmp_path):
    """DUAL-NET path (an untrained tiny model saved by the core) with the uncertainty output node."""
    torch = pytest.importorskip("torch")
    from dualnet import modelfile
    from dualnet.models import build_model

    torch.manual_seed(0)
    model = modelfile.save_model(tmp_path / "tiny.safetensors", build_model("tiny", dim=2), {
        "modality": "mri", "normalisation": {"method": "percentile", "p_low": 0.5, "p_high": 99.5}})
    small = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "two slices")
    nodes.update_node_from_array(small, nodes.array_from_node(mri_node)[:2, :32, :32], oblique_matrix())
    out = DenoiseLogicBase().process(small, None, modality="mri", method="dualnet", model=str(model), device="cpu",
                                     uncertainty=True)
    logic_unc = scene.GetFirstNodeByName("two slices uncertainty (dualnet)")
    assert logic_unc is not None and logic_unc.GetID() != out.GetID()
    for node in (out, logic_unc):
        assert np.array_equal(nodes.get_ijk_to_ras(node), oblique_matrix())
        assert nodes.array_from_node(node).shape == (2, 32, 32)
    assert (nodes.array_from_node(logic_unc) >= 0).all()
    params = json.loads(out.GetAttribute("DualNet.parameters"))
    assert params["uncertainty"] is True and out.GetAttribute("DualNet.model") == str(model)
    assert "inference_guard" in params["info"]  # the SURE guard's outcome is kept on the node
    with pytest.raises(ValueError, match="uncertainty volume must differ"):
        DenoiseLogicBase().process(small, out, method="dualnet", model=str(model), uncertainty=True,
                                   uncertaintyVolume=out)


def test_panel_noise_branch_maps(scene, mri_crop):
    """The panel's "noise-branch maps" (``nebMaps``): the shipped MRI model's per-voxel noise sigma and
    confidence come back as two new nodes on the input's geometry, in process and through the worker
    child process alike; given nodes are reused; a map node that is the output or the other map is
    refused; a classical method gives no maps. The sigma map follows the true noise (the real T1
    with Rician noise of known sigma)."""
    pytest.importorskip("torch")
    from dualnet.noise import add_rician

    clean = np.asarray(mri_crop[:12, :48, :48], dtype=np.float32)
    sigma = 0.05 * float(clean.max())
    noisy = add_rician(clean, sigma, np.random.default_rng(3)).astype(np.float32)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "noisy T1")
    nodes.update_node_from_array(node, noisy, oblique_matrix())
    logic = DenoiseLogicBase()
    out = logic.process(node, None, modality="mri", method="dualnet", device="cpu", views=1, nebMaps=True)
    sig_node = scene.GetFirstNodeByName("noisy T1 noise sigma (dualnet)")
    conf_node = scene.GetFirstNodeByName("noisy T1 noise-branch confidence (dualnet)")
    assert sig_node is not None and conf_node is not None
    assert logic.lastMapVolumes == {"noise_map": sig_node, "confidence": conf_node}
    fg = clean > 0.2 * clean.max()
    sig, conf = nodes.array_from_node(sig_node), nodes.array_from_node(conf_node)
    for n in (sig_node, conf_node):
        assert np.array_equal(nodes.get_ijk_to_ras(n), oblique_matrix()) and nodes.array_from_node(n).shape == noisy.shape
        assert n.GetAttribute("DualNet.sourceNodeID") == node.GetID()
    assert 0.6 < float(np.mean(sig[fg])) / sigma < 1.6
    assert conf.min() >= 0 and conf.max() <= 1
    assert json.loads(out.GetAttribute("DualNet.parameters"))["neb_maps"] is True
    # through the worker child process into the same nodes (reused, not duplicated)
    n_before = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    job = logic.process(node, out, modality="mri", method="dualnet", device="cpu", views=1, nebMaps=True,
                        noiseMapVolume=sig_node, confidenceVolume=conf_node, waitForCompletion=False)
    job.wait()
    assert job.error is None and job.noiseMapVolume is sig_node and job.confidenceVolume is conf_node
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == n_before
    assert np.allclose(nodes.array_from_node(sig_node), sig, rtol=1e-4, atol=1e-4 * sigma)
    with pytest.raises(ValueError, match="noise sigma volume must differ from the input and output"):
        logic.process(node, out, method="dualnet", nebMaps=True, noiseMapVolume=out)
    with pytest.raises(ValueError, match="confidence volume must differ from the noise sigma volume"):
        logic.process(node, None, method="dualnet", nebMaps=True, noiseMapVolume=sig_node, confidenceVolume=sig_node)
    logic.process(node, out, modality="mri", method="gaussian", nebMaps=True)
    assert logic.lastMapVolumes == {} and json.loads(out.GetAttribute("DualNet.parameters"))["neb_maps"] is False


def test_panel_views_reach_the_core(scene, mri_node, tmp_path):
    """The panel's "one slice orientation" choice (``views``) reaches the core: by default a model
    whose card allows it runs in three views on a near-isotropic volume, ``views=1`` in one; the
    choice is kept on the output node. (The checkbox itself is Qt: not run here.)"""
    torch = pytest.importorskip("torch")
    from dualnet import modelfile
    from dualnet.models import build_model

    torch.manual_seed(0)
    model = modelfile.save_model(tmp_path / "tiny.safetensors", build_model("tiny", dim=2), {
        "modality": "mri", "normalisation": {"method": "percentile", "p_low": 0.5, "p_high": 99.5},
        "orthogonal_views": True})
    iso = np.diag([2.0, 2.0, 2.0, 1.0])
    iso[:3, 3] = [12.5, -33.25, 47.0]
    seen = {}
    for name, matrix, views in (("iso", iso, None), ("iso", iso, 1), ("oblique", oblique_matrix(), None)):
        cube = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        nodes.update_node_from_array(cube, nodes.array_from_node(mri_node)[:16, :32, :32], matrix)
        out = DenoiseLogicBase().process(cube, None, modality="mri", method="dualnet", model=str(model),
                                         device="cpu", views=views)
        params = json.loads(out.GetAttribute("DualNet.parameters"))
        seen[name, views] = (params["views"], params["info"]["inference_views"])
    # the oblique node's voxels are 0.7 x 1.3 x 2.9 mm: the node's spacing reaches the core, one view
    assert seen == {("iso", None): (None, 3), ("iso", 1): (1, 1), ("oblique", None): (None, 1)}
    with pytest.raises(ValueError, match="views must be 1 or 3"):
        DenoiseLogicBase().process(mri_node, None, method="dualnet", model=str(model), views=2)


def test_process_refuses_to_overwrite_input(scene, mri_node):
    before = array_checksum(mri_node)
    with pytest.raises(ValueError, match="never overwritten"):
        DenoiseLogicBase().process(mri_node, mri_node, method="gaussian")
    with pytest.raises(ValueError, match="unknown method"):
        DenoiseLogicBase().process(mri_node, None, method="nonsense")
    assert array_checksum(mri_node) == before


def test_single_slice_volume(scene, us_image):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "US frame")
    arr = us_image.array[200:264, 200:280][np.newaxis].astype(np.uint8)
    nodes.update_node_from_array(node, arr, oblique_matrix())
    assert nodes.volume_from_node(node).array.ndim == 2
    out = DenoiseLogicBase().process(node, None, modality="us", method="median")
    assert nodes.array_from_node(out).shape == arr.shape
    assert np.array_equal(nodes.get_ijk_to_ras(out), oblique_matrix())


def test_process_in_child_process_matches_in_process(scene, mri_node):
    logic = DenoiseLogicBase(pythonExecutable=sys.executable)
    ref = logic.process(mri_node, None, method="gaussian", noiseLevel=20.0)
    child = logic.process(mri_node, None, method="gaussian", noiseLevel=20.0, inProcess=False)
    assert child is not ref
    assert np.array_equal(nodes.get_ijk_to_ras(child), nodes.get_ijk_to_ras(mri_node))
    assert np.allclose(nodes.array_from_node(child), nodes.array_from_node(ref), atol=1e-3)
    assert child.GetAttribute("DualNet.method") == "gaussian"


def test_async_job_progress_and_cancel(scene, mri_node):
    logic = DenoiseLogicBase(pythonExecutable=sys.executable)
    seen, finished = [], []
    job = logic.process(mri_node, None, method="gaussian", noiseLevel=20.0, waitForCompletion=False,
                        progressCallback=lambda f, m: seen.append(f), onFinished=finished.append)
    assert isinstance(job, DenoiseJob)
    job.wait(timeout=45)
    assert job.error is None and finished == [job]
    assert seen and seen[-1] == pytest.approx(1.0)
    assert nodes.array_from_node(job.outputVolume).shape == nodes.array_from_node(mri_node).shape

    out2 = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "should stay empty")
    job2 = logic.process(mri_node, out2, method="gaussian", noiseLevel=20.0, waitForCompletion=False)
    job2.cancel()
    job2.wait(timeout=20)
    assert job2.error == "cancelled by the user"
    assert out2.GetImageData() is None and out2.GetAttribute("DualNet.method") is None
    assert not Path(job2.workdir).exists()  # temporary files removed

    n_before = scene.GetNumberOfNodes()
    job3 = logic.process(mri_node, None, method="gaussian", noiseLevel=20.0, waitForCompletion=False)
    assert scene.GetNumberOfNodes() == n_before + 1  # the output node it created ...
    job3.cancel()
    job3.wait(timeout=20)
    assert job3.error and scene.GetNumberOfNodes() == n_before  # ... is removed again on cancel


def test_a_background_result_is_discarded_when_its_nodes_left_the_scene(scene, mri_node):
    """A child-process run whose output node was deleted meanwhile said "Done" and lost the result;
    one whose input was deleted wrote the output and then failed on the maps; after a scene close
    the next scene's nodes (which reuse the old IDs) could be written. The result is now discarded
    with a one-line error, and nothing in the scene is written."""
    logic = DenoiseLogicBase(pythonExecutable=sys.executable)
    out = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "chosen output")
    job = logic.process(mri_node, out, method="gaussian", noiseLevel=20.0, waitForCompletion=False)
    scene.RemoveNode(out)
    job.wait(timeout=45)
    assert job.error == "ValueError: the output volume was removed from the scene during the run; the result was discarded"
    assert not Path(job.workdir).exists()

    job = logic.process(mri_node, None, method="gaussian", noiseLevel=20.0, waitForCompletion=False)
    scene.Clear(0)  # File > Close scene
    newer = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "next scene's volume")
    nodes.update_node_from_array(newer, np.zeros((4, 8, 8), np.float32), np.eye(4))
    job.wait(timeout=45)
    assert job.error and "removed from the scene" in job.error
    assert newer.GetAttribute("DualNet.method") is None and not nodes.array_from_node(newer).any()
    volumes = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    assert [volumes.GetItemAsObject(i).GetName() for i in range(volumes.GetNumberOfItems())] == ["next scene's volume"]


def test_results_follow_the_inputs_parent_transform(scene, mri_node):
    """The output was given the input's IJK-to-RAS but not its parent transform, so it appeared
    elsewhere than the input (Slicer's CLI runner places outputs under the reference's transform)."""
    import vtk

    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 50.0)
    transform.SetMatrixTransformToParent(shift)
    mri_node.SetAndObserveTransformNodeID(transform.GetID())
    out = DenoiseLogicBase().process(mri_node, None, method="gaussian", noiseLevel=20.0)
    assert out.GetTransformNodeID() == transform.GetID()


def test_start_failure_leaves_no_node_and_no_temporary_folder(scene, mri_node, tmp_path, monkeypatch):
    """No interpreter to run the worker: the output node created for the run and the staged input
    were left behind."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    logic = DenoiseLogicBase(pythonExecutable=str(tmp_path / "missing" / "PythonSlicer"))
    n_before = scene.GetNumberOfNodes()
    with pytest.raises(OSError):
        logic.process(mri_node, None, method="gaussian", noiseLevel=20.0, waitForCompletion=False)
    assert scene.GetNumberOfNodes() == n_before and list(tmp_path.iterdir()) == []


def test_classical_results_name_no_model_and_errors_name_the_volume(scene, mri_node):
    logic = DenoiseLogicBase(pythonExecutable=sys.executable)
    out = logic.process(mri_node, None, method="gaussian", noiseLevel=20.0, model="/models/knee.safetensors")
    assert out.GetAttribute("DualNet.model") == ""
    assert json.loads(out.GetAttribute("DualNet.parameters"))["model"] is None
    flat = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "flat scan")
    nodes.update_node_from_array(flat, np.full((4, 6, 6), 7.0, np.float32), np.eye(4))
    job = logic.process(flat, None, method="gaussian", waitForCompletion=False)  # the noise cannot be estimated
    job.wait(timeout=45)
    assert job.error and job.error.startswith("flat scan:") and "DualNet-" not in job.error


def test_failures_are_reported_and_leave_no_empty_node(scene, mri_node):
    from dualnet.errors import DualNetError

    logic = DenoiseLogicBase(pythonExecutable=sys.executable)
    n_before = scene.GetNumberOfNodes()
    with pytest.raises(DualNetError, match="model file not found"):
        logic.process(mri_node, None, method="dualnet", model="/nonexistent/model.safetensors", inProcess=False)
    with pytest.raises(DualNetError, match="model file not found"):
        logic.process(mri_node, None, method="dualnet", model="/nonexistent/model.safetensors")
    assert scene.GetNumberOfNodes() == n_before


# ------------------------------------------------------------------------------- Dice
def _labelmap(scene, name, arr, matrix):
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
    nodes.update_node_from_array(node, arr.astype(np.int16), matrix)
    return node


def _two_label_maps():
    a = np.zeros((10, 24, 24), np.int16)
    a[2:8, 4:14, 4:14] = 1
    a[2:8, 14:20, 10:20] = 2
    b = a.copy()
    b[2:8, 4:14, 4:8] = 0  # label 1 loses 4/10 of its width
    b[0:2, 0:3, 0:3] = 3  # label only in B
    return a, b


def _dice(a, b, lab):
    x, y = a == lab, b == lab
    return 2 * (x & y).sum() / (x.sum() + y.sum())


def _table_rows(table_node):
    t = table_node.GetTable()
    return [[t.GetValue(r, c).ToString() for c in range(t.GetNumberOfColumns())] for r in range(t.GetNumberOfRows())]


def test_dice_on_labelmap_nodes(scene):
    a, b = _two_label_maps()
    na, nb = _labelmap(scene, "A", a, oblique_matrix()), _labelmap(scene, "B", b, oblique_matrix())
    table = DenoiseLogicBase().computeDice(na, nb)
    rows = {int(r[0]): r for r in _table_rows(table)}
    assert set(rows) == {1, 2, 3}
    for lab in (1, 2, 3):
        assert float(rows[lab][2]) == pytest.approx(_dice(a, b, lab), abs=1e-9)
    assert int(rows[1][3]) == (a == 1).sum() and int(rows[1][4]) == (b == 1).sum()
    assert table.GetTable().GetColumnName(2) == "Dice"


def test_dice_refuses_mismatched_geometry(scene):
    from dualnet.errors import InputError

    a, b = _two_label_maps()
    shifted = oblique_matrix()
    shifted[:3, 3] += 5.0
    with pytest.raises(InputError):
        DenoiseLogicBase().computeDice(_labelmap(scene, "A", a, oblique_matrix()), _labelmap(scene, "B", b, shifted))


def test_dice_on_segmentation_nodes_matches_labelmaps(scene):
    a, b = _two_label_maps()
    m = oblique_matrix()
    ref = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "reference")
    nodes.update_node_from_array(ref, np.zeros(a.shape, np.float32), m)
    segs = []
    for name, arr in (("segA", a), ("segB", b)):
        lm = _labelmap(scene, name + "_lm", arr, m)
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        seg.SetReferenceImageGeometryParameterFromVolumeNode(ref)
        assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lm, seg)
        segs.append(seg)
    names = DenoiseLogicBase.segmentNames(segs[1])
    assert len(names) == 3
    table = DenoiseLogicBase().computeDice(segs[0], segs[1], referenceVolume=ref)
    rows = _table_rows(table)
    by_name = {r[1]: float(r[2]) for r in rows}
    # segments are matched by name; imported segments are named after their label values
    seg_names_a = list(DenoiseLogicBase.segmentNames(segs[0]).values())
    assert len(rows) == 3 and set(seg_names_a) <= set(by_name)
    assert sorted(by_name.values()) == pytest.approx(sorted([_dice(a, b, 1), _dice(a, b, 2), 0.0]), abs=1e-9)
    n_before = scene.GetNumberOfNodes()
    DenoiseLogicBase().computeDice(segs[0], segs[1], tableNode=table, referenceVolume=ref)
    assert scene.GetNumberOfNodes() == n_before  # temporary labelmaps removed, table reused
    # without an explicit reference: the first segmentation's reference geometry is used
    again = DenoiseLogicBase().computeDice(segs[0], segs[1])
    assert sorted(float(r[2]) for r in _table_rows(again)) == pytest.approx(sorted(by_name.values()), abs=1e-9)


def test_dice_of_overlapping_segments(scene):
    """An organ with a lesion inside it (overlapping segments, as in manual work): all segments were
    exported into one labelmap, where the lesion overwrote the organ; two identical livers read 0.96."""
    ref = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ref")
    nodes.update_node_from_array(ref, np.zeros((10, 30, 30), np.float32), np.eye(4))
    liver = np.zeros((10, 30, 30), np.int16)
    liver[2:8, 5:25, 5:25] = 1
    tumour_a, tumour_b = np.zeros_like(liver), np.zeros_like(liver)
    tumour_a[3:7, 8:14, 8:14] = 1
    tumour_b[3:7, 10:16, 10:16] = 1

    def segmentation(name, parts):
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        node.SetReferenceImageGeometryParameterFromVolumeNode(ref)
        for part, arr in parts:
            lm = _labelmap(scene, part, arr, np.eye(4))
            k = node.GetSegmentation().GetNumberOfSegments()
            assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lm, node)
            node.GetSegmentation().GetNthSegment(k).SetName(part)
            scene.RemoveNode(lm)
        return node

    a = segmentation("A", [("liver", liver), ("tumour", tumour_a)])
    b = segmentation("B", [("liver", liver), ("tumour", tumour_b)])
    rows = {r[1]: r for r in _table_rows(DenoiseLogicBase().computeDice(a, b, referenceVolume=ref))}
    assert float(rows["liver"][2]) == pytest.approx(1.0) and int(rows["liver"][3]) == int(liver.sum())
    overlap = np.logical_and(tumour_a, tumour_b).sum()
    assert float(rows["tumour"][2]) == pytest.approx(2 * overlap / (tumour_a.sum() + tumour_b.sum()))


def test_a_reused_output_is_renamed_for_the_method_and_warnings_reach_the_status(scene, mri_node):
    from DualNetDenoiseLib.logic import result_summary

    logic = DenoiseLogicBase()
    out = logic.process(mri_node, None, modality="mri", method="gaussian")
    assert out.GetName() == "T1 crop denoised (gaussian)"
    assert logic.process(mri_node, out, modality="mri", method="median") is out
    assert out.GetName() == "T1 crop denoised (median)"  # it said gaussian while holding the median result
    out.SetName("my result")
    logic.process(mri_node, out, modality="mri", method="gaussian")
    assert out.GetName() == "my result"  # a name the user gave stays
    text = result_summary({"seconds": 2, "warning": "model trained for mri, applied to ct"})
    assert "Warning: model trained for mri, applied to ct" in text


def test_dice_refuses_mixed_inputs(scene):
    a, _ = _two_label_maps()
    lm = _labelmap(scene, "A", a, np.eye(4))
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "S")
    with pytest.raises(ValueError, match="two segmentations or two labelmap"):
        DenoiseLogicBase().computeDice(seg, lm)


# ------------------------------------------------------------------------------- module files
#: Slicer's own ``slicer.parameterNodeWrapper`` (unmodified copy, Slicer licence), beside the checkout.
SLICER_THIRD_PARTY = REPO.parent / "shared" / "third_party" / "slicer"
#: Slicer widget classes the wrapper's GUI connectors name in annotations (Qt, absent from slicer-core).
SLICER_QT_WIDGETS = ("qMRMLNodeComboBox", "qMRMLRangeWidget", "qMRMLSliderWidget", "qMRMLSpinBox", "qSlicerWidget",
                     "qMRMLWidget")
_WRAPPER = {}


def _qt_stub(name: str) -> types.ModuleType:
    """A stand-in for the ``qt`` / ``ctk`` Python modules: every attribute is a distinct empty class.

    Slicer's wrapper only needs the widget classes to exist at import time (annotations, a
    ``QColor`` subclass); binding real widgets needs Qt and is left to the in-Slicer self-test.
    """
    module = types.ModuleType(name)
    classes = {}

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return classes.setdefault(attr, type(attr, (), {"__module__": name}))

    module.__getattr__ = __getattr__
    return module


def real_parameter_node_wrapper() -> types.ModuleType:
    """Import Slicer's real ``slicer.parameterNodeWrapper`` from ``../shared/third_party/slicer``.

    Only ``qt``, ``ctk`` and the Slicer Qt widget classes are stubbed, and only while it is
    imported; serializers, validators, defaults and the wrapper itself are Slicer's code, working
    on slicer-core's real ``vtkMRMLScriptedModuleNode``.
    """
    if not HAVE_MRML:
        pytest.skip("slicer-core wheel not installed (pip install slicer-core vtk==<its pin>)")
    folder = SLICER_THIRD_PARTY / "parameterNodeWrapper"
    if not (folder / "__init__.py").is_file():
        pytest.fail(f"Slicer's parameterNodeWrapper not found at {folder}: check out ../shared beside this "
                    f"repository (see docs/SLICER.md); without it the Slicer parameter nodes are untested")
    if "module" not in _WRAPPER:
        import importlib.util

        saved = {name: sys.modules.get(name) for name in ("qt", "ctk")}
        added = [w for w in SLICER_QT_WIDGETS if not hasattr(slicer, w)]
        sys.modules["qt"], sys.modules["ctk"] = _qt_stub("qt"), _qt_stub("ctk")
        for w in added:
            setattr(slicer, w, type(w, (), {}))
        try:
            spec = importlib.util.spec_from_file_location(
                "slicer.parameterNodeWrapper", folder / "__init__.py", submodule_search_locations=[str(folder)])
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop("slicer.parameterNodeWrapper", None)
            raise
        finally:
            for name, old in saved.items():
                if old is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = old
            for w in added:
                delattr(slicer, w)
        _WRAPPER["module"] = module
    return _WRAPPER["module"]


def _install_gui_stubs(monkeypatch, scene):
    """Import seams for the module files, which (as every scripted module) import Slicer's GUI layer.

    Real: ``slicer`` (slicer-core: MRML, ``slicer.util``), ``vtk``, Slicer's ``parameterNodeWrapper``.
    Stubbed, because the slicer-core wheel has no Qt application: ``qt``, ``ctk``, ``slicer.i18n``
    (identity), ``slicer.app`` (no main window), and ``slicer.ScriptedLoadableModule``, whose
    ``getParameterNode`` reproduces Slicer's (one singleton ``vtkMRMLScriptedModuleNode`` per module,
    tagged with the module name, in ``slicer.mrmlScene``) and whose widget base has a fake layout.
    """
    wrapper = real_parameter_node_wrapper()
    qt = _qt_stub("qt")
    qt.QTimer = _FakeTimer
    ctk = _qt_stub("ctk")
    ctk.ctkPathLineEdit = type("ctkPathLineEdit", (), {"Dirs": 1})  # a filter flag (set on a fake widget)
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    slm.ScriptedLoadableModuleLogic = _SlicerLikeLogic
    slm.ScriptedLoadableModule = _SlicerLikeModule
    slm.ScriptedLoadableModuleWidget = _SlicerLikeWidget
    import unittest

    slm.ScriptedLoadableModuleTest = type("ScriptedLoadableModuleTest", (unittest.TestCase,),
                                          {"delayDisplay": lambda self, message, msec=None: None})
    app = types.SimpleNamespace(commandOptions=lambda: types.SimpleNamespace(noMainWindow=True),
                                connect=lambda *args: None)
    for name, mod in (("qt", qt), ("ctk", ctk), ("slicer.i18n", i18n), ("slicer.ScriptedLoadableModule", slm),
                      ("slicer.parameterNodeWrapper", wrapper)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)


class _SlicerLikeLogic:
    """``ScriptedLoadableModuleLogic`` as in Slicer: singleton parameter node named after the module."""

    def __init__(self, parent=None):
        name = type(self).__name__
        self.moduleName = name[:-5] if name.endswith("Logic") else name
        self.isSingletonParameterNode = True

    def getParameterNode(self):
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is not None:
            return node
        node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.SetSingletonTag(self.moduleName)
        node.SetAttribute("ModuleName", self.moduleName)
        node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
        return slicer.mrmlScene.AddNode(node)


class _SlicerLikeModule:
    def __init__(self, parent):
        self.parent = parent
        self.moduleName = type(self).__name__


class _FakeWidget:
    """Stand-in for a Qt widget: keeps attributes set on it, records method calls, binds no parameter
    (``property('SlicerParameterName')`` is None: binding widgets needs Qt, see test_ui_files.py)."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.calls.append((name, args))

    def property(self, name):
        return None

    def blockSignals(self, block):
        return False

    def findData(self, data):
        return -1

    def itemData(self, index):
        return ""


class _FakeUi:
    """``slicer.util.childWidgetVariables`` of a .ui file: one fake widget per widget name in the file;
    any other name raises AttributeError, as on the real object."""

    def __init__(self, ui_file: Path):
        import xml.etree.ElementTree as ET

        for w in ET.parse(ui_file).getroot().iter("widget"):
            setattr(self, w.get("name"), _FakeWidget())


class _SlicerLikeWidget:
    def __init__(self, parent=None):
        self.moduleName = type(self).__name__[:-len("Widget")]
        self.parent = parent or _FakeWidget()
        self.layout = _FakeWidget()

    def setup(self):
        pass

    def resourcePath(self, filename):
        return os.path.join(os.path.dirname(sys.modules[type(self).__module__].__file__), "Resources", filename)


class _FakeTimer:
    """``qt.QTimer`` driven by the test: :meth:`fire` calls the connected slot."""

    def __init__(self):
        self.slot, self.active = None, False

    def setInterval(self, msec):
        pass

    def connect(self, signal, slot):
        self.slot = slot

    def start(self):
        self.active = True

    def stop(self):
        self.active = False

    def fire(self):
        self.slot()


def _import_module_file(monkeypatch, scene, name: str):
    """Import ``<name>/<name>.py`` fresh with the seams of :func:`_install_gui_stubs`."""
    _install_gui_stubs(monkeypatch, scene)
    for module_name in ("DualNetDenoise", "DualNetTraining"):
        monkeypatch.delitem(sys.modules, module_name, raising=False)
    monkeypatch.syspath_prepend(str(REPO / name))
    import importlib

    module = importlib.import_module(name)
    # removed from sys.modules again at teardown
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_real_parameter_node_wrapper_refuses_a_union_without_none(scene):
    """Issue 10, defect 1, at its root: Slicer's wrapper cannot write the default None of
    ``Union[A, B]`` on a fresh node (``TypeError: Unable to write value 'None'``), so the panel's
    ``getParameterNode()`` - and ``setup()`` - failed; ``Union[A, B, None]`` works."""
    pnw = real_parameter_node_wrapper()
    from typing import Union

    from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode

    def wrapped(name, annotation):  # annotations as objects: this file uses postponed (string) annotations
        return pnw.parameterNodeWrapper(type(name, (), {"__annotations__": {"dice": annotation}}))

    Wrong = wrapped("Wrong", Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode])
    Right = wrapped("Right", Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None])
    with pytest.raises(TypeError, match="Unable to write value 'None'"):
        Wrong(scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode"))
    assert Right(scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")).dice is None


def _check_parameters(p, node, valid: dict, invalid: dict) -> None:
    """Set every valid value and read it back (also through a second wrapper on the same node, i.e.
    from the MRML node itself); every invalid value must be refused and leave the old value."""
    assert set(valid) == set(type(p).allParameters), "every parameter must be listed in the test"
    for name, values in valid.items():
        for value in values:
            setattr(p, name, value)
            again = getattr(type(p)(node), name)
            if hasattr(value, "GetID"):
                assert getattr(p, name).GetID() == value.GetID() and again.GetID() == value.GetID(), name
            else:
                assert getattr(p, name) == value and again == value, (name, value)
    for name, values in invalid.items():
        before = getattr(p, name)
        for value in values:
            with pytest.raises((TypeError, ValueError)):
                setattr(p, name, value)
            assert getattr(p, name) == before, (name, value)


def test_denoise_parameter_node_with_slicer_wrapper(monkeypatch, scene, mri_node):
    """DualNetDenoiseParameterNode built by Slicer's own wrapper on the real scene: defaults written to
    the node, every parameter set and read back (nodes, node unions with None, choices, ranges,
    strings), invalid values refused. Before the fix getParameterNode() raised (defect 1)."""
    module = _import_module_file(monkeypatch, scene, "DualNetDenoise")
    logic = module.DualNetDenoiseLogic()
    p = logic.getParameterNode()
    node = p.parameterNode
    assert node is scene.GetSingletonNode("DualNetDenoise", "vtkMRMLScriptedModuleNode")
    assert logic.getParameterNode().parameterNode is node  # one parameter node per scene
    raw = {n: node.GetParameter(n) for n in node.GetParameterNames()}
    assert raw["method"] == "dualnet" and raw["modality"] == "mri" and raw["device"] == "auto"
    assert raw["autoNoise"] == "True" and raw["tta"] == "auto" and float(raw["noiseLevel"]) == 0.0
    assert raw["oneView"] == "False"  # three views where they apply, as the command line
    assert p.inputVolume is None and p.diceInputA is None and p.diceInputB is None
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    lab = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    out = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    table = scene.AddNewNodeByClass("vtkMRMLTableNode")
    valid = {
        "inputVolume": [mri_node, None], "outputVolume": [out], "uncertaintyVolume": [out, None],
        "modality": module.MODALITIES, "method": module.METHODS, "device": module.DEVICES,
        "autoNoise": [False, True], "noiseLevel": [0.0, 12.5, 100000.0], "modelPath": ["/models/a.safetensors", ""],
        "tta": module.TTA_WORDS, "oneView": [True, False], "uncertainty": [True, False], "nebMaps": [True, False],
        "noiseMapVolume": [out, None], "confidenceVolume": [out, None],
        "diceInputA": [seg, lab, None], "diceInputB": [lab, seg, None], "diceTable": [table],
    }
    invalid = {
        "inputVolume": [table], "diceInputA": [mri_node, table], "diceTable": [mri_node],
        "modality": ["pet", None], "method": ["fast", None], "device": ["tpu"], "tta": ["x3", True],
        "noiseLevel": [-1.0, 1e6, None], "autoNoise": ["yes", None], "modelPath": [3],
    }
    _check_parameters(p, node, valid, invalid)
    assert node.GetParameter("method") == module.METHODS[-1]  # stored in the node, saved with the scene
    for saved, now in (("True", "x8"), ("False", "off")):  # a scene saved with the earlier TTA check box
        node.SetParameter("tta", saved)
        assert logic.getParameterNode().tta == now and node.GetParameter("tta") == now


@pytest.mark.parametrize("modality", ["mri", "ct", "us"])
def test_every_pretraining_preset_writes_a_config_that_trains(tmp_path, shared_data, modality):
    """The panel's pretraining copied the shipped config's own init_from (a cpu-preset model) and blocks
    into every preset: no modality and no preset could start. Each config is built and initialised, and
    the shipped preset continues the shipped model (its weights are the network's at step 0)."""
    from DualNetDenoiseLib import training
    from dualnet import modelfile
    from dualnet.training.config import load_config

    vol = {"mri": "mri/voxelmorph_brain_t1.nii.gz", "ct": "ct/totalseg_abdomen_ct.nii.gz",
           "us": "us/images/0001.png"}[modality]
    base = training.configs_dir() / f"pretrain_{modality}.toml"
    shipped = modelfile.default_model_path(modality)
    for preset in training.PRESETS:
        cfg = load_config(training.write_pretrain_config(base, [str(shared_data / vol)], tmp_path / f"{preset}.toml",
                                                         preset, init_model=shipped))
        assert cfg.time_budget_s in (None, 0, 0.0) and cfg.threads == 0
        if preset == "shipped":
            assert Path(cfg.init_from) == shipped.resolve() and cfg.preset == "cpu"
        else:
            assert not cfg.init_from and cfg.preset == preset and cfg.lr == training.SCRATCH_LR and not cfg.blocks
    with pytest.raises(ValueError, match="init_model"):
        training.write_pretrain_config(base, [str(shared_data / vol)], tmp_path / "x.toml", "shipped")


def test_training_parameter_node_with_slicer_wrapper(monkeypatch, scene, mri_node, tmp_path):
    module = _import_module_file(monkeypatch, scene, "DualNetTraining")
    p = module.DualNetTrainingLogic().getParameterNode()
    node = p.parameterNode
    raw = {n: node.GetParameter(n) for n in node.GetParameterNames()}
    assert raw["stage"] == "finetune" and raw["preset"] == "shipped" and raw["steps"] == "500"
    assert p.dataFolder == Path(".") and p.modelName == "my-dualnet" and p.lossChart is None
    valid = {
        "trainingVolume": [mri_node, None], "dataFolder": [tmp_path, Path()], "modality": module.MODALITIES,
        "stage": ["pretrain", "finetune"], "preset": ["tiny", "base", "shipped"], "steps": [1, 1000000],
        "device": module.DEVICES, "initModel": [tmp_path / "base.safetensors", Path()], "modelName": ["unit test"],
        "resume": [True, False], "lossTable": [scene.AddNewNodeByClass("vtkMRMLTableNode")],
        "lossChart": [scene.AddNewNodeByClass("vtkMRMLPlotChartNode")], "noiseSigma": [0.0, 12.5, 1e6],
    }
    invalid = {"steps": [0, 2.5, 1000001], "stage": ["distill"], "preset": ["huge"], "dataFolder": [str(tmp_path)],
               "noiseSigma": [-1.0, 2e6],
               "lossChart": [mri_node], "trainingVolume": [scene.AddNewNodeByClass("vtkMRMLTableNode")]}
    _check_parameters(p, node, valid, invalid)


@pytest.fixture
def fake_ui(monkeypatch):
    """``slicer.util.loadUI`` / ``childWidgetVariables`` stand-ins (they need Qt): the .ui path is
    recorded and must exist; the widgets are :class:`_FakeUi` built from that .ui file."""
    if not HAVE_MRML:
        pytest.skip("slicer-core wheel not installed (pip install slicer-core vtk==<its pin>)")
    loaded = []

    def load_ui(path):
        assert Path(path).is_file(), path
        loaded.append(Path(path))
        return _FakeWidget()

    monkeypatch.setattr(slicer.util, "loadUI", load_ui, raising=False)
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda widget: _FakeUi(loaded[-1]), raising=False)
    return loaded


def test_denoise_panel_setup_outside_qt(monkeypatch, scene, mri_crop, tmp_path, fake_ui):
    """The Slicer-like path of opening the panel on an empty scene: module class, widget ``setup()``
    (logic, models folder, parameter node with Slicer's wrapper and its defaults in the scene,
    ``connectGui``, GUI state), then entering it again with a volume loaded. Stubbed besides the
    import seams: the widgets (fake objects named after the .ui file) and ``device_summary`` (it
    would import torch: seconds). Before the fix ``setup()`` raised in getParameterNode (defect 1)."""
    module = _import_module_file(monkeypatch, scene, "DualNetDenoise")
    monkeypatch.setenv("DUALNET_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setattr(module.dependencies, "device_summary", lambda: "CPU only (stub)")
    parent = types.SimpleNamespace()
    module.DualNetDenoise(parent)
    assert parent.title == "DualNet Denoise" and parent.categories == ["Filtering.Denoising"]
    widget = module.DualNetDenoiseWidget()
    widget.setup()
    assert fake_ui == [REPO / "DualNetDenoise" / "Resources" / "UI" / "DualNetDenoise.ui"]
    p = widget._parameterNode
    assert p is not None and p.parameterNode is scene.GetSingletonNode("DualNetDenoise", "vtkMRMLScriptedModuleNode")
    assert set(p.parameterNode.GetParameterNames()) >= {"method", "modality", "noiseLevel", "autoNoise"}
    ui = widget.ui
    assert ui.applyButton.enabled is False and ui.computeDiceButton.enabled is False
    assert ("addItem", ("Shipped model for the modality", "")) in ui.modelComboBox.calls
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "T1")
    nodes.update_node_from_array(volume, mri_crop[:8].astype(np.int16), np.eye(4))
    widget.enter()  # the first volume becomes the input; its modality is guessed
    assert p.inputVolume is not None and p.inputVolume.GetID() == volume.GetID()
    assert ui.applyButton.enabled is True and ui.modalityGuessLabel.text.startswith("Guess: MRI")
    p.method = "gaussian"  # the GUI follows the parameter node
    assert ui.ttaComboBox.enabled is False and ui.noiseLevelSpinBox.enabled is False
    assert ui.nebMapsCheckBox.enabled is False and ui.noiseMapVolumeSelector.enabled is False
    p.method, p.nebMaps = "dualnet", True
    assert ui.nebMapsCheckBox.enabled is True and ui.confidenceVolumeSelector.enabled is True
    p.method = "gaussian"
    p.autoNoise = False
    assert ui.noiseLevelSpinBox.enabled is True
    p.method = "dualnet"  # the network takes the noise level too (its noise map and SURE guard)
    assert ui.noiseLevelSpinBox.enabled is True
    p.autoNoise = True
    assert ui.noiseLevelSpinBox.enabled is False
    p.autoNoise, p.noiseLevel = False, 5.0  # a level set for the T1 ...
    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "T1 again")
    nodes.update_node_from_array(other, mri_crop[8:16].astype(np.int16), np.eye(4))
    p.inputVolume = other  # ... is not carried to another volume (whose modality, and units, may differ)
    assert p.autoNoise is True and ui.noiseLevelSpinBox.enabled is False
    widget.cleanup()


def _denoise_widget(monkeypatch, scene, tmp_path, name: str, array):
    """The denoise panel set up on ``scene`` (Qt widgets stubbed) and entered with one volume ``name``
    holding ``array``, which becomes its input."""
    module = _import_module_file(monkeypatch, scene, "DualNetDenoise")
    monkeypatch.setenv("DUALNET_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setattr(module.dependencies, "device_summary", lambda: "CPU only (stub)")
    module.DualNetDenoise(types.SimpleNamespace())
    widget = module.DualNetDenoiseWidget()
    widget.setup()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    nodes.update_node_from_array(volume, np.asarray(array).astype(np.int16), np.eye(4))
    widget.enter()
    return widget


def test_denoise_panel_switch_during_a_run_keeps_the_results_apart(monkeypatch, scene, mri_crop, tmp_path, fake_ui):
    """Review, session 35: switching the input from A to B while A ran bound A's result to B's selectors
    (compare view of B beside A's result), and the next Apply overwrote A's result with B's under A's
    name. Stubbed: the Qt widgets; the runs are the real child process (``gaussian``)."""
    widget = _denoise_widget(monkeypatch, scene, tmp_path, "A", mri_crop[:8])
    widget.logic.pythonExecutable = sys.executable
    _gui_stubs(monkeypatch)
    monkeypatch.setattr(sys.modules["DualNetDenoise"], "showCompareView", lambda *a: None, raising=False)
    p = widget._parameterNode
    a = p.inputVolume
    b = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "B")
    nodes.update_node_from_array(b, mri_crop[8:16].astype(np.int16), np.eye(4))
    p.method, p.autoNoise, p.noiseLevel = "gaussian", False, 20.0
    widget.onApplyButton()
    job = widget._job
    p.inputVolume = b  # the user looks at the next series while A runs
    job.wait(timeout=60)
    assert job.outputVolume.GetName() == "A denoised (gaussian)" and p.outputVolume is None
    assert "the result of 'A'" in widget.ui.statusLabel.text
    before = nodes.array_from_node(job.outputVolume).copy()
    p.outputVolume = job.outputVolume  # even when left selected by hand, A's result is not overwritten
    p.autoNoise, p.noiseLevel = False, 20.0
    widget.onApplyButton()
    widget._job.wait(timeout=60)
    assert p.outputVolume is not job.outputVolume and p.outputVolume.GetName() == "B denoised (gaussian)"
    assert np.array_equal(nodes.array_from_node(job.outputVolume), before)
    assert job.outputVolume.GetAttribute("DualNet.sourceNodeID") == a.GetID()
    widget.cleanup()


def test_denoise_panel_a_failed_start_leaves_no_progress_bar(monkeypatch, scene, mri_crop, tmp_path, fake_ui):
    """tryWithErrorDisplay shows the error and re-raises it, so the panel's "did not start" branch never ran:
    a 0 % bar and "Starting..." stayed on screen."""
    widget = _denoise_widget(monkeypatch, scene, tmp_path, "A", mri_crop[:8])

    def refuse(*args, **kwargs):
        raise ValueError("no interpreter for the worker")

    monkeypatch.setattr(widget.logic, "process", refuse)
    _gui_stubs(monkeypatch)
    widget.onApplyButton()
    assert widget._job is None and widget.ui.statusLabel.text == ""
    visible = [args[0] for name, args in widget.ui.progressBar.calls if name == "setVisible"]
    assert visible[-1] is False
    widget.cleanup()


def _gui_stubs(monkeypatch) -> None:
    """What ``slicer.util.tryWithErrorDisplay`` needs of the application (stubbed: no Qt here)."""
    monkeypatch.setattr(slicer.app, "testingEnabled", lambda: True, raising=False)
    monkeypatch.setattr(slicer.app, "setOverrideCursor", lambda *a: None, raising=False)
    monkeypatch.setattr(slicer.app, "restoreOverrideCursor", lambda *a: None, raising=False)
    monkeypatch.setattr(sys.modules["qt"].Qt, "WaitCursor", 0, raising=False)
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda *a, **k: None, raising=False)


def test_denoise_panel_keeps_an_imported_scenes_settings(monkeypatch, scene, mri_crop, tmp_path, fake_ui):
    """A scene added to the open one (File > Add Data of a .mrml: a real MRML ``Import`` without a
    close) brings the panel's saved input volume, modality and noise level; the panel must not take
    the changed input for the user's switch to another volume. Before the fix it reset the noise to
    auto and guessed the modality again (the saved CT became MRI). Stubbed: the Qt widgets."""
    widget = _denoise_widget(monkeypatch, scene, tmp_path, "saved", mri_crop[:8])
    p = widget._parameterNode
    p.modality, p.autoNoise, p.noiseLevel = "ct", False, 7.0  # the user's choice for this volume, saved
    scene.SetSaveToXMLString(1)
    scene.Commit()
    xml = scene.GetSceneXMLString()
    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "other")
    nodes.update_node_from_array(other, mri_crop[8:16].astype(np.int16), np.eye(4))
    p.inputVolume = other  # a switch by the user: auto noise, modality guessed
    assert p.autoNoise is True and p.modality == "mri"
    scene.SetLoadFromXMLString(1)
    scene.SetSceneXMLString(xml)
    scene.Import()
    p = widget._parameterNode
    assert p.inputVolume is not None and p.inputVolume.GetName() == "saved"
    assert (p.modality, p.autoNoise, p.noiseLevel) == ("ct", False, 7.0)
    assert widget.ui.noiseLevelSpinBox.enabled is True
    newer = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "newer")
    nodes.update_node_from_array(newer, mri_crop[:8].astype(np.int16), np.eye(4))
    p.inputVolume = newer  # after the import a switch is a switch again
    assert p.autoNoise is True and p.modality == "mri"
    widget.cleanup()


def test_denoise_panel_switch_and_close_never_overwrite_another_volumes_result(monkeypatch, scene, mri_crop,
                                                                                tmp_path, fake_ui):
    """Choosing another input kept the previous result node selected, so the next Apply overwrote A's
    result with B's (under A's name and, for a DICOM input, in A's study). Closing the scene during a
    background run let the result land in the next scene's nodes. Stubbed: the Qt widgets; the run is
    the real child process (``gaussian``), driven by polling instead of the panel's QTimer."""
    widget = _denoise_widget(monkeypatch, scene, tmp_path, "A", mri_crop[:8])
    p = widget._parameterNode
    resultA = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "A denoised")
    unc = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "A uncertainty")
    p.outputVolume, p.uncertaintyVolume = resultA, unc  # as after a run on A
    b = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "B")
    nodes.update_node_from_array(b, mri_crop[8:16].astype(np.int16), np.eye(4))
    p.inputVolume = b
    assert p.outputVolume is None and p.uncertaintyVolume is None  # Apply makes new nodes for B

    logic = DenoiseLogicBase(pythonExecutable=sys.executable)
    widget._job = logic.process(b, None, method="gaussian", noiseLevel=20.0, waitForCompletion=False,
                                onFinished=widget.onFinished)
    scene.Clear(0)  # File > Close scene while it runs: the run is cancelled
    assert widget._job.runner.cancelled
    widget._job.wait(timeout=45)
    assert widget._job.error == "cancelled by the user" and widget.ui.statusLabel.text.startswith("Failed")
    widget.cleanup()


def test_training_panel_setup_outside_qt(monkeypatch, scene, tmp_path, fake_ui):
    module = _import_module_file(monkeypatch, scene, "DualNetTraining")
    monkeypatch.setattr(module.dependencies, "device_summary", lambda: "CPU only (stub)")
    widget = module.DualNetTrainingWidget()
    widget.setup()
    assert fake_ui == [REPO / "DualNetTraining" / "Resources" / "UI" / "DualNetTraining.ui"]
    p = widget._parameterNode
    assert p.parameterNode is scene.GetSingletonNode("DualNetTraining", "vtkMRMLScriptedModuleNode")
    assert widget.ui.startButton.text == "Start training" and widget.ui.startButton.enabled is False
    p.modelName = "x"
    p.dataFolder = tmp_path
    assert widget.ui.startButton.enabled is True and widget.ui.presetComboBox.enabled is False
    p.stage = "pretrain"
    assert widget.ui.presetComboBox.enabled is True
    widget.cleanup()


def test_module_file_logic_with_gui_seams_mocked(monkeypatch, scene, mri_node):
    module = _import_module_file(monkeypatch, scene, "DualNetDenoise")
    logic = module.DualNetDenoiseLogic()
    assert isinstance(logic, DenoiseLogicBase) and logic.interactive is False
    out = logic.process(mri_node, None, modality="mri", method="gaussian")
    assert np.array_equal(nodes.get_ijk_to_ras(out), nodes.get_ijk_to_ras(mri_node))
    assert out.GetAttribute("DualNet.method") == "gaussian"
    table = logic.computeDice(_labelmap(scene, "A", *_two_label_maps()[:1], np.eye(4)),
                              _labelmap(scene, "B", _two_label_maps()[1], np.eye(4)))
    assert table.GetTable().GetNumberOfRows() == 3
    assert set(module.METHODS) >= {"dualnet", "bm4d", "gaussian"}


@pytest.mark.parametrize("name", ["DualNetDenoise", "DualNetTraining"])
def test_in_slicer_self_tests_logic_parts(monkeypatch, scene, tmp_path, name):
    """Run each module's 'Reload and Test' self-test with the import seams, Slicer's wrapper and
    slicer-core's real slicer.util helpers on the real scene: it must pass outside Slicer too (minus widgets)."""
    monkeypatch.setenv("DUALNET_MODELS_DIR", str(tmp_path / "models"))
    module = _import_module_file(monkeypatch, scene, name)
    result = getattr(module, f"{name}Test")("runTest").run()
    problems = [str(e[1]) for e in result.errors + result.failures]
    assert result.wasSuccessful(), "\n".join(problems)
    assert result.testsRun == 1


# ------------------------------------------------------------------------------- pure Lib pieces
LIB = REPO / "DualNetDenoise" / "DualNetDenoiseLib"


def test_lib_has_no_top_level_gui_imports():
    """The Lib must import without Qt/Slicer application (they are only imported inside functions)."""
    import ast

    for f in sorted(LIB.glob("*.py")):
        for node in ast.parse(f.read_text(encoding="utf-8")).body:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            bad = [n for n in names if n.split(".")[0] in ("qt", "ctk", "slicer", "PythonQt", "vtk", "torch")]
            assert not bad, f"{f.name}: top-level import of {bad}"


def test_modality_guess(mri_volume, ct_volume, us_image):
    from DualNetDenoiseLib.modality import guess_modality

    assert guess_modality(None, dicom_modality="MR")[0] == "mri"
    assert guess_modality(None, dicom_modality="CT ")[0] == "ct"
    assert guess_modality(None, metadata={"0008|0060": "US"})[0] == "us"
    assert guess_modality(ct_volume.array)[0] == "ct"  # real CT in HU
    assert guess_modality(mri_volume.array)[0] == "mri"  # real T1
    assert guess_modality(us_image.array)[0] == "us"  # real B-mode frame
    mod, reason = guess_modality(ct_volume.array, dicom_modality="PT")  # unknown tag: intensities decide
    assert mod == "ct" and "Hounsfield" in reason


def _fake_model(folder: Path, name: str, modality="mri") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    w = folder / f"{name}.safetensors"
    w.write_bytes(b"weights-" + name.encode())
    w.with_suffix(".json").write_text(json.dumps({"modality": modality, "version": "1"}), encoding="utf-8")
    return w


def test_model_store(tmp_path):
    from DualNetDenoiseLib.models import ModelStore

    shipped = tmp_path / "shipped"
    _fake_model(shipped, "dualnet_mri")
    _fake_model(shipped, "dualnet_ct", "ct")
    store = ModelStore(user_dir=tmp_path / "user", shipped_dir=shipped)
    assert [m.name for m in store.list_models()] == ["dualnet_ct", "dualnet_mri"]
    assert [m.name for m in store.list_models("ct")] == ["dualnet_ct"]
    src = _fake_model(tmp_path / "downloads", "mine", "us")
    entry = store.import_model(src, name="my US model")
    assert Path(entry.path).parent == tmp_path / "user" and Path(entry.path).read_bytes() == src.read_bytes()
    assert Path(entry.path).with_suffix(".json").is_file() and entry.modality == "us" and not entry.shipped
    index = json.loads((tmp_path / "user" / "models.json").read_text(encoding="utf-8"))
    assert index["version"] == 1 and index["models"][0]["name"] == "my US model"
    assert ModelStore(user_dir=tmp_path / "user", shipped_dir=shipped).find("my US model").path == entry.path
    with pytest.raises(ValueError, match="already exists"):
        store.import_model(src, name="my US model")
    with pytest.raises(ValueError, match="already exists"):
        store.import_model(src, name="dualnet_ct")  # shipped names are taken too
    src.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match="card"):
        store.import_model(src, name="no card")
    with pytest.raises(ValueError):
        store.import_model(tmp_path / "x.pt")
    assert store.remove_model("my US model") and not Path(entry.path).exists()
    store.import_model(_fake_model(tmp_path / "d2", "a"), name="a")
    store.import_model(_fake_model(tmp_path / "d3", "b"), name="b")
    assert store.clear_user_models() == 2 and [m.name for m in store.user_models()] == []
    assert len(store.shipped_models()) == 2 and all(Path(m.path).exists() for m in store.shipped_models())


def test_model_store_never_replaces_another_models_files_or_the_index(tmp_path):
    """"my model" and "my_model" are one file name: the second import replaced the first's weights and
    card (both entries then loaded the second). A model named "models" replaced the index with its
    card. Both are refused now, as is the reserved name for a training run's output file."""
    from DualNetDenoiseLib import training
    from DualNetDenoiseLib.models import ModelStore

    store = ModelStore(user_dir=tmp_path / "user", shipped_dir=tmp_path / "shipped")
    first = store.import_model(_fake_model(tmp_path / "a", "mine", "us"), name="my model")
    before = Path(first.path).read_bytes()
    with pytest.raises(ValueError, match="already in the models folder"):
        store.import_model(_fake_model(tmp_path / "b", "other", "ct"), name="my_model")
    assert Path(first.path).read_bytes() == before and store.find("my model").modality == "us"
    for reserved in ("models", "Models"):
        with pytest.raises(ValueError, match="reserved"):
            store.import_model(_fake_model(tmp_path / "c", "models", "mri"), name=reserved)
        with pytest.raises(ValueError, match="reserved"):
            training.model_paths(tmp_path / "user", reserved)
    assert [m.name for m in store.user_models()] == ["my model"]
    assert not [f for f in (tmp_path / "user").iterdir() if ".tmp" in f.name]


def test_process_runner_progress_output_and_errors(tmp_path):
    from DualNetDenoiseLib.process import ProcessRunner, format_progress_line, parse_progress_line

    line = format_progress_line(0.25, "half", step=3)
    assert parse_progress_line(line) == {"fraction": 0.25, "message": "half", "step": 3}
    assert parse_progress_line("DUALNET_PROGRESS {broken") is None and parse_progress_line("hello") is None
    script = tmp_path / "child.py"
    script.write_text(
        "import json, sys\n"
        "for i in range(3):\n"
        "    print('DUALNET_PROGRESS ' + json.dumps({'fraction': (i + 1) / 3, 'message': f's{i}'}), flush=True)\n"
        "print('a log line', flush=True)\n"
        "print('DUALNET_ERROR input.nrrd: broken file', flush=True)\n"
        "sys.exit(2)\n", encoding="utf-8")
    progress, output = [], []
    r = ProcessRunner([sys.executable, str(script)], on_progress=progress.append, on_output=output.append).start()
    assert r.wait(timeout=30) == 2
    assert [p["fraction"] for p in progress] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert output == ["a log line", "DUALNET_ERROR input.nrrd: broken file"]
    assert r.failure_message() == "input.nrrd: broken file"


def test_process_runner_cancel_kills_the_process_tree(tmp_path):
    from DualNetDenoiseLib.process import ProcessRunner

    script = tmp_path / "parent.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('CHILD', child.pid, flush=True)\n"
        "time.sleep(60)\n", encoding="utf-8")
    lines = []
    r = ProcessRunner([sys.executable, str(script)], on_output=lines.append).start()
    t0 = time.time()
    while not lines and time.time() - t0 < 20:
        r.poll()
        time.sleep(0.05)
    assert lines and lines[0].startswith("CHILD")
    grandchild = int(lines[0].split()[1])
    r.cancel()
    code = r.wait(timeout=20)
    assert code != 0 and r.cancelled and r.failure_message() == "cancelled by the user"
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        try:  # reap if it became our zombie (it is not our child, so this normally raises)
            os.waitpid(grandchild, os.WNOHANG)
        except ChildProcessError:
            pass
        if _is_zombie(grandchild):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {grandchild} still running after cancel")


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").split()[2] == "Z"
    except OSError:
        return True


def test_process_runner_with_injected_factory():
    """The runner takes any Popen-like factory (how the logic is tested without real processes)."""
    import io

    from DualNetDenoiseLib.process import ProcessRunner

    calls = []

    class FakeProcess:
        pid = None

        def __init__(self, args, **kwargs):
            calls.append((args, kwargs))
            self.stdout = io.StringIO('DUALNET_PROGRESS {"fraction": 0.5, "message": "x"}\nlog\n')

        def wait(self):
            return 0

    seen = []
    r = ProcessRunner(["worker", "job.json"], popen=FakeProcess, on_progress=seen.append).start()
    assert r.wait(timeout=5) == 0 and seen == [{"fraction": 0.5, "message": "x"}] and r.lines == ["log"]
    assert calls[0][0] == ["worker", "job.json"] and calls[0][1]["stdin"] is not None


def test_child_processes_start_without_a_console_window_on_windows(monkeypatch):
    """Issue 10, defect 8: on Windows a child (worker, training, taskkill) opened a console window.
    Now it starts hidden, as ``slicer.util.launchConsoleProcess`` does. Stubbed: the Windows parts of
    ``subprocess`` (STARTUPINFO and flags, absent on Linux) and the process (a fake Popen)."""
    import io

    from DualNetDenoiseLib import process
    from DualNetDenoiseLib.process import ProcessRunner, child_process_options

    class StartupInfo:
        dwFlags, wShowWindow = 0, 1

    fake_subprocess = types.SimpleNamespace(STARTUPINFO=StartupInfo, STARTF_USESHOWWINDOW=0x1,
                                            CREATE_NEW_PROCESS_GROUP=0x200, CREATE_NO_WINDOW=0x08000000)
    options = child_process_options(windows=True, sp=fake_subprocess)
    assert options["creationflags"] & 0x08000000 and options["creationflags"] & 0x200
    assert options["startupinfo"].dwFlags & 0x1 and options["startupinfo"].wShowWindow == 0
    assert child_process_options(windows=False) == {"start_new_session": True}
    seen = []

    class FakeProcess:
        pid = None

        def __init__(self, args, **kwargs):
            seen.append(kwargs)
            self.stdout = io.StringIO("")

        def wait(self):
            return 0

    monkeypatch.setattr(process, "child_process_options", lambda: child_process_options(True, fake_subprocess))
    ProcessRunner(["worker"], popen=FakeProcess).start().wait(timeout=5)
    assert seen[0]["startupinfo"].wShowWindow == 0 and seen[0]["creationflags"] & 0x08000000
    assert "start_new_session" not in seen[0]


@pytest.fixture
def fake_env(monkeypatch):
    """A fake Python environment for ``dependencies``: ``present`` import names, ``versions`` metadata.
    Installers that are given to ensure_dependencies add what they install to it."""
    from DualNetDenoiseLib import dependencies as dep

    env = types.SimpleNamespace(present={"scipy", "skimage", "numpy"}, versions={"numpy": "1.26.4", "scipy": "1.13.1"},
                                calls=[], questions=[])
    monkeypatch.setattr(dep, "is_installed", lambda m: m in env.present)
    monkeypatch.setattr(dep, "installed_version", lambda d: env.versions.get(d))

    def pip_install(reqs):
        env.calls.append(("pip", list(reqs)))
        env.present.update({"scikit-image": "skimage"}.get(dep.requirement_name(r), dep.requirement_name(r)) for r in reqs)

    def install_torch(minimum):
        env.calls.append(("torch", minimum))
        env.present.add("torch")
        env.versions["torch"] = "2.5.1+cpu"

    def confirm(message):
        env.questions.append(message)
        return env.answer

    env.answer, env.pip_install, env.install_torch, env.confirm = True, pip_install, install_torch, confirm
    return env


def _ensure(dep, env, method, interactive=True):
    return dep.ensure_dependencies(method, interactive=interactive, confirm=env.confirm, pip_install=env.pip_install,
                                   install_torch=env.install_torch)


def test_dependencies_one_confirmation_for_everything(fake_env):
    """Issue 10, defect 4: PyTorch used to be confirmed twice (ours, then PyTorchUtils'). Now one
    question lists PyTorch and every pip package; torch goes through the PyTorch extension with the
    minimum version, never through pip."""
    from DualNetDenoiseLib import dependencies as dep

    assert _ensure(dep, fake_env, "dualnet") == ["torch", "safetensors>=0.4", "onnxruntime>=1.17"]
    (question,) = fake_env.questions
    assert "PyTorch >=2.1" in question and "safetensors>=0.4" in question and "onnxruntime" in question
    assert fake_env.calls == [("torch", dep.MIN_TORCH), ("pip", ["safetensors>=0.4", "onnxruntime>=1.17"])]
    assert _ensure(dep, fake_env, "dualnet") == [] and len(fake_env.questions) == 1  # installed once
    assert _ensure(dep, fake_env, "gaussian", interactive=False) == []  # no torch needed


def test_dependencies_refusals_and_batch_messages(fake_env):
    from DualNetDenoiseLib import dependencies as dep

    with pytest.raises(dep.DependencyError, match="PyTorch.*Extensions Manager"):
        _ensure(dep, fake_env, "dualnet", interactive=False)  # a batch run names, never asks
    assert fake_env.questions == [] and fake_env.calls == []
    fake_env.answer = False
    with pytest.raises(dep.DependencyError, match="declined"):
        _ensure(dep, fake_env, "dualnet")
    assert fake_env.calls == []
    fake_env.answer = True
    with pytest.raises(dep.DependencyError, match="bm4d") as err:
        _ensure(dep, fake_env, "bm4d", interactive=False)
    assert "\n" not in str(err.value)  # one line
    assert _ensure(dep, fake_env, "bm4d") == ["bm4d>=4.2"] and "non-commercial" in fake_env.questions[-1]


def test_dependencies_minimum_torch_version(fake_env):
    from DualNetDenoiseLib import dependencies as dep

    fake_env.present |= {"torch", "safetensors", "onnxruntime"}
    fake_env.versions["torch"] = "1.13.1+cu117"
    with pytest.raises(dep.DependencyError, match="PyTorch 1.13.1.*older than the 2.1"):
        _ensure(dep, fake_env, "dualnet")
    assert _ensure(dep, fake_env, "median") == []  # classical methods do not care
    fake_env.versions["torch"] = "2.1.0a0+git"
    assert _ensure(dep, fake_env, "dualnet") == [] and fake_env.calls == []
    assert dep.at_least("2.10.0", "2.1") and not dep.at_least("2.0.1", "2.1") and dep.at_least("2.1", "2.1.0")


def test_dependencies_tomli_for_training_before_python_311(fake_env):
    """Issue 10, defect 2: Slicer <= 5.8 has Python 3.9 without tomli; training reads TOML configs."""
    from DualNetDenoiseLib import dependencies as dep

    assert "tomli" in dep.required_modules(dep.TRAINING, (3, 9))
    assert "tomli" not in dep.required_modules(dep.TRAINING, (3, 11))
    assert "tomli" not in dep.required_modules("dualnet", (3, 9))
    fake_env.present |= {"torch", "safetensors"}
    fake_env.versions["torch"] = "2.4.0"
    plan = dep.plan_installation(dep.TRAINING, (3, 9))
    assert plan.pip == ["tomli>=2.0"] and not plan.torch


def test_slicer_pip_install_keeps_slicer_packages_pinned(monkeypatch, fake_env):
    """Issue 10, defect 5: pip could upgrade Slicer's numpy/scipy while installing scikit-image. Now one
    pip call with a constraints file pinning every installed protected package; protected packages
    are never requested. Stubbed: ``slicer.util.pip_install`` (records its arguments and the
    constraints file) - once with Slicer 5.6-5.8's signature, once with the newer ``interactive=``."""
    from DualNetDenoiseLib import dependencies as dep

    calls = []

    def old_pip_install(requirements):  # Slicer 5.6-5.8
        args = list(requirements)
        calls.append((args, Path(args[args.index("-c") + 1]).read_text(encoding="utf-8"), None))

    def new_pip_install(requirements, interactive=True, **kwargs):  # Slicer >= 5.9 asks by itself unless told
        old_pip_install(requirements)
        calls[-1] = calls[-1][:2] + (interactive,)

    fake_slicer = types.SimpleNamespace(util=types.SimpleNamespace(pip_install=old_pip_install))
    monkeypatch.setitem(sys.modules, "slicer", fake_slicer)
    dep.slicer_pip_install(["scikit-image>=0.21", "safetensors>=0.4"])
    (args, constraints, interactive), = calls
    assert args[:2] == ["scikit-image>=0.21", "safetensors>=0.4"] and args[2] == "-c"
    assert constraints.split() == ["numpy==1.26.4", "scipy==1.13.1"] and interactive is None
    assert not Path(args[3]).exists()  # temporary
    fake_slicer.util.pip_install = new_pip_install
    dep.slicer_pip_install(["tomli>=2.0"])
    assert calls[-1][0][0] == "tomli>=2.0" and calls[-1][2] is False  # one confirmation: ours
    for bad in ("numpy>=2", "torch", "SimpleITK==2.4", "--upgrade"):
        with pytest.raises(dep.DependencyError):
            dep.slicer_pip_install([bad])
    assert len(calls) == 2


def test_slicer_install_torch_through_the_pytorch_extension(monkeypatch, fake_env):
    """Stubbed: the PyTorch extension's ``PyTorchUtils`` module (records installTorch's arguments)."""
    from DualNetDenoiseLib import dependencies as dep

    calls = []

    class PyTorchUtilsLogic:
        @staticmethod
        def torchInstalled():
            return "torch" in fake_env.present

        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None):
            calls.append((askConfirmation, torchVersionRequirement))
            fake_env.versions["torch"] = "2.5.1+cu121"
            fake_env.present.add("torch")
            return types.SimpleNamespace(__version__="2.5.1+cu121")

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    dep.slicer_install_torch()
    assert calls == [(False, ">=2.1")]  # no second question
    dep.slicer_install_torch()
    assert len(calls) == 1  # installed: nothing to do
    fake_env.versions["torch"] = "2.0.0"
    with pytest.raises(dep.DependencyError, match="older"):
        dep.slicer_install_torch()
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # extension not installed
    with pytest.raises(dep.DependencyError, match="Extensions Manager"):
        dep.slicer_install_torch()


def test_training_commands_config_and_events(tmp_path, shared_data):
    import tomllib

    from DualNetDenoiseLib import training

    vols = [str(shared_data / "mri" / "adni_mprage_t1.nii.gz"), str(shared_data / "mri" / "voxelmorph_brain_t1.nii.gz")]
    cfg = training.write_pretrain_config(training.configs_dir() / "pretrain_mri.toml", vols, tmp_path / "c.toml", "tiny")
    data = tomllib.loads(cfg.read_text(encoding="utf-8"))
    assert data["preset"] == "tiny" and data["modality"] == "mri"
    assert [(d["path"], d["split"]) for d in data["data"]] == [(vols[0], "train"), (vols[1], "val")]
    from dualnet.training.config import load_config  # the core accepts what the panel writes

    loaded = load_config(cfg, steps=3, device="cpu")
    assert loaded.preset == "tiny" and len(loaded.data) == 2
    single = tomllib.loads(training.write_pretrain_config(
        training.configs_dir() / "pretrain_mri.toml", vols[:1], tmp_path / "s.toml", "small").read_text(encoding="utf-8"))
    assert [d["split"] for d in single["data"]] == ["train"]  # the core validates on it as "same case as train"
    model, run_dir = training.model_paths(tmp_path, "my model/v2")
    assert model.name == "my_model_v2.safetensors" and run_dir.name == "my_model_v2_run"
    cmd = training.finetune_command("py", vols, "base.safetensors", model, run_dir, 50, "cpu", resume=True)
    assert cmd[:4] == ["py", "-m", "dualnet", "finetune"] and "--progress-json" in cmd and cmd[-1] == "--resume"
    cmd = training.pretrain_command("py", cfg, run_dir, model, 10)
    assert cmd[3] == "train" and cmd[cmd.index("--export") + 1] == str(model) and "--resume" not in cmd
    from dualnet.cli import build_parser  # both command lines parse with the core's own CLI

    build_parser().parse_args(cmd[3:])
    build_parser().parse_args(training.finetune_command("py", vols, "b.safetensors", model, run_dir, 5)[3:])
    p = training.point_from_event({"event": "step", "step": 25, "steps": 100, "loss": 0.5, "val_loss": None})
    assert p == training.TrainingPoint(25, 0.5, None, None)
    assert training.point_from_event({"event": "done", "step": 100}) is None
    assert "step 25/100" in training.progress_text({"event": "step", "step": 25, "steps": 100, "loss": 0.5})
    with pytest.raises(ValueError):
        training.finetune_command("py", [], "b", model, run_dir, 5)


def _training_parameters(module, scene, volume, **values):
    """A DualNetTraining parameter node (Slicer's wrapper) with ``values`` set."""
    p = module.DualNetTrainingLogic().getParameterNode()
    p.trainingVolume = volume
    for name, value in dict(dict(modality="mri", stage="finetune", preset="tiny", steps=20, device="cpu",
                                 modelName="unit test"), **values).items():
        setattr(p, name, value)
    return p


def test_training_module_logic_with_gui_seams_mocked(monkeypatch, scene, mri_node, tmp_path):
    """DualNetTraining.py imported with the same seams; its command building and the loss plot (real
    table, plot series and chart nodes) run on the real scene with a real parameter node."""
    monkeypatch.setenv("DUALNET_MODELS_DIR", str(tmp_path / "models"))
    module = _import_module_file(monkeypatch, scene, "DualNetTraining")
    logic = module.DualNetTrainingLogic()
    p = _training_parameters(module, scene, mri_node)
    cmd, out_model, run_dir = logic.buildCommand(p)
    assert cmd[1:4] == ["-m", "dualnet", "finetune"] and out_model.parent == tmp_path / "models"
    staged = Path(cmd[4])
    from dualnet.io import read_volume

    assert read_volume(staged).array.shape == nodes.array_from_node(mri_node).shape  # scene volume staged
    assert cmd[cmd.index("--model") + 1].endswith("dualnet_mri.safetensors")  # shipped base model
    assert "--sigma" not in cmd  # auto (0): each scan's own estimate
    p.noiseSigma = 12.5  # a known Rician sigma reaches the core's --sigma, which parses it
    cmd, _, _ = logic.buildCommand(p)
    assert cmd[cmd.index("--sigma") + 1] == "12.5"
    from dualnet.cli import build_parser

    assert build_parser().parse_args(cmd[3:]).sigma == 12.5
    p.noiseSigma = 0.0
    p.stage = "pretrain"
    cmd, _, _ = logic.buildCommand(p)
    assert cmd[3] == "train" and Path(cmd[cmd.index("--config") + 1]).is_file()
    out_model.write_bytes(b"x")
    with pytest.raises(ValueError, match="already in the models folder"):
        logic.buildCommand(p)
    p.resume = True
    assert "--resume" in logic.buildCommand(p)[0]
    logic._lossPlot(p)
    from DualNetDenoiseLib.training import TrainingPoint

    logic._addPoint(p.lossTable, TrainingPoint(10, 0.5, None, None))
    logic._addPoint(p.lossTable, TrainingPoint(20, 0.25, 0.3, 31.0))
    table = p.lossTable.GetTable()
    assert table.GetNumberOfRows() == 2 and table.GetValue(1, 1).ToDouble() == 0.25
    assert p.lossChart.GetNumberOfPlotSeriesNodes() == 2
    logic.removeWorkdir()


def test_a_new_training_run_needs_a_free_name(monkeypatch, scene, mri_node, tmp_path):
    """Review, session 35: a new run under the name of a cancelled one overwrote its checkpoint (only the
    model file was checked), a shipped model's name or another entry's file ("knee v1" / "knee_v1") was
    accepted, and the panel then said "saved" for a model it had not registered."""
    monkeypatch.setenv("DUALNET_MODELS_DIR", str(tmp_path / "models"))
    module = _import_module_file(monkeypatch, scene, "DualNetTraining")
    logic = module.DualNetTrainingLogic()
    p = _training_parameters(module, scene, mri_node, modelName="knee v1")
    _, out_model, run_dir = logic.buildCommand(p)
    from dualnet.errors import CancelledError
    from dualnet.progress import CancelToken
    from dualnet.training.config import TrainConfig
    from dualnet.training.trainer import pretrain

    cfg = TrainConfig(modality="mri", preset="tiny", patch_size=16, batch_size=1, steps=6, val_patches=1,
                      val_every=100, checkpoint_every=100, log_every=1, device="cpu", threads=1, lr_factor=1,
                      min_foreground=0.0)
    token = CancelToken()
    with pytest.raises(CancelledError):  # an earlier run of that name, stopped at step 2
        pretrain(cfg, data=[(nodes.array_from_node(mri_node)[:4, :32, :32].astype("float32"), (1.0, 1.0, 1.0))],
                 out_dir=run_dir, cancel=token, progress=lambda f, m: m.startswith("step 2/") and token.cancel())
    with pytest.raises(ValueError, match="stopped at step 2.*tick Resume"):
        logic.buildCommand(p)
    p.resume = True
    assert "--resume" in logic.buildCommand(p)[0]
    p.resume = False
    from DualNetDenoiseLib.models import ModelStore

    store = ModelStore(user_dir=tmp_path / "models")
    shipped = store.list_models()[0].name
    p.modelName = shipped
    with pytest.raises(ValueError, match="exists"):
        logic.buildCommand(p)
    import shutil

    shutil.rmtree(run_dir)
    from dualnet.modelfile import default_model_path

    store.import_model(default_model_path("mri"), name="knee_v1")  # its file is knee_v1.safetensors
    p.modelName = "knee v1"  # the same file stem
    with pytest.raises(ValueError, match="already in the models folder"):
        logic.buildCommand(p)
    logic.removeWorkdir()


def test_training_temporary_folders_are_removed(monkeypatch, scene, mri_node, tmp_path):
    """Issue 10, defect 6: each run from the panel staged the scene volume in a new temporary folder
    that was never removed. Now: the previous folder goes when a command is built again, when the
    child ends (success or failure) and on shutdown - never while the child may still read it.
    Stubbed: the child process (a fake Popen) and ``qt.QTimer`` (the test fires it)."""
    import io

    monkeypatch.setenv("DUALNET_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    module = _import_module_file(monkeypatch, scene, "DualNetTraining")

    def staged():
        return sorted(p.name for p in (tmp_path / "tmp").glob("DualNetTraining-*"))

    class FakeChild:
        exit_code, pid = 1, None

        def __init__(self, args, **kwargs):
            self.args = args
            self.stdout = io.StringIO("DUALNET_ERROR disk full\n")

        def wait(self):
            return self.exit_code

    logic = module.DualNetTrainingLogic(popen=FakeChild)
    p = _training_parameters(module, scene, mri_node)
    logic.buildCommand(p)
    first = staged()
    logic.buildCommand(p)
    assert len(first) == 1 and len(staged()) == 1 and staged() != first  # the previous one is gone
    finished = []
    logic.start(p, onFinished=lambda ok, message: finished.append((ok, message)))
    assert len(staged()) == 1  # the child may still read it
    while not finished:
        logic.timer.fire()
    assert finished == [(False, "disk full")] and staged() == []

    p.modelName = "second"
    logic.start(p, onFinished=lambda ok, message: finished.append((ok, message)))
    logic.shutdown(timeout=5)  # module unloaded while the (fake) child is still unread
    assert staged() == [] and logic.timer.active is False

    monkeypatch.setattr(module.training, "finetune_command", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        logic.buildCommand(p)
    assert staged() == []  # a failure while staging leaves nothing behind


def test_training_saves_under_the_name_it_started_with(monkeypatch, scene, mri_node, tmp_path):
    """The run registered its model under whatever the name field read when it ended (the field
    stayed editable), and a closed scene's reset node gave "my-dualnet" and a loss table of None
    (every progress line raised). Now the name, stage and table are the run's own, and the name
    field is disabled while it runs. Stubbed: the child process (writes the model, one progress
    line) and ``qt.QTimer``; ``ModelStore.import_model`` records its call (the file is a stand-in)."""
    import io

    from DualNetDenoiseLib.process import format_progress_line

    monkeypatch.setenv("DUALNET_MODELS_DIR", str(tmp_path / "models"))
    module = _import_module_file(monkeypatch, scene, "DualNetTraining")
    registered = []
    monkeypatch.setattr(module.ModelStore, "import_model",
                        lambda self, path, name, copy, source: registered.append((name, Path(path).name, source)))

    class FakeChild:
        pid = None

        def __init__(self, args, **kwargs):
            Path(args[args.index("--out") + 1]).write_bytes(b"model")
            self.stdout = io.StringIO(format_progress_line(0.25, event="step", step=5, steps=20, loss=0.4) + "\n")

        def wait(self):
            return 0

    logic = module.DualNetTrainingLogic(popen=FakeChild)
    p = _training_parameters(module, scene, mri_node, modelName="knee-v1")
    finished = []
    logic.start(p, onFinished=lambda ok, message: finished.append((ok, message)))
    table = p.lossTable
    p.modelName = "knee-v2"  # edited while it runs
    scene.RemoveNode(table)  # and its loss table is gone (e.g. the scene closed)
    while not finished:
        logic.timer.fire()
    assert finished[0][0] is True and "knee-v1" in finished[0][1]
    assert registered == [("knee-v1", "knee-v1.safetensors", "trained (finetune)")]


def test_training_command_without_tomli_names_it(tmp_path):
    """Issue 10, defect 2: on Python < 3.11 without tomli, ``python -m dualnet finetune ...`` ended with
    ``invalid choice: 'finetune'`` (the core CLI swallowed the ImportError). Simulated here by hiding
    ``tomllib`` and ``tomli`` (their import raises ModuleNotFoundError) in a child interpreter."""
    hide = ("import sys\n"
            "class Hide:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name in ('tomllib', 'tomli'):\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, Hide())\n"
            "import runpy; sys.argv[0] = 'dualnet'; runpy.run_module('dualnet', run_name='__main__')\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "DualNetDenoise"))
    for args in (["finetune", "a.nii.gz", "--model", "b.safetensors", "--out", "c.safetensors"],
                 ["train", "--config", "c.toml", "--out", str(tmp_path / "run")]):
        res = subprocess.run([sys.executable, "-c", hide, *args], capture_output=True, text=True, timeout=60, env=env)
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.returncode == 2 and "invalid choice" not in res.stderr, res.stderr[-2000:]
        assert len(lines) == 1 and lines[0].startswith(f"dualnet: error: '{args[0]}' needs the Python package 'tomli'")


def test_worker_job_errors_are_one_line(tmp_path, capsys):
    from DualNetDenoiseLib import worker

    job = tmp_path / "job.json"
    job.write_text(json.dumps({"input": str(tmp_path / "missing.nrrd"), "output": str(tmp_path / "o.nrrd"),
                               "method": "gaussian"}), encoding="utf-8")
    assert worker.main([str(job)]) == 2
    err = [line for line in capsys.readouterr().out.splitlines() if line.startswith("DUALNET_ERROR")]
    assert len(err) == 1 and "missing.nrrd" in err[0]
    assert worker.main([]) == 64
    job.write_text(json.dumps({"input": "a", "output": "b"}) + "}", encoding="utf-8")  # not JSON
    assert worker.main([str(job)]) == 2
    with pytest.raises(TypeError, match="unknown denoising parameters"):
        worker.run_denoise(None, metod="gaussian")


def test_status_line_says_when_the_guard_blended():
    """The panel's status after a run (``result_summary``; the Qt label itself cannot run here)."""
    assert result_summary({"seconds": 3.2}) == "Done in 3.2 s."
    assert result_summary({}) == "Done."
    kept = result_summary({"seconds": 1, "inference_guard": {"weight": 1.0, "voxels": 5000}})
    assert kept == "Done in 1 s."
    blended = result_summary({"seconds": 1, "inference_guard": {"weight": 0.105, "voxels": 5000}})
    assert "blended with the input (weight 0.10)" in blended and blended.startswith("Done in 1 s.")
    assert result_summary({"seconds": 1, "inference_guard": {"weight": 1.0, "reason": "speckle"}}) == "Done in 1 s."
    views = result_summary({"seconds": 1, "inference_views": 3, "inference_guard": {"weight": 1.0}})
    assert views == "Done in 1 s. The network ran along axial, coronal and sagittal slices (averaged)."
    from dualnet.estimate import background_caution

    caution = background_caution({"method": "rician-background", "sigma": 12.9, "background_rayleigh_ratio": 0.97})
    warned = result_summary({"seconds": 1, "inference_noise_warning": caution})
    assert warned == f"Done in 1 s. Warning: {caution}." and "may be too high" in caution
    assert background_caution({"method": "rician-background", "sigma": 1.0, "background_rayleigh_ratio": 0.886}) is None
    assert background_caution({"method": "wavelet-mad-foreground", "background_rayleigh_ratio": 0.99}) is None


def test_panel_helpers_second_review(monkeypatch, scene, tmp_path, capsys):
    """Review, session 35: the panel's automatic first input could be a vector (RGB) volume its selector
    does not list; a worker out of memory ended in a traceback; a child killed by the OOM killer said
    only 'exited with code -9'."""
    module = _import_module_file(monkeypatch, scene, "DualNetDenoise")
    scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "RGB US clip")
    scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    assert module.firstScalarVolume(scene) is None
    plain = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "T1")
    assert module.firstScalarVolume(scene) is plain

    from DualNetDenoiseLib import worker
    from DualNetDenoiseLib.process import ProcessRunner

    job = tmp_path / "job.json"
    job.write_text("{}", encoding="utf-8")

    def no_memory(_job):
        raise MemoryError

    monkeypatch.setattr(worker, "run_job", no_memory)
    assert worker.main([str(job)]) == 1 and "out of memory" in capsys.readouterr().out
    runner = ProcessRunner([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]).start()
    assert runner.wait(timeout=30) == -9 and "OOM killer" in runner.failure_message()


def test_the_model_list_shows_the_scenes_model(monkeypatch, scene, mri_crop, tmp_path, fake_ui):
    """The model list is not bound to the parameter node: after a scene load it kept showing the previous
    model, and a model path the list lacks was shown as the shipped model while that path would run."""
    widget = _denoise_widget(monkeypatch, scene, tmp_path, "A", mri_crop[:8])
    added = []
    monkeypatch.setattr(widget.ui.modelComboBox, "addItem", lambda label, data=None: added.append((label, data)),
                        raising=False)
    widget._parameterNode.modelPath = str(tmp_path / "from_another_computer.safetensors")
    widget.setParameterNode(widget._parameterNode)  # as after a scene load
    assert added[-1] == ("from_another_computer.safetensors (file not found)",
                         str(tmp_path / "from_another_computer.safetensors"))
    widget.cleanup()


def test_dice_leaves_no_nodes_and_ignores_an_empty_reference(scene):
    """Review of session 35's per-segment Dice: the display and colour nodes each export adds kept the
    removed labelmaps' voxels alive, and a new (empty) output node given as the reference made each
    segment use its own box (shifted segments read Dice 1.0)."""
    ref = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ref")
    nodes.update_node_from_array(ref, np.zeros((6, 20, 20), np.float32), np.eye(4))
    a_arr, b_arr = np.zeros((6, 20, 20), np.int16), np.zeros((6, 20, 20), np.int16)
    a_arr[2:4, 3:8, 3:8] = 1
    b_arr[2:4, 9:14, 9:14] = 1  # the same box, shifted: Dice 0
    segs = []
    for name, arr in (("A", a_arr), ("B", b_arr)):
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        node.SetReferenceImageGeometryParameterFromVolumeNode(ref)
        lm = _labelmap(scene, name + "_lm", arr, np.eye(4))
        assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lm, node)
        node.GetSegmentation().GetNthSegment(0).SetName("lesion")
        scene.RemoveNode(lm)
        segs.append(node)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "new output")
    before = scene.GetNumberOfNodes()
    table = DenoiseLogicBase().computeDice(segs[0], segs[1], referenceVolume=empty)
    assert [float(r[2]) for r in _table_rows(table)] == [0.0]
    assert scene.GetNumberOfNodes() == before + 1  # the table only
