"""DualNet Denoise: Slicer scripted module (panel, parameter node, logic, self-test).

The panel denoises a scalar volume with the DUAL-NET network, BM4D or a classical filter and
compares segmentations by Dice. All voxel work is done by the ``dualnet`` core (beside this
file); the node/geometry glue is in ``DualNetDenoiseLib`` (no Qt there, tested outside Slicer).
"""

import json
import logging
import os
from typing import Annotated, Optional, Union

import vtk

import qt
import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
)

from DualNetDenoiseLib import dependencies, modality as modalityGuess, nodes
from DualNetDenoiseLib.logic import METHOD_LABELS, DenoiseJob, DenoiseLogicBase, result_summary
from DualNetDenoiseLib.models import ModelStore
from DualNetDenoiseLib.process import python_executable

MODALITIES = ["mri", "ct", "us"]
METHODS = list(METHOD_LABELS)
DEVICES = ["auto", "cpu", "cuda", "mps"]
#: test-time augmentation choices of the panel (``dualnet.inference.parse_tta``): the model's default,
#: none, the 4 quarter turns, and those with their mirror images
TTA_WORDS = ["auto", "off", "x4", "x8"]


#
# DualNetDenoise
#


class DualNetDenoise(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DualNet Denoise")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Filtering.Denoising")]
        self.parent.dependencies = []
        self.parent.contributors = ["DualNet developers"]
        self.parent.helpText = _(
            "Denoise low-resolution MRI, CT and ultrasound volumes with the DUAL-NET network, BM4D or "
            "classical filters, and compare segmentations of the input and the output by Dice. "
            "The input volume is never modified: the result is a new volume named "
            "'&lt;input&gt; denoised (&lt;method&gt;)' with its method, model and parameters stored as node "
            "attributes (DualNet.*). Long runs go to a background process and can be cancelled."
        )
        self.parent.acknowledgementText = _(
            "Sample and development data: ADNI-protocol T1 MPRAGE from neurolabusc/dcm_qa_philips_enh "
            "(BSD-2-Clause); FSL FAST maps from neurolabusc/nii2mesh (BSD-2-Clause); brain T1 and labels "
            "from voxelmorph/voxelmorph (Apache-2.0); CT from wasserth/TotalSegmentator and "
            "InsightSoftwareConsortium/ITKElastix (Apache-2.0); ultrasound from tmkand/usgra-seg "
            "(CC-BY-4.0, T. M. Kand). BM4D/BM3D (optional baselines) are under a non-commercial licence. "
            "Built on the Slicer scripted-module template; child-process pattern after SlicerMONAIAuto3DSeg, "
            "PyTorch set-up after SlicerTotalSegmentator."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data (registered only when a bundled sample volume is present)
#


def sampleDataFiles():
    """Bundled sample volumes: Resources/SampleData beside the module or at the extension root, then dualnet/data."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [
        os.path.join(here, "Resources", "SampleData"),
        os.path.join(os.path.dirname(here), "Resources", "SampleData"),
        os.path.join(here, "dualnet", "data"),
    ]
    found = []
    for folder in candidates:
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                if name.endswith((".nii.gz", ".nrrd", ".nii", ".mha")):
                    found.append(os.path.join(folder, name))
    return found


def registerSampleData():
    try:
        import SampleData
    except ImportError:
        return
    iconsPath = os.path.join(os.path.dirname(__file__), "Resources", "Icons")
    for path in sampleDataFiles():
        name = os.path.basename(path).split(".")[0]
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="DualNet",
            sampleName=f"DualNet {name}",
            thumbnailFileName=os.path.join(iconsPath, "DualNetDenoise.png"),
            uris=qt.QUrl.fromLocalFile(path).toString(),
            fileNames=os.path.basename(path),
            nodeNames=f"DualNet {name}",
            loadFileType="VolumeFile",
        )


#
# Parameter node
#


@parameterNodeWrapper
class DualNetDenoiseParameterNode:
    """Parameters of the panel (saved with the scene).

    inputVolume - volume to denoise (never modified).
    modality - mri / ct / us: noise model and shipped network.
    method - dualnet, bm4d, bm3d, nlm, gaussian, median, diffusion.
    autoNoise - estimate the noise level from the image.
    noiseLevel - the noise level when autoNoise is off, for every method (the network's noise map and SURE
        guard too): MRI the Rician sigma (image units), CT the noise std at water (HU), US the relative
        speckle std 1/sqrt(looks); what `dualnet denoise --sigma` takes.
    modelPath - DUAL-NET model file; empty = shipped model for the modality.
    device - auto / cpu / cuda / mps.
    tta - test-time augmentation (network only): auto (the model's default where one slice orientation
        runs: x4 for the shipped ultrasound and CT models, none for MRI; none with three orientations),
        off, x4 (quarter turns) or x8 (and their mirror images).
    oneView - run the network along axial slices only (network only; default: three orthogonal views
        averaged where the model and the voxels allow it, about 3x the time).
    uncertainty - Monte Carlo dropout uncertainty map (network only).
    nebMaps - the network's noise-branch maps: per-voxel noise sigma (image units) and confidence (0..1).
    outputVolume, uncertaintyVolume, noiseMapVolume, confidenceVolume - results (created when empty).
    diceInputA, diceInputB, diceTable - segmentations or labelmaps to compare, result table.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modality: Annotated[str, Choice(MODALITIES)] = "mri"
    method: Annotated[str, Choice(METHODS)] = "dualnet"
    autoNoise: bool = True
    noiseLevel: Annotated[float, WithinRange(0.0, 100000.0)] = 0.0
    modelPath: str = ""
    device: Annotated[str, Choice(DEVICES)] = "auto"
    tta: Annotated[str, Choice(TTA_WORDS)] = "auto"
    oneView: bool = False
    uncertainty: bool = False
    nebMaps: bool = False
    outputVolume: vtkMRMLScalarVolumeNode
    uncertaintyVolume: vtkMRMLScalarVolumeNode
    noiseMapVolume: vtkMRMLScalarVolumeNode
    confidenceVolume: vtkMRMLScalarVolumeNode
    # a Union of node types must include None: Slicer's wrapper writes None as the default of a fresh node
    diceInputA: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]
    diceInputB: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]
    diceTable: vtkMRMLTableNode


