"""Slicer logic on a real MRML scene (``slicer-core`` wheel), outside the Slicer application.

What runs here for real: the MRML scene, ``vtkMRMLScalarVolumeNode`` / labelmap / segmentation /
table nodes, ``vtkSlicerSegmentationsModuleLogic``, the ``DualNetDenoiseLib`` glue and the
``dualnet`` core (cheap ``gaussian`` method), in-process and in a child process.

What is mocked, and only in :func:`test_module_file_logic_with_gui_seams_mocked`: the GUI seams
the slicer-core wheel does not provide - ``qt``, ``ctk``, ``slicer.i18n``,
``slicer.ScriptedLoadableModule``, ``slicer.parameterNodeWrapper`` and ``slicer.app`` - so that
``DualNetDenoise.py`` (which imports them at top level, as every scripted module does) can be
imported and its ``DualNetDenoiseLogic`` run on the real scene. Widgets are not exercised here
(see docs/SLICER.md: the in-Slicer self-test covers them).
"""

from __future__ import annotations

import json
import os
import sys
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
from DualNetDenoiseLib.logic import DenoiseJob, DenoiseLogicBase  # noqa: E402


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
    out = logic.process(mri_node, None, modality="mri", method="gaussian",
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
    assert params["modality"] == "mri" and params["method"] == "gaussian" and params["tta"] is False
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
    with pytest.raises(ValueError, match="uncertainty volume must differ"):
        DenoiseLogicBase().process(small, out, method="dualnet", model=str(model), uncertainty=True,
                                   uncertaintyVolume=out)


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


def test_dice_refuses_mixed_inputs(scene):
    a, _ = _two_label_maps()
    lm = _labelmap(scene, "A", a, np.eye(4))
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "S")
    with pytest.raises(ValueError, match="two segmentations or two labelmap"):
        DenoiseLogicBase().computeDice(seg, lm)


# ------------------------------------------------------------------------------- module file
def _install_gui_stubs(monkeypatch, scene):
    """Stand-ins for the GUI seams slicer-core lacks (see module docstring)."""
    class _Any:
        def __init__(self, *a, **k):
            pass

        def __call__(self, *a, **k):
            return _Any()

        def __getattr__(self, name):
            return _Any()

    qt = types.ModuleType("qt")
    qt.QTimer = _Any
    qt.QUrl = _Any()
    ctk = types.ModuleType("ctk")
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

        def getParameterNode(self):
            return scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")

    slm.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    slm.ScriptedLoadableModule = type("ScriptedLoadableModule", (), {})
    slm.ScriptedLoadableModuleWidget = type("ScriptedLoadableModuleWidget", (), {})
    import unittest

    slm.ScriptedLoadableModuleTest = type("ScriptedLoadableModuleTest", (unittest.TestCase,),
                                          {"delayDisplay": lambda self, message, msec=None: None})
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls
    pnw.Choice = lambda choices: ("Choice", tuple(choices))
    pnw.WithinRange = lambda lo, hi: ("WithinRange", lo, hi)
    app = types.SimpleNamespace(commandOptions=lambda: types.SimpleNamespace(noMainWindow=True))
    for name, mod in (("qt", qt), ("ctk", ctk), ("slicer.i18n", i18n), ("slicer.ScriptedLoadableModule", slm),
                      ("slicer.parameterNodeWrapper", pnw)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)


def test_module_file_logic_with_gui_seams_mocked(monkeypatch, scene, mri_node):
    _install_gui_stubs(monkeypatch, scene)
    monkeypatch.delitem(sys.modules, "DualNetDenoise", raising=False)
    import DualNetDenoise as module

    logic = module.DualNetDenoiseLogic()
    assert isinstance(logic, DenoiseLogicBase) and logic.interactive is False
    out = logic.process(mri_node, None, modality="mri", method="gaussian")
    assert np.array_equal(nodes.get_ijk_to_ras(out), nodes.get_ijk_to_ras(mri_node))
    assert out.GetAttribute("DualNet.method") == "gaussian"
    table = logic.computeDice(_labelmap(scene, "A", *_two_label_maps()[:1], np.eye(4)),
                              _labelmap(scene, "B", _two_label_maps()[1], np.eye(4)))
    assert table.GetTable().GetNumberOfRows() == 3
    assert set(module.METHODS) >= {"dualnet", "bm4d", "gaussian"}
    monkeypatch.delitem(sys.modules, "DualNetDenoise", raising=False)


