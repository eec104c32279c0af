"""Denoise and Dice logic on MRML nodes: no widgets, no dialogs, no Qt.

``DualNetDenoiseLogic`` in the module file adds Slicer's parameter node and a ``QTimer`` on top
of :class:`DenoiseLogicBase`; everything that touches voxels or geometry is here, so it runs
in a panel, in a batch script and in pytest with the ``slicer-core`` wheel.

Rules kept here:
* the input node is never modified or overwritten; the output node takes the input's
  IJK-to-RAS matrix bit for bit;
* the output is named ``"<input> denoised (<method>)"`` and carries provenance attributes
  ``DualNet.method``, ``DualNet.model``, ``DualNet.parameters`` (JSON), ``DualNet.version``;
* the results of a DICOM-loaded input go under its study in the subject hierarchy with the series
  attributes Slicer's *Export to DICOM* reads (:func:`dicomexport.place_in_source_study`);
* heavy work is the core's (``dualnet``), run in-process or in a child process
  (``worker.py``) whose progress lines are polled.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from . import nodes
from .process import ProcessRunner, python_executable
from .worker import jsonable

ProgressCallback = Callable[[float, str], None]

METHOD_LABELS = {
    "dualnet": "DUAL-NET (deep network)",
    "bm4d": "BM4D (non-commercial licence)",
    "bm3d": "BM3D slice-wise (non-commercial licence)",
    "nlm": "Non-local means",
    "gaussian": "Gaussian smoothing",
    "median": "Median filter",
    "diffusion": "Anisotropic diffusion",
}

ATTR_METHOD = "DualNet.method"
ATTR_MODEL = "DualNet.model"
ATTR_PARAMETERS = "DualNet.parameters"
ATTR_VERSION = "DualNet.version"
ATTR_SOURCE = "DualNet.sourceNodeID"


def available_methods() -> List[str]:
    """The core's method names (``dualnet`` first, then ``dualnet.baselines.METHODS``)."""
    try:
        from dualnet.baselines import METHODS

        return ["dualnet"] + [m for m in METHODS if m != "dualnet"]
    except ImportError:
        return list(METHOD_LABELS)


def output_name(input_name: str, method: str) -> str:
    return f"{input_name} denoised ({method})"


#: Node name suffix of each extra result map (``worker.MAP_KINDS``).
MAP_NAMES = {"uncertainty": "uncertainty", "noise_map": "noise sigma", "confidence": "noise-branch confidence"}


def map_name(input_name: str, kind: str, method: str) -> str:
    """Name of the node created for an extra result map (``kind`` in ``worker.MAP_KINDS``)."""
    return f"{input_name} {MAP_NAMES[kind]} ({method})"


def result_summary(info: Dict[str, Any]) -> str:
    """The panel's status line after a run: the time, the network's slice orientations when it ran
    along all three, what the SURE guard did when it blended the network's result with the input,
    and a doubtful noise estimate (``info`` of :func:`dualnet.api.denoise_volume`)."""
    seconds = info.get("seconds")
    text = f"Done in {seconds} s." if seconds else "Done."
    if info.get("inference_views") == 3:
        text += " The network ran along axial, coronal and sagittal slices (averaged)."
    guard = info.get("inference_guard") or {}
    weight = guard.get("weight")
    if weight is not None and weight < 0.995:
        text += (f" SURE guard: the network's result was blended with the input (weight {weight:.2f}); "
                 "by its estimate the network alone would be worse on this scan.")
    from dualnet.api import result_warnings

    for warning in result_warnings(info):  # another modality's model, a doubtful noise estimate
        text += f" Warning: {warning}."
    return text


def core_version() -> str:
    try:
        import dualnet

        return str(getattr(dualnet, "__version__", "unknown"))
    except ImportError:
        return "unavailable"


