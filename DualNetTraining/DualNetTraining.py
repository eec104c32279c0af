"""DualNet Training: Slicer scripted module to fine-tune or pretrain DUAL-NET on your own scans.

Training runs in a child process (``PythonSlicer -m dualnet finetune|train --progress-json``);
the panel shows progress, a live loss plot (table node + plot chart), can cancel and resume,
and registers the result in the per-user models folder, where the DualNet Denoise panel lists it.
Command lines and configs are built by ``DualNetDenoiseLib.training`` (tested outside Slicer).
"""

import logging
import os
import pathlib
import shutil
import tempfile
from typing import Annotated

import vtk

import ctk
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
from slicer import vtkMRMLPlotChartNode, vtkMRMLScalarVolumeNode, vtkMRMLTableNode

from DualNetDenoiseLib import dependencies, nodes, training
from DualNetDenoiseLib.models import ModelStore
from DualNetDenoiseLib.process import ProcessRunner, python_executable

MODALITIES = ["mri", "ct", "us"]
DEVICES = ["auto", "cpu", "cuda", "mps"]


class DualNetTraining(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DualNet Training")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Filtering.Denoising")]
        self.parent.dependencies = ["DualNetDenoise"]
        self.parent.contributors = ["DualNet developers"]
        self.parent.helpText = _(
            "Fine-tune DUAL-NET on your own noisy scans (self-supervised, no clean reference needed) or "
            "pretrain it from clean scans with simulated noise. Training runs in the background; "
            "the loss is plotted live; Cancel keeps the last checkpoint and Resume continues from it. "
            "The trained model is saved in your DualNet models folder and appears in the DualNet Denoise panel."
        )
        self.parent.acknowledgementText = _(
            "Training uses the dualnet core (self-supervised fine-tuning by SURE, or masking after Noise2Void / CAREamics). "
            "See the DualNet Denoise module for data attributions."
        )


@parameterNodeWrapper
class DualNetTrainingParameterNode:
    """trainingVolume / dataFolder - volumes to train on (scene and/or folder).
    stage - finetune (noisy scans) or pretrain (clean scans, simulated noise).
    preset - pretraining: shipped (continue the shipped model) or a network size trained from scratch. steps, device, initModel (base model for fine-tuning),
    noiseSigma (fine-tuning: the scans' noise level as `dualnet finetune --sigma`, MRI the Rician sigma in image
        units, CT the noise std at water in HU, US the relative speckle std; 0 = estimated from each scan),
    modelName (name in the models list), resume (continue the last run of that name).
    lossTable, lossChart - live loss plot."""

    trainingVolume: vtkMRMLScalarVolumeNode
    dataFolder: pathlib.Path = pathlib.Path()
    modality: Annotated[str, Choice(MODALITIES)] = "mri"
    stage: Annotated[str, Choice(list(training.STAGES))] = "finetune"
    preset: Annotated[str, Choice(list(training.PRESETS))] = "shipped"
    steps: Annotated[int, WithinRange(1, 1000000)] = 500
    device: Annotated[str, Choice(DEVICES)] = "auto"
    initModel: pathlib.Path = pathlib.Path()
    noiseSigma: Annotated[float, WithinRange(0.0, 1e6)] = 0.0
    modelName: str = "my-dualnet"
    resume: bool = False
    lossTable: vtkMRMLTableNode
    lossChart: vtkMRMLPlotChartNode


class DualNetTrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DualNetTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.dataFolderPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.initModelPathLineEdit.nameFilters = ["DualNet model (*.safetensors)"]
        self.ui.progressBar.setVisible(False)
        self.ui.deviceInfoLabel.text = dependencies.device_summary() if dependencies.is_installed("torch") \
            else _("PyTorch not installed: it is set up when training starts")

        self.logic = DualNetTrainingLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.startButton.connect("clicked(bool)", self.onStartButton)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.logic.shutdown()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
            self._updateGui()

    def _updateGui(self, caller=None, event=None) -> None:
        p = self._parameterNode
        running = self.logic.running
        self.ui.presetComboBox.enabled = p is not None and p.stage == "pretrain" and not running
        self.ui.initModelPathLineEdit.enabled = p is not None and p.stage == "finetune" and not running
        self.ui.modelNameLineEdit.enabled = not running  # the run saves under the name it started with
        if running:
            self.ui.startButton.text = _("Cancel")
            self.ui.startButton.enabled = True
        else:
            self.ui.startButton.text = _("Resume training") if (p is not None and p.resume) else _("Start training")
            hasData = p is not None and (p.trainingVolume is not None or str(p.dataFolder) not in ("", "."))
            self.ui.startButton.enabled = bool(hasData and p.modelName.strip())

    def onStartButton(self) -> None:
        if self.logic.running:
            self.logic.cancel()
            self.ui.statusLabel.text = _("Cancelling (the last checkpoint is kept)...")
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start training."), waitCursor=True):
            self.logic.setupPythonRequirements()
            self.ui.logTextEdit.clear()
            self.ui.progressBar.setVisible(True)
            self.ui.progressBar.value = 0
            self.logic.start(p, onProgress=self.onProgress, onOutput=self.onOutput, onFinished=self.onFinished)
            slicer.modules.plots.logic().ShowChartInLayout(p.lossChart)
        self._updateGui()

    def onProgress(self, payload) -> None:
        if payload.get("fraction") is not None:
            self.ui.progressBar.value = int(round(100 * float(payload["fraction"])))
        self.ui.statusLabel.text = training.progress_text(payload)

    def onOutput(self, line) -> None:
        self.ui.logTextEdit.appendPlainText(line)

    def onFinished(self, ok, message) -> None:
        self.ui.progressBar.setVisible(False)
        self.ui.statusLabel.text = message
        if not ok and "cancelled" not in message:
            slicer.util.errorDisplay(_("Training failed: {message}").format(message=message))
        self._updateGui()