def test_in_slicer_self_test_logic_parts(monkeypatch, scene):
    """Run DualNetDenoiseTest (the 'Reload and Test' self-test) with the GUI stubs and slicer-core's
    real slicer.util helpers on the real scene: it must pass outside Slicer too (minus widgets)."""
    _install_gui_stubs(monkeypatch, scene)
    monkeypatch.delitem(sys.modules, "DualNetDenoise", raising=False)
    import DualNetDenoise as module

    result = module.DualNetDenoiseTest("runTest").run()
    problems = [str(e[1]) for e in result.errors + result.failures]
    assert result.wasSuccessful(), "\n".join(problems)
    assert result.testsRun == 1
    monkeypatch.delitem(sys.modules, "DualNetDenoise", raising=False)


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


def test_dependencies_policy(monkeypatch):
    from DualNetDenoiseLib import dependencies as dep

    present = {"scipy", "skimage", "safetensors"}
    monkeypatch.setattr(dep, "is_installed", lambda m: m in present)
    with pytest.raises(dep.DependencyError, match="PyTorch.*Extensions Manager"):
        dep.ensure_dependencies("dualnet", interactive=False)
    installed = []
    assert dep.ensure_dependencies("dualnet", interactive=True, confirm=lambda m: True,
                                   install_torch=lambda: installed.append("torch"),
                                   pip_install=installed.extend) == ["torch"]
    assert installed == ["torch"]  # torch never goes through pip
    with pytest.raises(dep.DependencyError, match="declined"):
        dep.ensure_dependencies("dualnet", interactive=True, confirm=lambda m: False, install_torch=lambda: None)
    assert dep.ensure_dependencies("gaussian", interactive=False) == []  # no torch needed
    asked = []
    got = dep.ensure_dependencies("bm4d", interactive=True, confirm=lambda m: asked.append(m) or True,
                                  pip_install=installed.extend)
    assert got == ["bm4d>=4.2"] and "non-commercial" in asked[0]
    with pytest.raises(dep.DependencyError, match="bm4d"):
        dep.ensure_dependencies("bm4d", interactive=False)


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
        training.configs_dir() / "pretrain_mri.toml", vols[:1], tmp_path / "s.toml").read_text(encoding="utf-8"))
    assert [d["split"] for d in single["data"]] == ["train", "val"]
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


def test_training_module_logic_with_gui_seams_mocked(monkeypatch, scene, mri_node, tmp_path):
    """DualNetTraining.py imported with the same GUI stubs; its command building and the loss
    plot (real table, plot series and chart nodes) run on the real scene."""
    _install_gui_stubs(monkeypatch, scene)
    monkeypatch.setenv("DUALNET_MODELS_DIR", str(tmp_path / "models"))
    for name in ("DualNetDenoise", "DualNetTraining"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(REPO / "DualNetTraining"))
    import DualNetTraining as module

    logic = module.DualNetTrainingLogic()
    p = types.SimpleNamespace(trainingVolume=mri_node, dataFolder=Path("."), modality="mri", stage="finetune",
                              preset="tiny", steps=20, device="cpu", initModel=Path("."), modelName="unit test",
                              resume=False, lossTable=None, lossChart=None)
    cmd, out_model, run_dir = logic.buildCommand(p)
    assert cmd[1:4] == ["-m", "dualnet", "finetune"] and out_model.parent == tmp_path / "models"
    staged = Path(cmd[4])
    from dualnet.io import read_volume

    assert read_volume(staged).array.shape == nodes.array_from_node(mri_node).shape  # scene volume staged
    assert cmd[cmd.index("--model") + 1].endswith("dualnet_mri.safetensors")  # shipped base model
    p.stage = "pretrain"
    cmd, _, _ = logic.buildCommand(p)
    assert cmd[3] == "train" and Path(cmd[cmd.index("--config") + 1]).is_file()
    out_model.write_bytes(b"x")
    with pytest.raises(ValueError, match="exists"):
        logic.buildCommand(p)
    p.resume = True
    assert "--resume" in logic.buildCommand(p)[0]
    logic._lossPlot(p)
    from DualNetDenoiseLib.training import TrainingPoint

    logic._addPoint(p, TrainingPoint(10, 0.5, None, None))
    logic._addPoint(p, TrainingPoint(20, 0.25, 0.3, 31.0))
    table = p.lossTable.GetTable()
    assert table.GetNumberOfRows() == 2 and table.GetValue(1, 1).ToDouble() == 0.25
    assert p.lossChart.GetNumberOfPlotSeriesNodes() == 2
    for name in ("DualNetDenoise", "DualNetTraining"):
        monkeypatch.delitem(sys.modules, name, raising=False)


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