class DenoiseJob:
    """A denoising run in a child process; call :meth:`poll` (e.g. from a ``QTimer``) until done.

    Attributes:
        done: the run ended (success, error or cancel).
        error: one-line message when it failed or was cancelled, else None.
        inputVolume: the node it denoises.
        outputVolume, uncertaintyVolume, noiseMapVolume, confidenceVolume: nodes filled in when it
            succeeded (the last three only when asked for).
    """

    def __init__(self, logic: "DenoiseLogicBase", runner: ProcessRunner, workdir: str, job: dict, finish: Callable,
                 onFinished: Optional[Callable[["DenoiseJob"], None]] = None) -> None:
        self.logic = logic
        self.runner = runner
        self.workdir = workdir
        self.job = job
        self._finish = finish
        self.onFinished = onFinished
        self.done = False
        self.inputVolume = None
        self.error: Optional[str] = None
        self.outputVolume = None
        self.uncertaintyVolume = None
        self.noiseMapVolume = None
        self.confidenceVolume = None
        self.info: Dict[str, Any] = {}
        self.discardOnFailure = None

    def poll(self) -> bool:
        """Dispatch progress; load the results into the nodes when the child ended. True when done."""
        if self.done:
            return True
        code = self.runner.poll()
        if code is None:
            return False
        try:
            if code == 0 and not self.runner.cancelled:
                self._finish(self)
            else:
                self.error = self.runner.failure_message()
        except Exception as err:  # loading the results failed: report, never leave a half state
            self.error = f"{type(err).__name__}: {err}"
        finally:
            self.done = True
            if self.error and self.discardOnFailure is not None and self.discardOnFailure.GetScene() is not None:
                self.discardOnFailure.GetScene().RemoveNode(self.discardOnFailure)
            shutil.rmtree(self.workdir, ignore_errors=True)
            if self.onFinished:
                self.onFinished(self)
        return True

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> "DenoiseJob":
        start = time.monotonic()
        while not self.poll():
            if timeout is not None and time.monotonic() - start > timeout:
                self.cancel()
                self.poll()
                raise TimeoutError(f"denoising did not finish within {timeout} s")
            time.sleep(interval)
        return self

    def cancel(self) -> None:
        self.runner.cancel()