class DualNetTrainingLogic(ScriptedLoadableModuleLogic):
    """Starts training in a child process and feeds the loss plot; no widgets here."""

    def __init__(self, popen=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        import subprocess

        self.popen = popen or subprocess.Popen
        self.runner = None
        self.timer = None
        self._workdir = None
        self._runDir = None

    def getParameterNode(self):
        return DualNetTrainingParameterNode(super().getParameterNode())

    @property
    def running(self) -> bool:
        return self.runner is not None and self.runner.running

    def setupPythonRequirements(self) -> None:
        """Install what training needs (PyTorch, safetensors, tomli on Python < 3.11) after one confirmation."""
        dependencies.ensure_dependencies(
            dependencies.TRAINING, interactive=True, confirm=slicer.util.confirmOkCancelDisplay,
            pip_install=dependencies.slicer_pip_install, install_torch=dependencies.slicer_install_torch)

    @staticmethod
    def modelsFolder() -> str:
        from DualNetDenoise import modelsFolder

        return modelsFolder()

    def _lossPlot(self, p):
        """(Re)create the loss table (step, loss, val_loss) and its chart."""
        if p.lossTable is None:
            p.lossTable = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "DualNet training loss")
        table = p.lossTable.GetTable()
        table.Initialize()
        for name in ("step", "loss", "val_loss"):
            col = vtk.vtkDoubleArray()
            col.SetName(name)
            table.AddColumn(col)
        if p.lossChart is None:
            chart = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotChartNode", "DualNet training loss")
            chart.SetTitle("Training loss")
            chart.SetXAxisTitle("step")
            chart.SetYAxisTitle("loss")
            chart.SetYAxisLogScale(True)
            for column, color in (("loss", (0.1, 0.4, 0.9)), ("val_loss", (0.9, 0.4, 0.1))):
                series = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", column)
                series.SetAndObserveTableNodeID(p.lossTable.GetID())
                series.SetXColumnName("step")
                series.SetYColumnName(column)
                series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
                series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
                series.SetColor(*color)
                chart.AddAndObservePlotSeriesNodeID(series.GetID())
            p.lossChart = chart
        p.lossTable.Modified()

    @staticmethod
    def _addPoint(tableNode, point) -> None:
        """Append ``point`` to the loss table node (nothing when it was removed, e.g. the scene closed)."""
        if tableNode is None or tableNode.GetScene() is None:
            return
        table = tableNode.GetTable()
        row = table.InsertNextBlankRow()
        nan = float("nan")
        table.SetValue(row, 0, vtk.vtkVariant(float(point.step)))
        table.SetValue(row, 1, vtk.vtkVariant(point.loss if point.loss is not None else nan))
        table.SetValue(row, 2, vtk.vtkVariant(point.val_loss if point.val_loss is not None else nan))
        table.Modified()
        tableNode.Modified()

    def buildCommand(self, p):
        """The child command line, the model file and the run folder for the parameters ``p``."""
        userDir = self.modelsFolder()
        os.makedirs(userDir, exist_ok=True)
        outModel, runDir = training.model_paths(userDir, p.modelName)
        if not p.resume:
            self._checkNewName(p.modelName, outModel, runDir)
        if self.running:
            raise RuntimeError("a training run is in progress; cancel it first")
        self.removeWorkdir()  # the staged copy of the previous run
        self._workdir = tempfile.mkdtemp(prefix="DualNetTraining-")
        try:
            return self._buildCommandIn(p, self._workdir, outModel, runDir)
        except BaseException:
            self.removeWorkdir()
            raise

    def _checkNewName(self, name, outModel, runDir) -> None:
        """A new run's name must be free: no model of that name (shipped ones included), no other entry
        using its file ("knee v1" and "knee_v1" share one), no earlier run's checkpoint to overwrite."""
        store = ModelStore(user_dir=self.modelsFolder())
        if store.find(name) is not None:
            raise ValueError(f"a model named '{name}' exists; choose another name or tick Resume")
        from dualnet.training.trainer import stopped_run_step

        step = stopped_run_step(runDir)
        if step is not None:
            raise ValueError(f"an earlier run named '{name}' was stopped at step {step} ({runDir}); tick Resume to "
                             "continue it, or choose another name")
        try:
            store.check_free(outModel)  # its file, or an entry using it
        except ValueError as err:
            raise ValueError(f"{err} or tick Resume") from None

    def _buildCommandIn(self, p, workdir, outModel, runDir):
        inputs = training.folder_volumes(p.dataFolder)
        if p.trainingVolume is not None:
            from dualnet.io import write_volume

            path = os.path.join(workdir, "scene_volume.nrrd")
            write_volume(nodes.volume_from_node(p.trainingVolume), path)
            inputs.insert(0, path)
        python = python_executable()
        if p.stage == "finetune":
            base = str(p.initModel) if str(p.initModel) not in ("", ".") else None
            if base is None:
                from dualnet import modelfile

                base = str(modelfile.default_model_path(p.modality))
            cmd = training.finetune_command(python, inputs, base, outModel, runDir, p.steps, p.device, p.resume,
                                            sigma=p.noiseSigma if p.noiseSigma > 0 else None)
        else:
            from dualnet import modelfile

            cfg = training.write_pretrain_config(training.configs_dir() / f"pretrain_{p.modality}.toml", inputs,
                                                 pathlib.Path(workdir) / "pretrain.toml", p.preset,
                                                 init_model=modelfile.default_model_path(p.modality))
            cmd = training.pretrain_command(python, cfg, runDir, outModel, p.steps, p.device, p.resume)
        return cmd, outModel, runDir

    def removeWorkdir(self) -> None:
        """Delete the temporary folder with the staged scene volume / config (never while a run uses it)."""
        if self._workdir is not None and not self.running:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def start(self, p, onProgress=None, onOutput=None, onFinished=None) -> None:
        cmd, outModel, runDir = self.buildCommand(p)
        self._runDir = runDir
        try:
            self._start(p, cmd, outModel, onProgress, onOutput, onFinished)
        except BaseException:
            if self.running:
                self.runner.cancel()
            self.runner = None
            self.removeWorkdir()
            raise

    def _start(self, p, cmd, outModel, onProgress, onOutput, onFinished) -> None:
        self._lossPlot(p)
        # the run's own name, stage and loss table: the panel's fields may change (or the scene close) meanwhile
        name, stage, tableNode = p.modelName, p.stage, p.lossTable
        env = dict(os.environ)
        moduleDir = os.path.dirname(os.path.dirname(training.__file__))
        env["PYTHONPATH"] = moduleDir + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"

        def progress(payload):
            point = training.point_from_event(payload)
            if point is not None:
                self._addPoint(tableNode, point)
            if onProgress:
                onProgress(payload)

        logging.info("DualNet training: " + " ".join(cmd))
        self.runner = ProcessRunner(cmd, on_progress=progress, on_output=onOutput, popen=self.popen, env=env).start()
        self.timer = qt.QTimer()
        self.timer.setInterval(200)

        def poll():
            code = self.runner.poll()
            if code is None:
                return
            self.timer.stop()
            self.removeWorkdir()
            ok = code == 0 and not self.runner.cancelled and outModel.exists()
            if ok:
                store = ModelStore(user_dir=self.modelsFolder())
                entry = store.find(name)
                if entry is None:
                    store.import_model(outModel, name=name, copy=False, source=f"trained ({stage})")
                if entry is None or pathlib.Path(entry.path).resolve() == outModel.resolve():
                    message = _("Model '{name}' saved: {path}").format(name=name, path=outModel)
                else:  # a resumed run whose name another model took meanwhile
                    ok = False
                    message = _("The model was written to {path}, but the name '{name}' belongs to another model "
                                "({other}); import it under another name").format(path=outModel, name=name,
                                                                                  other=entry.path)
            else:
                message = self.runner.failure_message() if not self.runner.cancelled else \
                    _("Training cancelled; tick Resume to continue from the last checkpoint")
            if onFinished:
                onFinished(ok, message)

        self.timer.connect("timeout()", poll)
        self.timer.start()

    #: seconds a cancelled run gets to write its checkpoint (it stops at the next step) before it is killed
    CANCEL_GRACE_S = 60.0

    def cancel(self) -> None:
        """Ask the run to stop (a stop file in its run folder, watched before every step on every
        platform): it writes its checkpoint and ends; killed if it has not after :attr:`CANCEL_GRACE_S`."""
        if self.runner is not None:
            self.runner.cancel(grace_s=self.CANCEL_GRACE_S, ask=self._askToStop)

    def _askToStop(self) -> None:
        from dualnet.training.stop_request import request_stop

        if self._runDir is None:
            raise OSError("no run folder to ask")
        request_stop(self._runDir)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop a running training (module unloaded, application closing) and remove its temporary folder."""
        if self.timer is not None:
            self.timer.stop()
        if self.running:
            self.runner.cancel(grace_s=max(0.0, timeout - 2.0), ask=self._askToStop)  # time to write its checkpoint
            try:
                self.runner.wait(timeout=timeout)
            except TimeoutError:
                logging.warning("DualNet training: the child process did not stop in time")
        self.removeWorkdir()


class DualNetTrainingTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_CommandAndPlot()

    def test_CommandAndPlot(self):
        import numpy as np

        self.delayDisplay("Training command and loss plot")
        logic = DualNetTrainingLogic()
        p = logic.getParameterNode()
        p.trainingVolume = slicer.util.addVolumeFromArray(np.random.rand(8, 32, 32).astype("float32"), name="T")
        p.modelName = "selftest-model"
        p.stage = "pretrain"
        cmd, outModel, runDir = logic.buildCommand(p)
        self.assertIn("--progress-json", cmd)
        self.assertEqual(cmd[2:4], ["dualnet", "train"])
        logic._lossPlot(p)
        logic._addPoint(p.lossTable, training.TrainingPoint(10, 0.5, None, None))
        self.assertEqual(p.lossTable.GetTable().GetNumberOfRows(), 1)
        staged = os.path.dirname(cmd[cmd.index("--config") + 1])
        logic.removeWorkdir()
        self.assertFalse(os.path.exists(staged))
        self.delayDisplay("Test passed")