#
# Widget
#


class DualNetDenoiseWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._modelStore = None
        self._lastInputID = None
        self._importing = False  # a scene is being imported: its parameter values are not the user's edits

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DualNetDenoise.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = DualNetDenoiseLogic()
        self._modelStore = ModelStore(user_dir=modelsFolder())

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartImportEvent, self.onSceneStartImport)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.guessModalityButton.connect("clicked(bool)", self.onGuessModality)
        self.ui.estimateNoiseButton.connect("clicked(bool)", self.onEstimateNoise)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.browseModelsButton.connect("clicked(bool)", self.onBrowseModels)
        self.ui.clearModelsButton.connect("clicked(bool)", self.onClearModels)
        self.ui.computeDiceButton.connect("clicked(bool)", self.onComputeDice)
        self.ui.progressBar.setVisible(False)
        self.ui.deviceInfoLabel.text = dependencies.device_summary() if dependencies.is_installed("torch") \
            else _("PyTorch not installed: it is set up on first use of the network")

        self.initializeParameterNode()
        self.refreshModels()

    def cleanup(self) -> None:
        if self._job is not None and not self._job.done:
            self._job.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.refreshModels()  # models trained in the DualNet Training panel appear here

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None and not self._job.done:
            self._job.cancel()  # its nodes are going; their IDs will name the next scene's nodes
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneStartImport(self, caller, event) -> None:
        self._importing = True

    def onSceneEndImport(self, caller, event) -> None:
        """A scene added to the open one (not loaded after a close) may bring this module's settings:
        its input volume, modality and noise level are kept as saved, as when a scene is opened."""
        self._importing = False
        if self._parameterNode:
            self.setParameterNode(self._parameterNode)  # re-sync the input it was saved with

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = firstScalarVolume(slicer.mrmlScene)
            if first is not None:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # keep the modality stored with the scene; guess only when the user picks another volume
            current = self._parameterNode.inputVolume
            self._lastInputID = current.GetID() if current is not None else None
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
            if self._modelStore is not None:  # the model list is not bound to the node: show this scene's model
                self.refreshModels()
            self._updateGui()
        else:
            self._lastInputID = None

    def _updateGui(self, caller=None, event=None) -> None:
        p = self._parameterNode
        inputID = p.inputVolume.GetID() if (p is not None and p.inputVolume is not None) else None
        if inputID != self._lastInputID and not self._importing:
            switched = self._lastInputID is not None  # another volume (setParameterNode syncs a scene's own input)
            self._lastInputID = inputID
            if switched and p is not None:
                # a noise level belongs to the volume it was set for (its units to its modality), and so do
                # the result nodes: the next Apply must not overwrite the previous volume's result
                if not p.autoNoise:
                    p.autoNoise = True
                for name in ("outputVolume", "uncertaintyVolume", "noiseMapVolume", "confidenceVolume"):
                    if getattr(p, name) is not None:
                        setattr(p, name, None)
            if inputID is not None:
                self.onGuessModality()  # propose a modality for a newly selected volume (user can change it)
        running = self._job is not None and not self._job.done
        network = p is not None and p.method == "dualnet"
        self.ui.networkCollapsibleButton.enabled = network
        self.ui.ttaComboBox.enabled = network
        self.ui.oneViewCheckBox.enabled = network
        self.ui.uncertaintyCheckBox.enabled = network
        self.ui.uncertaintyVolumeSelector.enabled = network and p.uncertainty
        self.ui.nebMapsCheckBox.enabled = network
        self.ui.noiseMapVolumeSelector.enabled = network and p.nebMaps
        self.ui.confidenceVolumeSelector.enabled = network and p.nebMaps
        self.ui.noiseLevelSpinBox.enabled = p is not None and not p.autoNoise
        if running:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the running denoising (kills the background process)")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.text = _("Apply")
            ok = p is not None and p.inputVolume is not None and (
                p.outputVolume is None or p.outputVolume.GetID() != p.inputVolume.GetID())
            self.ui.applyButton.enabled = ok
            self.ui.applyButton.toolTip = _("Denoise the input volume") if ok else _("Select an input volume")
        self.ui.computeDiceButton.enabled = p is not None and p.diceInputA is not None and p.diceInputB is not None

    # -- modality, noise ------------------------------------------------------------------
    def onGuessModality(self) -> None:
        node = self._parameterNode.inputVolume
        if node is None:
            return
        try:
            array = nodes.array_from_node(node, copy=False)
        except ValueError as err:  # no voxels yet (empty node) or a vector volume
            self.ui.modalityGuessLabel.text = str(err)
            return
        mod, reason = modalityGuess.guess_modality(array, dicom_modality=dicomModality(node))
        self._parameterNode.modality = mod
        self.ui.modalityGuessLabel.text = _("Guess: {modality} ({reason})").format(modality=mod.upper(), reason=reason)

    def onEstimateNoise(self) -> None:
        node = self._parameterNode.inputVolume
        if node is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Noise estimation failed."), waitCursor=True):
            from dualnet.estimate import estimate_noise

            est = estimate_noise(nodes.array_from_node(node, copy=True).astype("float32"), self._parameterNode.modality)
            sigma = float(getattr(est, "sigma", est))
            self._parameterNode.noiseLevel = sigma  # first: a value the node refuses leaves auto on
            self._parameterNode.autoNoise = False
            units = {"ct": _("HU at water"), "us": _("relative speckle std")}
            unit = units.get(getattr(est, "modality", "mri"), _("image units"))
            self.ui.statusLabel.text = _("Estimated noise sigma: {sigma:.4g} ({unit})").format(sigma=sigma, unit=unit)

    # -- models ---------------------------------------------------------------------------
    def refreshModels(self) -> None:
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem(_("Shipped model for the modality"), "")
        for entry in self._modelStore.list_models():
            combo.addItem(entry.label, entry.path)
        current = str(self._parameterNode.modelPath or "") if self._parameterNode else ""
        if current and combo.findData(current) < 0:  # a scene's model the list lacks: shown, not hidden
            state = _("not in the models list") if os.path.isfile(current) else _("file not found")
            combo.addItem(f"{os.path.basename(current)} ({state})", current)
        combo.setCurrentIndex(max(0, combo.findData(current)))
        combo.blockSignals(wasBlocked)

    def onModelSelected(self, index) -> None:
        if self._parameterNode is not None:
            self._parameterNode.modelPath = self.ui.modelComboBox.itemData(index) or ""

    def onImportModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Import DualNet model"), "", "DualNet model (*.safetensors)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Model import failed."), waitCursor=True):
            entry = self._modelStore.import_model(path)
            self.refreshModels()
            self.ui.modelComboBox.setCurrentIndex(self.ui.modelComboBox.findData(entry.path))

    def onBrowseModels(self) -> None:
        self._modelStore.user_dir.mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(self._modelStore.user_dir)))

    def onClearModels(self) -> None:
        if not slicer.util.confirmOkCancelDisplay(_("Remove all imported and trained models from {folder}?").format(
                folder=self._modelStore.user_dir)):
            return
        self._modelStore.clear_user_models()
        self._parameterNode.modelPath = ""
        self.refreshModels()

    # -- run ------------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        if self._job is not None and not self._job.done:
            self._job.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
            return
        p = self._parameterNode
        self._job = None
        try:
            self._startJob(p)
        except Exception:  # tryWithErrorDisplay showed the error (not in testing mode) and re-raises it
            logging.exception("DualNet: denoising did not start")
        finally:
            if self._job is None:  # did not start: no progress bar or "Starting..." left on screen
                self.ui.progressBar.setVisible(False)
                self.ui.statusLabel.text = ""
            self._updateGui()

    def _startJob(self, p) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start denoising."), waitCursor=True):
            from dualnet.inference import parse_tta

            self.ui.progressBar.setVisible(True)
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Starting...")
            self._job = self.logic.process(
                p.inputVolume,
                p.outputVolume,
                modality=p.modality,
                method=p.method,
                noiseLevel=None if p.autoNoise else p.noiseLevel,
                model=p.modelPath or None,
                device=p.device,
                tta=parse_tta(p.tta),
                uncertainty=p.uncertainty,
                uncertaintyVolume=p.uncertaintyVolume if p.uncertainty else None,
                waitForCompletion=False,
                progressCallback=self.onProgress,
                onFinished=self.onFinished,
                views=1 if p.oneView else None,
                nebMaps=p.nebMaps,
                noiseMapVolume=p.noiseMapVolume if p.nebMaps else None,
                confidenceVolume=p.confidenceVolume if p.nebMaps else None,
                newNodesForOtherResults=True,
            )

    def onProgress(self, fraction, message) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        if message:
            self.ui.statusLabel.text = message

    def onFinished(self, job: DenoiseJob) -> None:
        self.ui.progressBar.setVisible(False)
        if job.error:
            self.ui.statusLabel.text = _("Failed: {error}").format(error=job.error)
            if job.error != "cancelled by the user":
                slicer.util.errorDisplay(_("Denoising failed: {error}").format(error=job.error))
        elif self._parameterNode is None or job.outputVolume is None or job.outputVolume.GetScene() is None:
            self.ui.statusLabel.text = ""  # the scene closed meanwhile: nothing to show
        elif job.inputVolume is not None and self._parameterNode.inputVolume is not job.inputVolume:
            # the input was switched during the run: its result is not bound to the new input's selectors
            self.ui.statusLabel.text = _("Done: the result of '{input}' is in '{output}'.").format(
                input=job.inputVolume.GetName(), output=job.outputVolume.GetName())
        else:
            p = self._parameterNode
            p.outputVolume = job.outputVolume
            for name in ("uncertaintyVolume", "noiseMapVolume", "confidenceVolume"):
                if getattr(job, name) is not None:
                    setattr(p, name, getattr(job, name))
            self.ui.statusLabel.text = result_summary(job.info)
            showCompareView(p.inputVolume, job.outputVolume, job.uncertaintyVolume)
        self._updateGui()

    def onComputeDice(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Dice computation failed."), waitCursor=True):
            table = self.logic.computeDice(p.diceInputA, p.diceInputB, p.diceTable,
                                           referenceVolume=p.outputVolume or p.inputVolume)
            p.diceTable = table
            slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
            slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
            slicer.app.applicationLogic().PropagateTableSelection()


def firstScalarVolume(scene):
    """The first plain one-component scalar volume of ``scene`` (None if there is none): not a label
    map, vector, DWI or other subclass the input selector does not list."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
        image = node.GetImageData() if node is not None else None
        if node is not None and node.GetClassName() == "vtkMRMLScalarVolumeNode" and (
                image is None or image.GetNumberOfScalarComponents() == 1):
            return node
    return None


def showCompareView(inputVolume, outputVolume, uncertaintyVolume=None) -> None:
    """Side-by-side view: input on the left (Red), result on the right (Yellow), linked slices."""
    lm = slicer.app.layoutManager()
    if lm is None or inputVolume is None or outputVolume is None:
        return
    lm.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
    red = lm.sliceWidget("Red")
    for viewName, volume in (("Red", inputVolume), ("Yellow", outputVolume)):
        widget = lm.sliceWidget(viewName)
        if widget is None:
            continue
        if viewName == "Yellow" and red is not None:  # the layout keeps an existing Yellow view sagittal
            yellow = widget.mrmlSliceNode()
            yellow.GetSliceToRAS().DeepCopy(red.mrmlSliceNode().GetSliceToRAS())  # oblique ones too
            yellow.UpdateMatrices()
        composite = widget.mrmlSliceCompositeNode()
        composite.SetBackgroundVolumeID(volume.GetID())
        composite.SetForegroundVolumeID(uncertaintyVolume.GetID() if (uncertaintyVolume and viewName == "Yellow") else None)
        composite.SetForegroundOpacity(0.4)
        composite.SetLinkedControl(True)
        widget.sliceLogic().FitSliceToAll()
    if uncertaintyVolume is not None and uncertaintyVolume.GetDisplayNode() is not None:
        colorNode = slicer.mrmlScene.GetFirstNodeByName("Inferno")
        if colorNode is not None:
            uncertaintyVolume.GetDisplayNode().SetAndObserveColorNodeID(colorNode.GetID())


def dicomModality(node) -> Optional[str]:
    """DICOM (0008,0060) of a volume loaded from DICOM, or None."""
    uids = node.GetAttribute("DICOM.instanceUIDs") if node is not None else None
    db = getattr(slicer, "dicomDatabase", None)
    if not uids or db is None:
        return None
    try:
        filePath = db.fileForInstance(uids.split()[0])
        return db.fileValue(filePath, "0008,0060") or None
    except Exception:
        return None


def modelsFolder() -> str:
    """Per-user models folder: ``$DUALNET_MODELS_DIR`` or ``<Slicer user settings folder>/DualNet/models``."""
    env = os.environ.get("DUALNET_MODELS_DIR")
    if env:
        return env
    settingsDir = os.path.dirname(slicer.app.slicerUserSettingsFilePath)
    return os.path.join(settingsDir, "DualNet", "models")


#
# Logic
#


class DualNetDenoiseLogic(ScriptedLoadableModuleLogic, DenoiseLogicBase):
    """Denoising and Dice on MRML nodes; usable from the Python console and batch scripts:

    >>> logic = DualNetDenoiseLogic()
    >>> out = logic.process(volumeNode, None, modality="mri", method="gaussian")  # waits

    ``waitForCompletion=False`` runs the core in a ``PythonSlicer`` child process, polled by a
    ``QTimer``; the returned :class:`DenoiseJob` can be cancelled (process tree killed).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        interactive = not slicer.app.commandOptions().noMainWindow if hasattr(slicer.app, "commandOptions") else False
        DenoiseLogicBase.__init__(self, pythonExecutable=python_executable(), interactive=interactive)
        self._timers = []

    def getParameterNode(self):
        node = super().getParameterNode()
        saved = node.GetParameter("tta")
        if saved.lower() in ("true", "false"):  # scenes saved before session 14 stored a check box
            from dualnet.inference import parse_tta

            n = parse_tta(saved)  # the faces' one reading of it: true = 8, false = 1
            node.SetParameter("tta", f"x{n}" if n > 1 else "off")
        return DualNetDenoiseParameterNode(node)

    def setupPythonRequirements(self, method: str) -> None:
        """Install what ``method`` needs after ONE confirmation (PyTorch via the PyTorch extension, the rest
        with pip, Slicer's own packages pinned); without a main window a missing package raises a one-line
        ``DependencyError`` naming it."""
        dependencies.ensure_dependencies(
            method,
            interactive=self.interactive,
            confirm=lambda message: slicer.util.confirmOkCancelDisplay(message),
            pip_install=dependencies.slicer_pip_install,
            install_torch=dependencies.slicer_install_torch,
        )

    def process(self, inputVolume, outputVolume=None, modality="auto", method="dualnet", noiseLevel=None, model=None,
                device="auto", tta=None, uncertainty=False, uncertaintyVolume=None, waitForCompletion=True,
                progressCallback=None, inProcess=None, onFinished=None, cancel=None, views=None, nebMaps=False,
                noiseMapVolume=None, confidenceVolume=None, newNodesForOtherResults=False):
        import time

        self.setupPythonRequirements(method)  # clear message (or install on consent) before any work
        start = time.time()
        logging.info(f"DualNet: {method} on '{inputVolume.GetName() if inputVolume else None}' started")
        result = DenoiseLogicBase.process(
            self, inputVolume, outputVolume, modality, method, noiseLevel, model, device, tta, uncertainty,
            uncertaintyVolume, waitForCompletion, progressCallback, inProcess, onFinished, cancel, views, nebMaps,
            noiseMapVolume, confidenceVolume, newNodesForOtherResults)
        if isinstance(result, DenoiseJob):
            timer = qt.QTimer()
            timer.setInterval(100)

            def poll():
                if result.poll():
                    timer.stop()
                    self._timers.remove(timer)
                    logging.info(f"DualNet: {method} ended after {time.time() - start:.1f} s"
                                 + (f" ({result.error})" if result.error else ""))

            timer.connect("timeout()", poll)
            self._timers.append(timer)
            timer.start()
        else:
            logging.info(f"DualNet: {method} done in {time.time() - start:.1f} s")
        return result


#
# Test (runs inside Slicer: Reload and Test)
#


class DualNetDenoiseTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_GaussianKeepsGeometry()
        self.test_ChildProcessRun()
        self.test_DiceOnLabelmaps()

    def _obliqueVolume(self):
        """A noisy ellipsoid phantom (16 x 32 x 32) on an oblique, anisotropic grid; also returns its inner region."""
        import numpy as np

        rng = np.random.default_rng(0)
        z, y, x = np.mgrid[:16, :32, :32]
        body = ((z - 8) ** 2 / 36 + (y - 16) ** 2 / 144 + (x - 16) ** 2 / 144) < 1
        inner = ((z - 8) ** 2 / 9 + (y - 16) ** 2 / 36 + (x - 16) ** 2 / 36) < 1
        array = np.abs(20 + 200 * body + 10 * rng.standard_normal(body.shape)).astype("float32")
        theta = 0.3
        ijkToRAS = np.eye(4)
        ijkToRAS[:3, :3] = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]]) \
            @ np.diag([0.8, 1.1, 2.5])
        ijkToRAS[:3, 3] = [12.0, -30.0, 45.5]
        return slicer.util.addVolumeFromArray(array, ijkToRAS=ijkToRAS, name="DualNetTestInput"), inner

    def test_GaussianKeepsGeometry(self):
        import numpy as np

        self.delayDisplay("Gaussian denoising keeps geometry")
        node, inner = self._obliqueVolume()
        before = slicer.util.arrayFromVolume(node).copy()
        logic = DualNetDenoiseLogic()
        out = logic.process(node, None, modality="mri", method="gaussian")
        self.assertEqual(out.GetName(), "DualNetTestInput denoised (gaussian)")
        self.assertTrue(np.array_equal(nodes.get_ijk_to_ras(out), nodes.get_ijk_to_ras(node)))
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(node), before))
        self.assertLess(slicer.util.arrayFromVolume(out)[inner].std(), 0.8 * before[inner].std())
        self.assertEqual(out.GetAttribute("DualNet.method"), "gaussian")
        json.loads(out.GetAttribute("DualNet.parameters"))
        self.delayDisplay("Test passed")

    def test_ChildProcessRun(self):
        self.delayDisplay("Child-process run")
        node, _ = self._obliqueVolume()
        logic = DualNetDenoiseLogic()
        out = logic.process(node, None, modality="mri", method="gaussian", noiseLevel=10.0, waitForCompletion=True,
                            inProcess=False)
        self.assertEqual(out.GetAttribute("DualNet.method"), "gaussian")
        self.delayDisplay("Test passed")

    def test_DiceOnLabelmaps(self):
        import numpy as np

        self.delayDisplay("Dice on labelmaps")
        a = np.zeros((8, 16, 16), dtype="int16")
        a[2:6, 4:12, 4:12] = 1
        b = a.copy()
        b[2:6, 4:12, 4:8] = 0
        la = slicer.util.addVolumeFromArray(a, name="A", nodeClassName="vtkMRMLLabelMapVolumeNode")
        lb = slicer.util.addVolumeFromArray(b, name="B", nodeClassName="vtkMRMLLabelMapVolumeNode")
        table = DualNetDenoiseLogic().computeDice(la, lb)
        self.assertAlmostEqual(float(table.GetTable().GetValue(0, 2).ToDouble()), 2 * 128 / (256 + 128), places=6)
        self.delayDisplay("Test passed")