class DenoiseLogicBase:
    """Denoising and Dice on MRML nodes.

    Args:
        popen: process factory for child processes (``subprocess.Popen`` by default).
        pythonExecutable: interpreter for ``worker.py`` (``PythonSlicer`` inside Slicer).
        interactive: may ask the user (dependency installs); False in batch and tests.
    """

    def __init__(self, popen=None, pythonExecutable: Optional[str] = None, interactive: bool = False) -> None:
        import subprocess

        self.popen = popen or subprocess.Popen
        self.pythonExecutable = pythonExecutable
        self.interactive = interactive
        self.workerScript = str(Path(__file__).resolve().parent / "worker.py")
        #: after an in-process run: kind -> node of the extra maps written (``worker.MAP_KINDS``)
        self.lastMapVolumes: Dict[str, Any] = {}
        self.lastUncertaintyVolume = None

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _scene(node):
        scene = node.GetScene() if node is not None else None
        if scene is None:
            raise ValueError("the input volume is not in a MRML scene")
        return scene

    @staticmethod
    def _ownResult(inputVolume, node):
        """``node``, or None (a new node is then made) where it holds the result of another input: a
        selector left on an earlier result (the input switched during a run, or while the panel was
        hidden) would otherwise have the next run overwrite that result under the other input's name."""
        source = node.GetAttribute("DualNet.sourceNodeID") if node is not None else None
        if source and inputVolume is not None and source != inputVolume.GetID():
            logging.info(f"DualNet: '{node.GetName()}' holds the result of another input; a new node is made")
            return None
        return node

    def _prepareOutput(self, inputVolume, outputVolume, name: str):
        """The output node (created when None) and whether it was created here."""
        scene = self._scene(inputVolume)
        if outputVolume is not None and (outputVolume is inputVolume or outputVolume.GetID() == inputVolume.GetID()):
            raise ValueError("the output volume must differ from the input volume (inputs are never overwritten)")
        if outputVolume is None:
            return scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name), True
        return outputVolume, False

    @staticmethod
    def _parameters(modality, method, noiseLevel, model, device, tta, uncertainty, views=None,
                    nebMaps=False) -> Dict[str, Any]:
        if method not in METHOD_LABELS and method not in available_methods():
            raise ValueError(f"unknown method '{method}'; choose one of {available_methods()}")
        from dualnet.modality import MODALITY_CHOICES

        if modality not in MODALITY_CHOICES:
            raise ValueError(f"unknown modality '{modality}'; choose {', '.join(MODALITY_CHOICES)}")
        if method != "dualnet":  # the model, device, TTA, MC-dropout uncertainty, views and the noise maps are network-only
            model, device, tta, uncertainty, views, nebMaps = None, "auto", None, False, None, False
        from dualnet.inference import normalise_tta

        tta = normalise_tta(tta)  # an InputError (a ValueError) names the choices
        if views is not None:
            from dualnet.orthoviews import VIEW_CHOICES

            if views not in VIEW_CHOICES:
                raise ValueError(f"views must be 1 or 3 (or None: automatic), got {views!r}")
        sigma = None if noiseLevel is None or (isinstance(noiseLevel, (int, float)) and noiseLevel <= 0) else float(noiseLevel)
        return {"method": method, "modality": modality, "sigma": sigma, "model": str(model) if model else None,
                "device": device or "auto", "tta": tta,
                "uncertainty": bool(uncertainty), "views": views,
                "neb_maps": bool(nebMaps)}

    def _store(self, inputVolume, outputVolume, ijkToRAS, array, params, info, maps=None, mapVolumes=None):
        """Write the result arrays into nodes with the input's geometry, and the provenance attributes.

        ``maps``: kind -> array of the extra result maps (``worker.MAP_KINDS``); ``mapVolumes``: kind ->
        the node to write each into (a new node when missing). Returns kind -> node of the maps written.
        """
        last = outputVolume.GetAttribute(ATTR_METHOD)  # a node named after its last run's method: renamed
        if last and outputVolume.GetName() == output_name(inputVolume.GetName(), last):
            outputVolume.SetName(output_name(inputVolume.GetName(), params["method"]))
        nodes.update_node_from_array(outputVolume, array, ijkToRAS)
        outputVolume.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())  # where the input is shown
        self._ensureDisplay(outputVolume, inputVolume)
        model = info.get("model") or params.get("model") or ("shipped default" if params["method"] == "dualnet" else "")
        outputVolume.SetAttribute(ATTR_METHOD, params["method"])
        outputVolume.SetAttribute(ATTR_MODEL, str(model))
        outputVolume.SetAttribute(ATTR_PARAMETERS, json.dumps({**params, "info": jsonable(info)}, sort_keys=True))
        outputVolume.SetAttribute(ATTR_VERSION, core_version())
        outputVolume.SetAttribute(ATTR_SOURCE, inputVolume.GetID() or "")
        written = {}
        for kind, mapArray in (maps or {}).items():
            node = (mapVolumes or {}).get(kind)
            if node is None:
                node = self._scene(inputVolume).AddNewNodeByClass(
                    "vtkMRMLScalarVolumeNode", map_name(inputVolume.GetName(), kind, params["method"]))
            nodes.update_node_from_array(node, mapArray, ijkToRAS)
            node.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
            self._ensureDisplay(node, None)
            node.SetAttribute(ATTR_METHOD, params["method"])
            node.SetAttribute(ATTR_SOURCE, inputVolume.GetID() or "")
            written[kind] = node
        # the MC-dropout map has a DICOM form (a derived series); the noise branch's maps do not
        self._placeInSourceStudy(inputVolume, outputVolume, written.get("uncertainty"))
        return written

    @staticmethod
    def _placeInSourceStudy(inputVolume, outputVolume, uncertaintyVolume=None) -> bool:
        """Put the results of a DICOM-loaded input into its study, ready for *Export to DICOM*.

        Nothing happens for other inputs. A failure here costs only the export attributes, never
        the result: it is logged as a warning.
        """
        from . import dicomexport

        try:
            scene = inputVolume.GetScene()
            placed = dicomexport.place_in_source_study(scene, inputVolume, outputVolume)
            if placed and uncertaintyVolume is not None:
                dicomexport.place_in_source_study(scene, inputVolume, uncertaintyVolume, kind="uncertainty")
            return placed
        except Exception as err:  # noqa: BLE001 - the denoised volume is there; DICOM export is extra
            logging.warning(f"DualNet: result not placed in the DICOM study of '{inputVolume.GetName()}': "
                            f"{type(err).__name__}: {err}")
            return False

    @staticmethod
    def _ensureDisplay(node, like) -> None:
        """Create display nodes and copy the input's window/level when possible (harmless without a GUI)."""
        try:
            if node.GetDisplayNode() is None:
                node.CreateDefaultDisplayNodes()
            src = like.GetDisplayNode() if like is not None else None
            dst = node.GetDisplayNode()
            if src is not None and dst is not None and hasattr(src, "GetWindow"):
                dst.SetAutoWindowLevel(False)
                dst.SetWindowLevel(src.GetWindow(), src.GetLevel())
        except Exception:
            pass

    @staticmethod
    def _expand(array: np.ndarray, shape) -> np.ndarray:
        arr = np.asarray(array)
        if arr.shape != tuple(shape):
            if arr.ndim == 2 and tuple(shape)[0] == 1 and arr.shape == tuple(shape)[1:]:
                arr = arr[np.newaxis]
            else:
                raise ValueError(f"the core returned shape {arr.shape}, expected {tuple(shape)}")
        return arr

    # -- denoising -----------------------------------------------------------------------------
    def process(
        self,
        inputVolume,
        outputVolume=None,
        modality: str = "auto",
        method: str = "dualnet",
        noiseLevel: Optional[float] = None,
        model: Optional[str] = None,
        device: str = "auto",
        tta: Union[bool, int, None] = None,
        uncertainty: bool = False,
        uncertaintyVolume=None,
        waitForCompletion: bool = True,
        progressCallback: Optional[ProgressCallback] = None,
        inProcess: Optional[bool] = None,
        onFinished: Optional[Callable[[DenoiseJob], None]] = None,
        cancel=None,
        views: Optional[int] = None,
        nebMaps: bool = False,
        noiseMapVolume=None,
        confidenceVolume=None,
        newNodesForOtherResults: bool = False,
    ):
        """Denoise ``inputVolume`` into ``outputVolume`` (created when None).

        Args:
            modality: ``"auto"`` (default: from the node's intensities, as the core chooses it), ``"mri"``,
                ``"ct"`` or ``"us"``.
            newNodesForOtherResults: an output or map node holding another input's result is not
                overwritten: a new node is made (the panel, whose selectors may be left on an earlier
                input's results). A script's explicit nodes are used as given.
            noiseLevel: the noise level, as ``dualnet denoise --sigma`` (MRI the Rician sigma in the volume's
                units, CT the noise std at water in HU, US the relative speckle std), for the classical
                methods and the network alike; None or <= 0 = estimate.
            model: model file path; None = shipped model for the modality.
            tta: test-time augmentation (network only): 1, 4 or 8 transforms, True = 8, False = 1;
                None = the model card's default (:func:`dualnet.inference.choose_tta`).
            waitForCompletion: block until done (batch scripts, tests). When False the run is
                started in a child process and a :class:`DenoiseJob` is returned to poll.
            inProcess: run the core in this process (default when ``waitForCompletion``);
                False runs ``worker.py`` in a child process even when waiting.
            cancel: ``dualnet.progress.CancelToken`` for in-process runs.
            views: the network's slice orientations, 1 or 3; None = automatic (three orthogonal views
                where the model and the voxels allow it, :mod:`dualnet.orthoviews`).
            nebMaps: also give the network's noise branch maps: the per-voxel noise standard
                deviation it estimated (image units) into ``noiseMapVolume`` and its confidence
                (0..1) into ``confidenceVolume`` (nodes created when None).

        Returns:
            The output node (waiting) or the :class:`DenoiseJob` (not waiting).
        """
        if inputVolume is None:
            raise ValueError("no input volume")
        from .worker import wanted_maps

        params = self._parameters(modality, method, noiseLevel, model, device, tta, uncertainty, views, nebMaps)
        given = {"uncertainty": uncertaintyVolume, "noise_map": noiseMapVolume, "confidence": confidenceVolume}
        if newNodesForOtherResults:  # the panel: selectors left on another input's results
            given = {kind: self._ownResult(inputVolume, node) for kind, node in given.items()}
            outputVolume = self._ownResult(inputVolume, outputVolume)
        mapVolumes = {kind: given[kind] for kind in wanted_maps(params) if given[kind] is not None}
        self._checkDistinct(inputVolume, outputVolume, mapVolumes)
        if inProcess is None:
            inProcess = waitForCompletion
        if inProcess and not waitForCompletion:
            raise ValueError("an in-process run always waits for completion")
        ijkToRAS = nodes.get_ijk_to_ras(inputVolume)
        shape = nodes.array_from_node(inputVolume, copy=False).shape
        outputVolume, created = self._prepareOutput(inputVolume, outputVolume, output_name(inputVolume.GetName(), method))
        if inProcess:
            from .worker import run_denoise

            try:
                volume = nodes.volume_from_node(inputVolume)
                volume.path = inputVolume.GetName()  # the core's messages name the volume
                t0 = time.time()
                out, maps, info = run_denoise(volume, progress=progressCallback, cancel=cancel, **params)
                info.setdefault("seconds", round(time.time() - t0, 3))
                self.lastMapVolumes = self._store(
                    inputVolume, outputVolume, ijkToRAS, self._expand(out.array, shape), params, info,
                    {kind: self._expand(vol.array, shape) for kind, vol in maps.items()}, mapVolumes)
                self.lastUncertaintyVolume = self.lastMapVolumes.get("uncertainty")
            except BaseException:
                if created:  # no empty "denoised" node left behind by a failed run
                    self._scene(inputVolume).RemoveNode(outputVolume)
                raise
            self.lastInfo = info
            return outputVolume
        try:
            job = self.startJob(inputVolume, outputVolume, params, ijkToRAS, shape, mapVolumes, progressCallback,
                                onFinished, removeOutputOnFailure=created)
        except BaseException:  # e.g. no Python to run the worker: no empty "denoised" node left behind
            if created:
                self._scene(inputVolume).RemoveNode(outputVolume)
            raise
        if waitForCompletion:
            job.wait()
            if job.error:
                from dualnet.errors import DualNetError

                raise DualNetError(job.error)
            return outputVolume
        return job

    @staticmethod
    def _checkStillInScene(inputVolume, outputVolume, mapVolumes) -> None:
        """Refuse to write a background run's result when its nodes left the scene meanwhile (deleted,
        or the scene closed): a closed scene's node IDs are reused by the next scene's nodes."""
        scene = inputVolume.GetScene()
        if scene is None:
            raise ValueError("the input volume was removed from the scene during the run; the result was discarded")
        for label, node in [("output", outputVolume)] + [(MAP_NAMES[k], n) for k, n in (mapVolumes or {}).items()]:
            if node is not None and node.GetScene() is not scene:
                raise ValueError(f"the {label} volume was removed from the scene during the run; "
                                 "the result was discarded")

    @staticmethod
    def _checkDistinct(inputVolume, outputVolume, mapVolumes) -> None:
        """Refuse a result map node that is the input, the output or another map's node."""
        taken = {inputVolume.GetID(): "input", outputVolume.GetID() if outputVolume is not None else None: "output"}
        for kind, node in mapVolumes.items():
            label = MAP_NAMES[kind]
            if node.GetID() in taken:
                raise ValueError(f"the {label} volume must differ from the input and output volumes"
                                 if taken[node.GetID()] in ("input", "output") else
                                 f"the {label} volume must differ from the {taken[node.GetID()]} volume")
            taken[node.GetID()] = label

    def startJob(self, inputVolume, outputVolume, params, ijkToRAS, shape, mapVolumes=None,
                 progressCallback=None, onFinished=None, removeOutputOnFailure=False) -> DenoiseJob:
        """Write the input to a temporary file and start ``worker.py`` on it.

        ``mapVolumes``: kind -> node for the extra result maps asked for in ``params`` (missing ones
        are created when the run ends).

        ``removeOutputOnFailure``: remove ``outputVolume`` from the scene when the run fails or is
        cancelled (used when the logic created that node itself).
        """
        workdir = tempfile.mkdtemp(prefix="DualNet-")
        try:
            return self._startJobIn(workdir, inputVolume, outputVolume, params, ijkToRAS, shape, mapVolumes,
                                    progressCallback, onFinished, removeOutputOnFailure)
        except BaseException:  # the child did not start: nothing is left in the temporary folder
            shutil.rmtree(workdir, ignore_errors=True)
            raise

    def _startJobIn(self, workdir, inputVolume, outputVolume, params, ijkToRAS, shape, mapVolumes,
                    progressCallback, onFinished, removeOutputOnFailure) -> DenoiseJob:
        from dualnet.io import write_volume

        from .worker import MAP_KINDS, wanted_maps

        volume = nodes.volume_from_node(inputVolume)
        inPath = os.path.join(workdir, "input.nrrd")
        write_volume(volume, inPath)
        wanted = wanted_maps(params)
        job = {**params, "input": inPath, "input_name": inputVolume.GetName() or "input volume",
               "output": os.path.join(workdir, "output.nrrd"),
               **{f"{kind}_output": os.path.join(workdir, f"{kind}.nrrd") if kind in wanted else None
                  for kind in MAP_KINDS},
               "info_output": os.path.join(workdir, "info.json")}
        jobPath = os.path.join(workdir, "job.json")
        Path(jobPath).write_text(json.dumps(job), encoding="utf-8")

        def onProgress(payload):
            if progressCallback:
                progressCallback(float(payload.get("fraction", 0.0)), str(payload.get("message", "")))

        def finish(j: DenoiseJob):
            from dualnet.io import read_volume

            self._checkStillInScene(inputVolume, outputVolume, mapVolumes)
            out = read_volume(j.job["output"], check_finite=False)
            maps = {}
            for kind in wanted:
                path = j.job.get(f"{kind}_output")
                if path and os.path.exists(path):
                    maps[kind] = self._expand(read_volume(path, check_finite=False).array, shape)
            info = json.loads(Path(j.job["info_output"]).read_text(encoding="utf-8")) if os.path.exists(j.job["info_output"]) else {}
            j.info = info
            j.outputVolume = outputVolume
            written = self._store(inputVolume, outputVolume, ijkToRAS, self._expand(out.array, shape),
                                  params, info, maps, mapVolumes)
            j.uncertaintyVolume = written.get("uncertainty")
            j.noiseMapVolume = written.get("noise_map")
            j.confidenceVolume = written.get("confidence")

        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        exe = self.pythonExecutable or python_executable()
        runner = ProcessRunner([exe, self.workerScript, jobPath], on_progress=onProgress, popen=self.popen, env=env)
        runner.start()
        result = DenoiseJob(self, runner, workdir, job, finish, onFinished)
        result.inputVolume = inputVolume
        if removeOutputOnFailure:
            result.discardOnFailure = outputVolume
        return result

    # -- Dice ----------------------------------------------------------------------------------
    @staticmethod
    def _labelmapFromSegmentation(segmentationNode, segmentIds: Sequence[str], referenceVolume, extent=None):
        import slicer
        import vtk

        scene = segmentationNode.GetScene()
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "DualNet Dice temporary")
        ids = vtk.vtkStringArray()
        for s in segmentIds:
            ids.InsertNextValue(s)
        args = (segmentationNode, ids, labelmap, referenceVolume) + (() if extent is None else (extent,))
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(*args)
        if not ok:
            scene.RemoveNode(labelmap)
            raise ValueError(f"cannot export segments of '{segmentationNode.GetName()}' to a labelmap")
        return labelmap

    def _segmentMask(self, segmentationNode, segmentId, referenceVolume):
        """``(mask, ijkToRAS)``: one segment as a boolean mask on ``referenceVolume``'s grid (None for no
        segment). Its temporary labelmap, and the display and colour nodes the export adds, are removed
        at once with their image data: a hundred segments would otherwise sit in memory."""
        if segmentId is None:
            return None
        lm = self._labelmapFromSegmentation(segmentationNode, [segmentId], referenceVolume)
        try:
            if lm.GetImageData() is None:  # an empty segment exports no voxels
                return None
            return nodes.array_from_node(lm) > 0, nodes.get_ijk_to_ras(lm)
        finally:
            _drop_labelmap(lm)

    def _commonGrid(self, nodeA, byNameA, nodeB, byNameB, temporary):
        """Without a reference volume: the grid of A's segments together with its reference geometry,
        which B's must share (different extents need a reference volume); a temporary labelmap node to
        export onto."""
        import slicer

        grids, kept = [], None
        extent = slicer.vtkSegmentation.EXTENT_UNION_OF_EFFECTIVE_SEGMENTS_AND_REFERENCE_GEOMETRY
        for node, byName in ((nodeA, byNameA), (nodeB, byNameB)):
            lm = self._labelmapFromSegmentation(node, list(byName.values()), None, extent)
            image = lm.GetImageData()
            grids.append((tuple(image.GetDimensions()) if image is not None else None, nodes.get_ijk_to_ras(lm)))
            if kept is None:
                kept = lm
                temporary.append(lm)
            else:
                _drop_labelmap(lm)
        if grids[0][0] != grids[1][0] or not np.allclose(grids[0][1], grids[1][1], atol=1e-4):
            raise ValueError("segmentations have different extents; choose a reference volume")
        return kept

    @staticmethod
    def segmentNames(segmentationNode) -> Dict[str, str]:
        """Segment ID -> name of a segmentation node, in segment order."""
        seg = segmentationNode.GetSegmentation()
        return {seg.GetNthSegmentID(i): seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())}

    def computeDice(self, nodeA, nodeB, tableNode=None, referenceVolume=None):
        """Per-label Dice between two segmentations or two labelmap volumes, into a table node.

        Segmentation nodes are matched by segment *name* (a segment only in one of them reads Dice 0,
        or 1 where it is empty there too: both agree it is absent) and each segment is rasterised on its
        own, so overlapping segments are scored as drawn, on ``referenceVolume`` (default: the first
        segmentation's reference geometry, else the grid both segmentations' segments share; a
        reference without voxels counts as none). Labelmap volumes are compared label by label; their
        geometry must agree (the core raises otherwise).

        Returns:
            The ``vtkMRMLTableNode`` with columns Label, Segment, Dice, Voxels A, Voxels B.
        """
        if nodeA is None or nodeB is None:
            raise ValueError("two segmentations or labelmaps are needed for Dice")
        scene = self._scene(nodeA)
        temporary = []
        # labelmap export also adds display and colour-table nodes: remove everything it added
        existing = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
        try:
            names: Dict[int, str] = {}
            if nodeA.IsA("vtkMRMLSegmentationNode") or nodeB.IsA("vtkMRMLSegmentationNode"):
                if not (nodeA.IsA("vtkMRMLSegmentationNode") and nodeB.IsA("vtkMRMLSegmentationNode")):
                    raise ValueError("compare two segmentations or two labelmap volumes, not one of each")
                segA, segB = self.segmentNames(nodeA), self.segmentNames(nodeB)
                order = list(dict.fromkeys(list(segA.values()) + list(segB.values())))
                byNameA = {v: k for k, v in segA.items()}
                byNameB = {v: k for k, v in segB.items()}
                if referenceVolume is None:
                    referenceVolume = nodeA.GetNodeReference(nodeA.GetReferenceImageGeometryReferenceRole()) \
                        if hasattr(nodeA, "GetReferenceImageGeometryReferenceRole") else None
                from dualnet.metrics import dice as dice_of_masks

                if referenceVolume is not None and referenceVolume.GetImageData() is None:
                    referenceVolume = None  # e.g. a new, empty output node: each segment's own box otherwise
                if referenceVolume is None:
                    referenceVolume = self._commonGrid(nodeA, byNameA, nodeB, byNameB, temporary)
                # each segment exported on its own: one labelmap of all segments keeps only the last of
                # overlapping ones (an organ and a lesion inside it), so the organ's Dice was wrong
                names = {i + 1: n for i, n in enumerate(order)}
                dice, counts = {}, {}
                for label, name in names.items():
                    pair = [self._segmentMask(node, byName.get(name), referenceVolume)
                            for node, byName in ((nodeA, byNameA), (nodeB, byNameB))]
                    grids = [g for _, g in filter(None, pair)]
                    if len(grids) == 2 and not np.allclose(grids[0], grids[1], atol=1e-4):
                        raise ValueError("the segments were rasterised on different grids; choose a reference volume")
                    shape = next((m.shape for m, _ in filter(None, pair)), (0,))  # both empty: they agree
                    a, b = (m if m is not None else np.zeros(shape, bool)
                            for m in (p[0] if p is not None else None for p in pair))
                    counts[label] = (int(a.sum()), int(b.sum()))
                    dice[label] = dice_of_masks(a, b)
            else:
                volA = nodes.volume_from_node(nodeA, squeeze_2d=False)
                volB = nodes.volume_from_node(nodeB, squeeze_2d=False)
                dice = _dice_per_label(volA, volB, None)
                counts = {lab: (int((volA.array == lab).sum()), int((volB.array == lab).sum())) for lab in dice}
        finally:
            for n in temporary:
                scene.RemoveNode(n)
            added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
            for n in added:
                if n is not None and n.GetID() not in existing:
                    scene.RemoveNode(n)
        if tableNode is None:
            tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", f"Dice {nodeA.GetName()} vs {nodeB.GetName()}")
        _fill_table(tableNode, [(lab, names.get(lab, str(lab)), dice[lab], *counts[lab]) for lab in sorted(dice)])
        tableNode.SetAttribute("DualNet.diceInputs", json.dumps([nodeA.GetName(), nodeB.GetName()]))
        return tableNode

    @staticmethod
    def _volume(arrayAndMatrix):
        from dualnet.io import Volume

        arr, m = arrayAndMatrix
        spacing, origin, direction = nodes.itk_geometry_from_ijk_to_ras(m)
        return Volume(arr, spacing, origin, direction)


def _drop_labelmap(lm) -> None:
    """Remove a temporary labelmap node with its image data and the display and colour-table nodes the
    segment export added (a removed node still wired to its display node keeps its voxels alive)."""
    scene = lm.GetScene()
    display = lm.GetDisplayNode()
    color = display.GetColorNode() if display is not None else None
    lm.SetAndObserveImageData(None)
    for node in (display, color, lm):
        if node is not None and scene is not None and node.GetScene() is scene and \
                not node.GetSingletonTag():  # never a shared default colour table
            scene.RemoveNode(node)


def _dice_per_label(a, b, labels):
    """``dualnet.metrics.dice_per_label`` (geometry checked by the core)."""
    from dualnet.metrics import dice_per_label

    result = dice_per_label(a, b, labels=labels)
    return {int(k): float(v) for k, v in result.items()}


def _fill_table(tableNode, rows) -> None:
    import vtk

    table = tableNode.GetTable()
    was = tableNode.StartModify()
    try:
        table.Initialize()
        columns = [vtk.vtkIntArray(), vtk.vtkStringArray(), vtk.vtkDoubleArray(), vtk.vtkIntArray(), vtk.vtkIntArray()]
        for col, name in zip(columns, ("Label", "Segment", "Dice", "Voxels A", "Voxels B")):
            col.SetName(name)
            table.AddColumn(col)
        table.SetNumberOfRows(len(rows))
        for r, row in enumerate(rows):
            for c, value in enumerate(row):
                table.SetValue(r, c, vtk.vtkVariant(value if c != 1 else str(value)))
        table.Modified()
    finally:
        tableNode.EndModify(was)

