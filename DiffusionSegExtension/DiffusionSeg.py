"""DiffusionSeg: segment 13 abdominal organs in CT, annotate a few slices, fine-tune, write the result back.

Only the Slicer classes live here (module, widget, logic, self-test). Everything that does not need Slicer
(command lines, progress parsing, painted-slice bookkeeping, uncertainty ranking, model cards) is in
DiffusionSegLib.bridge, which imports with only the standard library and numpy, so the panel loads and
lists models before anything is installed; it is tested with pytest. The heavy work runs in a
`PythonSlicer -m DiffusionSegLib` child process so Slicer stays responsive and a crash or cancel cannot
take it down. Each click is one engine command (Segment: ``segment``; Fine-tune: ``refine``, which
fine-tunes, segments and merges the painted slices back), with the scene exported before and the result
imported after; engine modules that need torch, SimpleITK extras or slicerio never load in Slicer's process.
"""

import enum
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import numpy as np
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


def _engine_parent() -> Path:
    """The folder holding DiffusionSegLib: beside this file when installed, the repository root in a source checkout."""
    here = Path(__file__).resolve().parent
    return here if (here / "DiffusionSegLib").is_dir() else here.parent


if str(_engine_parent()) not in sys.path:
    sys.path.insert(0, str(_engine_parent()))

# The bridge needs only numpy and the standard library, which Slicer always has.
from DiffusionSegLib import strategies  # noqa: E402  (the strategy table: standard library only)
from DiffusionSegLib.bridge import commands, dependencies, model_cards, organ_volumes, painting, sample_data, scene  # noqa: E402
from DiffusionSegLib.bridge.job import CANCEL_GRACE_S, BackgroundJobs, JobEnd  # noqa: E402
from DiffusionSegLib.bridge.progress_parser import Event, Message, ProgressUpdate  # noqa: E402
from DiffusionSegLib.bridge.scene import UNCERTAINTY_ATTRIBUTE  # noqa: E402
from DiffusionSegLib.bridge.slice_ranking import check_report, rank_slices  # noqa: E402
from DiffusionSegLib.organs import FLARE22, LabelSet  # noqa: E402  (label sets: standard library only)

POLL_INTERVAL_MS = 200


class DependencyError(Exception):
    """A dependency cannot be installed from here; the message says what the user must do."""


#
# Module
#


class DiffusionSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DiffusionSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations", "SegmentEditor"]
        self.parent.contributors = ["DiffusionSeg contributors"]
        self.parent.helpText = _(
            "Segment organs in CT with a DDPM-pretrained U-Net: the bundled models segment 13 abdominal organs (FLARE22 label set), "
            "a model fine-tuned with a label set of its own segments those (its card lists them). Paint a few axial slices, "
            "fine-tune the model on them and write its result back without touching what you painted. "
            "A touched axial slice counts as annotated for the organs you painted; the organs you do not paint are kept from "
            "the selected model when fine-tuning starts from it. "
            'See the <a href="https://github.com/DiffusionSeg/DiffusionSeg#the-3d-slicer-extension">documentation</a>.'
        )
        self.parent.acknowledgementText = _(
            "Uses the FLARE22 organ label set and SNOMED CT codes of Slicer's DICOM terminology. "
            "The sample CT comes from the TotalSegmentator project's test data (Apache License 2.0)."
        )
        # Sample Data is loaded after all modules are set up: register the sample then.
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData() -> None:
    """Offer the bundled sample CT in the Sample Data module (category DiffusionSeg): Load sample, then Segment."""
    import SampleData

    iconPath = Path(__file__).resolve().parent / "Resources" / "Icons" / "DiffusionSeg.png"
    source = sample_data.sample_data_source(thumbnail=iconPath if iconPath.is_file() else None)
    if source is not None:
        SampleData.SampleDataLogic.registerCustomSampleDataSource(**source)


#
# Parameters
#


class Device(enum.Enum):
    AUTO = "auto"
    CUDA = "cuda"
    CPU = "cpu"
    if sys.platform == "darwin":  # Apple GPUs exist only on macOS; elsewhere the choice would only fail
        MPS = "mps"

    def label(self) -> str:
        return {"auto": "Auto", "cuda": "CUDA GPU", "cpu": "CPU", "mps": "Apple MPS"}[self.value]


class Strategy(enum.Enum):
    """The offered rows of DiffusionSegLib.strategies (a test keeps the members in step with the table)."""

    FT_DEC = "ft-dec"
    LP = "lp"
    FS = "fs"

    def label(self) -> str:
        return strategies.get(self.value).menu_label

    @property
    def pretrained(self) -> bool:
        """Starts from a pretrained backbone (False: random weights, only a base's architecture kept)."""
        return strategies.get(self.value).pretrained


class FinetuneFrom(enum.Enum):
    SELECTED = "selected"
    BASE = "base"

    def label(self) -> str:
        return {"selected": "the selected model", "base": "the pretrained base"}[self.value]


@parameterNodeWrapper
class DiffusionSegParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    annotationSegmentation: vtkMRMLSegmentationNode
    model: str = ""
    device: Device = Device.AUTO
    strategy: Strategy = Strategy.FT_DEC
    iterations: Annotated[int, WithinRange(1, 100000)] = 160
    timeLimitMinutes: Annotated[float, WithinRange(0, 1440)] = 0.0
    timestep: Annotated[int, WithinRange(0, 999)] = 0
    adaptSeconds: Annotated[int, WithinRange(0, 3600)] = 0
    finetuneFrom: FinetuneFrom = FinetuneFrom.SELECTED
    modelName: str = ""


#
# Widget
#


class State(enum.Enum):
    IDLE = "idle"
    INSTALLING = "installing"
    SEGMENTING = "segmenting"
    FINETUNING = "fine-tuning"
    CANCELLING = "cancelling"


class DiffusionSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.state = State.IDLE
        self._retry: Callable[[str], None] | None = None  # restarts the last job on another device (CUDA out-of-memory)
        self._statusTimer = qt.QTimer()
        self._statusTimer.setSingleShot(True)
        self._statusTimer.setInterval(800)  # debounce: painting fires many modified events
        self._observedSegmentation = None
        self._annotationEvents = ()  # the segmentation events observed for the annotated-slice count
        self._annotationStatus: dict | None = None  # the last count (Logic.annotationStatus), shown by showAnnotationStatus

    # --- set-up ---

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DiffusionSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = DiffusionSegLogic()
        self.logic.logCallback = self.addLog
        self.logic.progressCallback = self.onProgress

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.annotateButton.connect("clicked(bool)", self.onAnnotateButton)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetuneButton)
        self.ui.suggestButton.connect("clicked(bool)", self.onSuggestButton)
        self.ui.deleteModelButton.connect("clicked(bool)", self.onDeleteModel)
        self.ui.openModelsFolderButton.connect("clicked(bool)", self.onOpenModelsFolder)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.refreshModels)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.annotationSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.observeAnnotation)
        self._statusTimer.connect("timeout()", self.updateAnnotationStatus)
        self.ui.progressBar.hide()
        self.ui.strategyComboBox.toolTip = strategies.tooltip()

        self.initializeParameterNode()
        self.refreshModels()
        self.setState(State.IDLE)
        # Accelerators are asked in a child process once the panel is up: torch is never imported here.
        self.logic.probeDevices(self.updateDeviceWarning)
        self.logic.pruneWrittenLabels()

    def annotationLabelSet(self) -> LabelSet:
        """The organs the annotation is prepared and counted with: those the fine-tuned model will label (the model
        fine-tuning starts from decides them, read from its card; FLARE22's for the bundled models)."""
        try:
            return self.finetuneSettings().new_label_set()
        except Exception as e:  # a broken card or label set must not break the panel: the engine says what is wrong
            logging.warning(f"DiffusionSeg: cannot read the label set: {e}")
            return FLARE22

    def cleanup(self) -> None:
        self.logic.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        # Painting happened while the panel was hidden (in Segment Editor): count again.
        self.observeAnnotation(self._parameterNode.annotationSegmentation if self._parameterNode else None)

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self.updateButtons()

    # --- state machine ---

    def setState(self, state: State) -> None:
        """Buttons follow the state: the running action's button turns into Cancel, the others wait."""
        self.state = state
        busy = state != State.IDLE
        self.ui.segmentButton.text = _("Cancel") if state == State.SEGMENTING else _("Segment")
        self.ui.finetuneButton.text = _("Cancel") if state == State.FINETUNING else _("Fine-tune")
        if state == State.CANCELLING:
            self.ui.statusLabel.text = _("Cancelling...")
        if state == State.INSTALLING:
            self.ui.statusLabel.text = _("Installing Python packages; this may take several minutes...")
        self.ui.progressBar.setVisible(busy)
        for widget in (self.ui.annotateButton, self.ui.suggestButton, self.ui.deleteModelButton, self.ui.refreshModelsButton,
                       self.ui.inputVolumeSelector, self.ui.modelComboBox, self.ui.deviceComboBox):
            widget.enabled = not busy
        self.updateButtons()

    def updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        hasCT = bool(p.inputVolume)
        self.ui.segmentButton.enabled = self.state == State.SEGMENTING or (self.state == State.IDLE and hasCT and bool(self.selectedModel()))
        self.ui.finetuneButton.enabled = self.state == State.FINETUNING or (self.state == State.IDLE and hasCT and bool(p.annotationSegmentation))
        self.ui.annotateButton.enabled = self.state == State.IDLE and hasCT
        self.ui.suggestButton.enabled = self.state == State.IDLE and hasCT and self.reportSegmentation() is not None
        self.updateDeviceWarning()
        self.showAnnotationStatus()  # the strategy or the model to start from may have changed what is kept

    def updateDeviceWarning(self) -> None:
        if not self._parameterNode:
            return
        device = self._parameterNode.device
        devices = self.logic.devices  # None until the probe has answered (or while torch is not installed)
        onCpu = device == Device.CPU or (device == Device.AUTO and devices is not None and not devices["cuda"] and not devices["mps"])
        self.ui.deviceWarningLabel.text = (
            _("Running on the CPU: segmenting takes minutes and fine-tuning can take an hour. A CUDA GPU is much faster.") if onCpu else ""
        )
        self.ui.deviceWarningLabel.setStyleSheet("color: #c06000" if onCpu else "")

    # --- log and progress ---

    def addLog(self, text: str) -> None:
        logging.info(text)
        self.ui.logTextEdit.appendPlainText(text)
        self.ui.logTextEdit.ensureCursorVisible()

    def onProgress(self, update: ProgressUpdate) -> None:
        self.ui.progressBar.setMaximum(max(update.total, 1))
        self.ui.progressBar.setValue(min(update.step, max(update.total, 1)))
        self.ui.progressBar.setFormat(f"{update.label} %p%")
        self.ui.statusLabel.text = update.describe()

    # --- dependencies ---

    def ensureDependencies(self) -> bool:
        """Install what is missing after one confirmation listing all of it; False if the user declined or it failed."""
        try:
            missing = self.logic.missingDependencies()
        except DependencyError as e:
            slicer.util.errorDisplay(str(e))
            return False
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(
            _("DiffusionSeg needs these Python packages. Install them now? It needs a network connection and may take several minutes."),
            windowTitle=_("Install Python packages"),
            detailedText="\n".join(missing),
        ):
            self.addLog(_("Installation declined; nothing was installed."))
            return False
        self.setState(State.INSTALLING)
        slicer.app.processEvents()  # show the state before pip blocks
        installed = False
        try:
            # tryWithErrorDisplay shows the error and then re-raises it: caught here so the panel returns to idle.
            with slicer.util.tryWithErrorDisplay(_("Failed to install the Python packages."), waitCursor=True):
                self.logic.installDependencies()
                installed = True
        except Exception as e:
            self.addLog(_("Installing the Python packages failed: {error}").format(error=e))
        finally:
            self.setState(State.IDLE)
        self.ui.statusLabel.text = "" if installed else _("The Python packages were not installed; see the log. Nothing else was changed.")
        self.refreshModels()
        if installed:
            self.logic.probeDevices(self.updateDeviceWarning)
            self.logic.offerRestart()
        return installed

    # --- models ---

    def refreshModels(self) -> None:
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        models = self.logic.segmentationModels()
        if not models:
            combo.addItem(_("(no segmentation model yet: annotate and fine-tune)"), "")
        else:
            for info in models:
                combo.addItem(f"{info.name} ({info.source})", str(info.path))
            wanted = self._parameterNode.model if self._parameterNode else ""
            index = combo.findData(wanted)
            combo.currentIndex = index if index >= 0 else 0
        combo.blockSignals(wasBlocked)
        self.onModelSelected()

    def selectedModel(self) -> str:
        return self.ui.modelComboBox.currentData or ""

    def onModelSelected(self, index: int = -1) -> None:
        path = self.selectedModel()
        if self._parameterNode and path:
            self._parameterNode.model = path
        self.ui.modelInfoLabel.text = self.logic.describeModel(path) if path else ""
        self.ui.deleteModelButton.enabled = self.state == State.IDLE and self.logic.isUserModel(path)
        self.updateButtons()
        self._statusTimer.start()  # another model may label other organs: count the annotation again

    def onDeleteModel(self) -> None:
        path = self.selectedModel()
        if not path or not slicer.util.confirmYesNoDisplay(_("Delete the model {path}? This cannot be undone.").format(path=path)):
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to delete the model.")):
            self.logic.deleteModel(path)
            self.addLog(_("Deleted model {path}").format(path=path))
        self.refreshModels()

    def onOpenModelsFolder(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to open the models folder.")):
            folder = self.logic.modelsFolder()
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    # --- actions ---

    def cancel(self) -> None:
        self.setState(State.CANCELLING)
        self.logic.cancel()

    def onSegmentButton(self) -> None:
        if self.state == State.SEGMENTING:
            self.cancel()
            return
        if not self.ensureDependencies():
            return
        self.startSegment(self._parameterNode.device.value)

    def startSegment(self, device: str) -> None:
        p = self._parameterNode
        self._retry = self.startSegment
        self.ui.organVolumesLabel.text = ""  # the volumes shown belong to the previous result
        self.setState(State.SEGMENTING)
        with slicer.util.tryWithErrorDisplay(_("Failed to start segmenting."), waitCursor=True):
            try:
                p.outputSegmentation = self.logic.segment(p.inputVolume, p.outputSegmentation, self.selectedModel(), device, self.onJobFinished)
            except Exception:
                self.setState(State.IDLE)
                raise

    def onAnnotateButton(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to prepare the annotation segmentation."), waitCursor=True):
            p.annotationSegmentation = self.logic.prepareAnnotation(p.inputVolume, p.annotationSegmentation, self.annotationLabelSet())
            self.logic.openSegmentEditor(p.annotationSegmentation, p.inputVolume)
            self.updateAnnotationStatus()

    def onFinetuneButton(self) -> None:
        if self.state == State.FINETUNING:
            self.cancel()
            return
        if not self.ensureDependencies():
            return
        self.startFinetune(self._parameterNode.device.value)

    def finetuneSettings(self) -> commands.FinetuneSettings:
        p = self._parameterNode
        base = self.selectedModel() if p.finetuneFrom == FinetuneFrom.SELECTED and self.selectedModel() else None
        return commands.FinetuneSettings(
            strategy=p.strategy.value,
            iterations=p.iterations,
            time_limit_s=p.timeLimitMinutes * 60 if p.timeLimitMinutes > 0 else None,
            timestep=p.timestep,
            base=base if p.strategy.pretrained else None,
            adapt_s=p.adaptSeconds if p.strategy.pretrained else None,  # random weights: no pretrained backbone to adapt
            label_set=base if not p.strategy.pretrained else None,  # from random weights the selected model still says the organs
        )

    def startFinetune(self, device: str) -> None:
        p = self._parameterNode
        self._retry = self.startFinetune
        self.setState(State.FINETUNING)
        with slicer.util.tryWithErrorDisplay(_("Failed to start fine-tuning."), waitCursor=True):
            try:
                self.logic.finetune(p.inputVolume, p.annotationSegmentation, self.finetuneSettings(), p.modelName.strip() or None, device,
                                    self.onJobFinished)
            except Exception:
                self.setState(State.IDLE)
                raise

    def onJobFinished(self, ok: bool, message: str, outOfMemory: bool) -> None:
        self.setState(State.IDLE)
        self.ui.statusLabel.text = message
        self.addLog(message)
        if ok:
            self.refreshModels()
            self.updateAnnotationStatus()
            self.showOrganVolumes()
            if self.logic.lastModel:
                index = self.ui.modelComboBox.findData(str(self.logic.lastModel))
                if index >= 0:
                    self.ui.modelComboBox.currentIndex = index
        elif outOfMemory and self._retry is not None:
            if slicer.util.confirmYesNoDisplay(
                _("The GPU ran out of memory. Retry on the CPU? It will be slower."), windowTitle=_("GPU out of memory")
            ):
                self._retry("cpu")

    def showOrganVolumes(self) -> None:
        """Per-organ volumes (and mean HU) of the latest result, computed by Slicer's Segment Statistics."""
        p = self._parameterNode
        node = p.outputSegmentation if p else None
        if not node or not p.inputVolume or self.logic.lastJob != "segment":
            return
        try:
            self.ui.organVolumesLabel.text = self.logic.organVolumesText(node, p.inputVolume)
        except Exception as e:  # statistics are a bonus: never turn a finished segmentation into an error
            logging.exception("DiffusionSeg organ statistics failed")
            self.ui.organVolumesLabel.text = _("Organ volumes unavailable: {error}").format(error=e)

    # --- annotation status and suggestions ---

    def annotationEvents(self) -> tuple:
        """Segmentation events after which the annotated slices are counted again.

        Painting in Segment Editor changes the source representation and fires SourceRepresentationModified
        (not Modified or SegmentModified); those two cover added, removed and renamed segments.
        """
        return (vtk.vtkCommand.ModifiedEvent, slicer.vtkSegmentation.SegmentModified, slicer.vtkSegmentation.SourceRepresentationModified,
                slicer.vtkSegmentation.SegmentAdded, slicer.vtkSegmentation.SegmentRemoved)

    def observeAnnotation(self, node) -> None:
        if self._observedSegmentation is not None:
            for event in self._annotationEvents:
                self.removeObserver(self._observedSegmentation, event, self.onAnnotationModified)
        self._observedSegmentation = node.GetSegmentation() if node else None
        self._annotationEvents = self.annotationEvents() if self._observedSegmentation is not None else ()
        for event in self._annotationEvents:
            self.addObserver(self._observedSegmentation, event, self.onAnnotationModified)
        self.updateAnnotationStatus()

    def onAnnotationModified(self, caller=None, event=None) -> None:
        self._statusTimer.start()

    @staticmethod
    def annotationHint() -> str:
        return _("An axial slice you touch counts as annotated for the organs you painted (on any slice): on it, an unpainted voxel is "
                 "none of them.")

    def updateAnnotationStatus(self) -> None:
        """Count the annotated slices again (after painting: debounced), then show them."""
        p = self._parameterNode
        self._annotationStatus = None
        if not p or not p.inputVolume or not p.annotationSegmentation:
            self.ui.annotationStatusLabel.text = self.annotationHint()
            return
        try:
            self._annotationStatus = self.logic.annotationStatus(p.annotationSegmentation, p.inputVolume, self.annotationLabelSet())
        except Exception as e:  # a status line must never break painting
            self.ui.annotationStatusLabel.text = _("Cannot count annotated slices: {error}").format(error=e)
            return
        self.showAnnotationStatus()

    def showAnnotationStatus(self) -> None:
        """The last count, with what fine-tuning would learn and keep: shown again when the fine-tune settings change."""
        status = self._annotationStatus
        if status is None or self._parameterNode is None:
            return
        labelSet = self.annotationLabelSet()
        text = _("{count} annotated axial slices").format(count=len(status["slices"]))
        if status["slices"]:
            shown = ", ".join(str(i + 1) for i in status["slices"][:20]) + (", ..." if len(status["slices"]) > 20 else "")
            text += f" ({shown})"
            text += "\n" + painting.describe_organ_plan(status["organs"], self.finetuneSettings().starting_segmentor(), labelSet)
        if status["unmatched"]:
            text += "\n" + _("Segments not matching any of {organs} (rename or delete them before fine-tuning): {names}").format(
                organs=labelSet.describe(), names=", ".join(status["unmatched"]))
        self.ui.annotationStatusLabel.text = text + "\n" + self.annotationHint()

    def reportSegmentation(self):
        """The segmentation holding the latest uncertainty report: the annotation, else the segmentation result."""
        p = self._parameterNode
        for node in (p.annotationSegmentation, p.outputSegmentation) if p else ():
            if node and node.GetAttribute(UNCERTAINTY_ATTRIBUTE):
                return node
        return None

    def onSuggestButton(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to suggest a slice.")):
            suggestion = self.logic.suggestSlice(self.reportSegmentation(), p.annotationSegmentation, p.inputVolume)
            if suggestion is None:
                self.ui.suggestionLabel.text = _("Every slice with enough body is annotated already.")
                return
            index, uncertainty, remaining = suggestion
            self.logic.jumpToSlice(p.inputVolume, index)
            self.ui.suggestionLabel.text = _("Slice {number} (uncertainty {value:.3f}) is the most uncertain of {count} unannotated slices.").format(
                number=index + 1, value=uncertainty, count=remaining)


#
# Logic
#


class DiffusionSegLogic(ScriptedLoadableModuleLogic):
    """Scene I/O and the background engine process. Reports through callbacks; knows no widget."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.logCallback: Callable[[str], None] = logging.info
        self.progressCallback: Callable[[ProgressUpdate], None] = lambda update: None
        # The engine job of the latest click and the device probe, in child processes; one timer polls both.
        self.jobs = BackgroundJobs(cancel_grace_s=CANCEL_GRACE_S)
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self._poll)
        self.lastModel: Path | None = None
        self.devices: dict[str, bool] | None = None  # {"cuda": ..., "mps": ...} once the device probe has answered
        self.lastJob: str | None = None  # "segment" or "finetune": what the last successful job was
        self.lastSegmentModel: str | None = None  # the model of the last segment job: its card's held-out figures are shown
        self.lastWarnings: list[str] = []  # the engine's warnings about the last job's scan and result
        self._upgradedLoaded: list[dependencies.Missing] = []  # packages upgraded while imported: restart advised

    def getParameterNode(self):
        return DiffusionSegParameterNode(super().getParameterNode())

    # --- dependencies ---

    def missingDependencies(self) -> list[str]:
        """Everything that must be installed, as lines for the confirmation; DependencyError if PyTorch cannot come from here."""
        missing = []
        if dependencies.torch_missing() is not None:
            try:
                import PyTorchUtils  # noqa: F401
            except ImportError as e:
                raise DependencyError(
                    _("DiffusionSeg needs the PyTorch extension. Install 'PyTorch' from the Extensions Manager, restart Slicer and try again.")
                ) from e
            missing.append(f"torch>={dependencies.TORCH_MINIMUM} " + _("(through the PyTorch extension: a CUDA build if an NVIDIA GPU is found)"))
        missing += [m.describe() for m in dependencies.missing_requirements()]
        return missing

    def installDependencies(self) -> None:
        """Install torch through PyTorchUtils and the rest with pip, keeping Slicer's numpy, SimpleITK and requests."""
        if dependencies.torch_missing() is not None:
            import PyTorchUtils

            self.logCallback(_("Installing PyTorch through the PyTorch extension (several minutes)..."))
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=f">={dependencies.TORCH_MINIMUM}")
            if torch is None:
                raise DependencyError(_("PyTorch was not installed; install it in the PyTorch Utils module and try again."))
        missingPackages = dependencies.missing_requirements()
        requirements = [m.requirement for m in missingPackages]
        if not requirements:
            return
        self.logCallback(_("Installing {packages}...").format(packages=", ".join(requirements)))
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
            f.write(dependencies.constraints())
            constraintsPath = f.name
        try:
            try:
                import slicer.packaging as packaging  # Slicer 5.12 and later
            except ImportError:
                packaging = None
            if packaging is not None and hasattr(packaging, "pip_ensure"):
                # Progress dialog with the pip log, and its own restart prompt when an upgraded package was already
                # imported. The user confirmed the full list (torch included) already; testing mode must install too.
                packaging.pip_ensure(requirements, constraints=constraintsPath, prompt_install=False, requester="DiffusionSeg",
                                     skip_in_testing=False)
            else:  # Slicer 5.10: plain pip, and the restart prompt is ours (offerRestart)
                self._upgradedLoaded = dependencies.loaded_upgrades(missingPackages, sys.modules)
                slicer.util.pip_install([*requirements, "-c", constraintsPath])
        finally:
            os.unlink(constraintsPath)
        missing = dependencies.missing_requirements()
        if missing:
            raise DependencyError(_("Still missing after installation: {packages}").format(packages=", ".join(m.describe() for m in missing)))

    def offerRestart(self) -> None:
        """Slicer 5.10: after upgrading packages that were already imported, advise a restart (5.12+: pip_ensure asks)."""
        upgraded, self._upgradedLoaded = self._upgradedLoaded, []
        if upgraded and slicer.util.confirmYesNoDisplay(
            _("Upgraded Python packages were already loaded and may not work correctly until Slicer restarts. Restart now?"),
            windowTitle=_("Restart recommended"), detailedText="\n".join(m.describe() for m in upgraded),
        ):
            slicer.util.restart()

    def probeDevices(self, onDone: Callable[[], None]) -> None:
        """Ask a child Python which accelerators torch sees; `onDone()` once `self.devices` is known.

        A child, not an import here: torch takes seconds to import in the GUI thread, and a broken torch
        must not stop the panel from loading. Without torch nothing is asked (devices stay unknown).
        """
        if dependencies.torch_missing() is not None:
            return

        def done(devices: dict[str, bool] | None, stderrTail: str) -> None:
            if devices is None:
                logging.warning("DiffusionSeg: torch could not report its devices: %s", stderrTail[-500:])
            else:
                self.devices = devices
            onDone()

        if self.jobs.start_probe([self.python(), *commands.device_probe_args()], done, env=self.childEnvironment()):
            self._timer.start()

    # --- models ---

    def segmentationModels(self) -> list[model_cards.ModelEntry]:
        """Bundled and user segmentation models, read from their model.json cards (no torch needed)."""
        return model_cards.list_models("segmentor")

    def modelsFolder(self) -> Path:
        folder = model_cards.user_models_dir()
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def isUserModel(self, path: str) -> bool:
        return model_cards.is_user_model(path)

    def describeModel(self, path: str) -> str:
        card = Path(path) / "model.json"
        try:
            data = json.loads(card.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            return _("Cannot read {card}: {error}").format(card=card, error=e)
        provenance = data.get("provenance") or {}
        parts = [f"{data.get('name') or Path(path).name}: {data.get('kind')}, preset {data.get('preset')}, strategy {data.get('strategy')}"]
        parts.append(_("labels {organs}").format(organs=model_cards.label_set(path).describe()))
        if provenance.get("created"):
            parts.append(_("created {when}").format(when=provenance["created"]))
        if provenance.get("training_slices"):
            slices = provenance["training_slices"]
            parts.append(_("{count} training slices ({organs})").format(count=slices.get("slices"), organs=", ".join(slices.get("organs", []))))
        if isinstance(data.get("postprocessing"), dict) and data["postprocessing"].get("cleanup"):
            parts.append(_("cleans up its segmentations (stray islands removed, holes filled)"))
        if isinstance(provenance.get("adaptation"), dict):
            adaptation = provenance["adaptation"]
            parts.append(_("adapted to its CT for {seconds:.0f} s ({iterations} iterations) before fine-tuning").format(
                seconds=adaptation.get("seconds") or 0, iterations=adaptation.get("iterations")))
        parts.append(str(path))
        return "\n".join(parts)

    def deleteModel(self, path: str) -> None:
        if not self.isUserModel(path):
            raise ValueError(_("{path} is not one of your fine-tuned models; bundled models cannot be deleted here.").format(path=path))
        shutil.rmtree(path)

    # --- scene work: DiffusionSegLib.bridge.scene, on the open scene ---

    @staticmethod
    def sceneOps() -> scene.SceneOps:
        return scene.SceneOps(slicer.mrmlScene, slicer.modules.segmentations.logic())

    def exportVolume(self, volumeNode, path: Path) -> Path:
        return self.sceneOps().export_volume(volumeNode, path)

    def exportSegmentation(self, segmentationNode, path: Path) -> Path:
        return self.sceneOps().export_segmentation(segmentationNode, path)

    def importSegmentation(self, path: Path, segmentationNode, volumeNode, labelSet: LabelSet | None = None) -> None:
        self.sceneOps().import_segmentation(path, segmentationNode, volumeNode, labelSet or FLARE22)

    def placeBeside(self, node, volumeNode) -> None:
        self.sceneOps().place_beside(node, volumeNode)

    def newSegmentation(self, volumeNode, suffix: str):
        return self.sceneOps().new_segmentation(volumeNode, suffix)

    @staticmethod
    def workFolder(kind: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"DiffusionSeg-{kind}-", dir=slicer.app.temporaryPath))

    # --- annotation ---

    def prepareAnnotation(self, volumeNode, segmentationNode=None, labelSet: LabelSet | None = None):
        """A segmentation with a segment for every organ of `labelSet` (default: FLARE22's 13; missing ones added empty, with
        terminology), ready to paint."""
        if volumeNode is None:
            raise ValueError(_("Select a CT volume first."))
        return self.sceneOps().prepare_annotation(volumeNode, segmentationNode, labelSet or FLARE22)

    @staticmethod
    def openSegmentEditor(segmentationNode, volumeNode) -> None:
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentationNode)
        editor.setSourceVolumeNode(volumeNode)

    def annotationStatus(self, segmentationNode, volumeNode, labelSet: LabelSet | None = None) -> dict:
        """Annotated axial slices, organs (of `labelSet`, default FLARE22's) painted on them and unmatched segment names
        (numpy only: runs before any install)."""
        return self.sceneOps().annotation_status(segmentationNode, volumeNode, labelSet or FLARE22)

    @staticmethod
    def writtenLabelsFolder() -> Path:
        return model_cards.user_models_dir().parent / "written-labels"

    def pruneWrittenLabels(self) -> None:
        """Delete long-unused written-labels files; those of segmentations in the open scene stay."""
        try:
            for path in painting.prune_written_labels(self.writtenLabelsFolder(), keep=self.sceneOps().written_paths_in_use()):
                logging.info(f"DiffusionSeg: deleted unused {path}")
        except OSError as e:  # housekeeping must never stop the panel from loading
            logging.warning(f"DiffusionSeg: could not clean up {self.writtenLabelsFolder()}: {e}")

    def organVolumesText(self, segmentationNode, volumeNode) -> str:
        """Per-organ volume, mean and standard deviation in HU (Slicer's Segment Statistics), the model's held-out DSC
        per organ with "check" where it is low, and the engine's warnings about the scan."""
        import SegmentStatistics

        statisticsLogic = SegmentStatistics.SegmentStatisticsLogic()
        parameters = statisticsLogic.getParameterNode()
        parameters.SetParameter("Segmentation", segmentationNode.GetID())
        parameters.SetParameter("ScalarVolume", volumeNode.GetID())
        parameters.SetParameter("visibleSegmentsOnly", str(False))
        for plugin in statisticsLogic.plugins:
            pluginName = plugin.__class__.__name__
            parameters.SetParameter(f"{pluginName}.enabled", str(pluginName in organ_volumes.PLUGINS))
        statisticsLogic.computeStatistics()
        segmentation = segmentationNode.GetSegmentation()
        names = {i: scene.segment_name_and_terminology(segmentation, i) for i in segmentation.GetSegmentIDs()}
        labelSet = model_cards.label_set(self.lastSegmentModel)  # the organs the segmenting model labels
        rows, absent = organ_volumes.organ_volumes(statisticsLogic.getStatistics(), names, labelSet)
        card = model_cards.find_card(self.lastSegmentModel) if self.lastSegmentModel else None
        return organ_volumes.describe_volumes(rows, absent, card, self.lastWarnings, labelSet)

    # --- background runs ---

    @staticmethod
    def python() -> str:
        """Slicer's Python launcher (the engine's packages are installed for it), or this Python outside Slicer."""
        return shutil.which("PythonSlicer") or sys.executable

    @staticmethod
    def childEnvironment() -> dict[str, str]:
        return commands.child_environment(os.environ, _engine_parent())

    def startJob(self, engineArgs: list[list[str]], onEnd: Callable[[JobEnd], None]) -> None:
        """Run the engine once per argument list, one after another in child processes; `onEnd(end)` once the job is over."""
        command_lines = [commands.engine_command(self.python()) + args for args in engineArgs]
        self.jobs.start_job(command_lines, onEnd, self._onEvent, env=self.childEnvironment())
        for line in command_lines:
            self.logCallback(" ".join(f'"{c}"' if " " in c else c for c in line))
        self._timer.start()

    def _onEvent(self, event: Event) -> None:
        if isinstance(event, ProgressUpdate):
            self.progressCallback(event)
        else:
            if isinstance(event, Message) and event.warning is not None:
                self.lastWarnings.append(event.warning)
            self.logCallback(event.text)

    def _poll(self) -> None:
        if not self.jobs.poll():
            self._timer.stop()

    def cancel(self) -> None:
        if self.jobs.cancel():
            self.logCallback(_("Cancelling..."))

    def waitForCompletion(self, timeout: float = 3600) -> None:
        """Process events until the current job has ended and its result is loaded: for scripts and the self-test."""
        deadline = time.monotonic() + timeout
        while self.jobs.busy:
            if time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(_("DiffusionSeg did not finish within {seconds} s").format(seconds=timeout))
            slicer.app.processEvents()
            time.sleep(0.02)

    # --- jobs ---

    def segment(self, volumeNode, segmentationNode, model: str, device: str, onDone: Callable[[bool, str, bool], None]):
        """Segment the CT in the background into `segmentationNode` (created when None, and returned).

        `onDone(ok, message, outOfMemory)` once the result is loaded or the job failed.
        """
        if volumeNode is None:
            raise ValueError(_("Select a CT volume first."))
        if not model:
            raise ValueError(_("Select a segmentation model first (or fine-tune one)."))
        if self.jobs.busy:
            raise RuntimeError(_("DiffusionSeg is already running; wait for it or cancel it first."))
        created = segmentationNode is None
        if created:
            segmentationNode = self.newSegmentation(volumeNode, "organs")
        folder = self.workFolder("segment")
        result, report = folder / "result.seg.nrrd", folder / "uncertainty.json"
        started = time.monotonic()
        self.lastSegmentModel, self.lastWarnings = str(model), []

        def done(end: JobEnd) -> None:
            ok, outOfMemory = False, end.out_of_memory
            try:
                if not end.ok:
                    message = f"{_('Segmenting')} {end.describe()}"
                else:
                    self.importSegmentation(result, segmentationNode, volumeNode, model_cards.label_set(model))
                    self.placeBeside(segmentationNode, volumeNode)
                    segmentationNode.SetAttribute(UNCERTAINTY_ATTRIBUTE, report.read_text(encoding="utf-8"))
                    self.lastJob = "segment"
                    ok, message = True, _("Segmented in {seconds:.0f} s.").format(seconds=time.monotonic() - started)
            except Exception as e:
                logging.exception("DiffusionSeg: loading the segmentation failed")
                message = _("Segmenting finished but the result could not be loaded: {error}").format(error=e)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            if not ok and created:  # no empty node left behind by a failed or cancelled run
                slicer.mrmlScene.RemoveNode(segmentationNode)
            onDone(ok, message, outOfMemory)

        try:
            ct = self.exportVolume(volumeNode, folder / "ct.nrrd")
            self.startJob([commands.segment_args(ct, result, model=model, device=device, uncertainty=report)], done)
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            if created:
                slicer.mrmlScene.RemoveNode(segmentationNode)
            raise
        return segmentationNode

    def finetune(self, volumeNode, annotationNode, settings: commands.FinetuneSettings, name: str | None, device: str,
                 onDone: Callable[[bool, str, bool], None]) -> None:
        """One engine job (``diffusionseg refine``): fine-tune on the annotated slices, segment with the new model and
        write the result back into the annotation, keeping the painted slices as they are.

        The annotated slices are annotated for the organs painted on them; the organs not painted are kept from the
        model fine-tuning starts from (when that is a segmentation model). `onDone(ok, message, outOfMemory)` once the
        result is loaded or the job failed; the annotation is changed only when the whole job succeeded.
        """
        if volumeNode is None or annotationNode is None:
            raise ValueError(_("Select a CT volume and the annotation segmentation first."))
        if self.jobs.busy:
            raise RuntimeError(_("DiffusionSeg is already running; wait for it or cancel it first."))
        labelSet = settings.new_label_set()  # the organs the new model labels: the annotation's segments are read as those
        status = self.annotationStatus(annotationNode, volumeNode, labelSet)  # what the engine will take from the exported files
        if status["unmatched"]:
            raise ValueError(_("Rename or delete the segments that match none of {organs} before fine-tuning: {names}").format(
                organs=labelSet.describe(), names=", ".join(status["unmatched"])))
        if not status["slices"]:
            raise ValueError(_("No annotated slice yet: paint at least one organ on one axial slice."))
        if not status["organs"]:
            raise ValueError(_("The annotated slices hold no organ: paint at least one organ on one of them."))
        folderName = commands.model_folder_name(name or volumeNode.GetName(), [i.name for i in model_cards.list_models()])
        output = model_cards.user_models_dir() / folderName
        previous = scene.written_path(annotationNode)
        written = previous if previous is not None and previous.suffix == painting.WRITTEN_SUFFIX else None  # older formats: not read
        writtenOutput = painting.new_written_path(self.writtenLabelsFolder())  # a new name: the node's file stays until success
        folder = self.workFolder("finetune")
        result, report = folder / "result.seg.nrrd", folder / "uncertainty.json"
        self.logCallback(_("Fine-tuning on {count} annotated slices. {plan}").format(
            count=len(status["slices"]), plan=painting.describe_organ_plan(status["organs"], settings.starting_segmentor(), labelSet)))
        started = time.monotonic()

        def done(end: JobEnd) -> None:
            ok, outOfMemory = False, end.out_of_memory
            try:
                if not end.ok:
                    message = f"{_('Fine-tuning')} {end.describe()}"
                else:
                    self.lastModel = output
                    self.logCallback(_("Saved the fine-tuned model {name} in {path}").format(name=name or folderName, path=output))
                    self.sceneOps().write_back(volumeNode, annotationNode, result, status["slices"], report, writtenOutput, labelSet)
                    self.lastJob = "finetune"
                    ok, message = True, _("Fine-tuned and segmented in {seconds:.0f} s; your {count} annotated slices were kept.").format(
                        seconds=time.monotonic() - started, count=len(status["slices"]))
            except Exception as e:
                logging.exception("DiffusionSeg: loading the fine-tuned result failed")
                message = _("Fine-tuning finished but the result could not be written back: {error}").format(error=e)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
                if scene.written_path(annotationNode) != writtenOutput:  # not taken into use: a failed run's file, or none
                    writtenOutput.unlink(missing_ok=True)
            onDone(ok, message, outOfMemory)

        try:
            ct = self.exportVolume(volumeNode, folder / "ct.nrrd")
            annotationFile = self.exportSegmentation(annotationNode, folder / "annotation.seg.nrrd")
            args = commands.refine_args(ct, annotationFile, output, result, settings, recorded=scene.recorded_slices(annotationNode),
                                        written=written, written_output=writtenOutput, organs=status["organs"], uncertainty=report,
                                        name=name or folderName, device=device)
            self.startJob([args], done)
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    # --- suggestions ---

    def suggestSlice(self, reportNode, annotationNode, volumeNode) -> tuple[int, float, int] | None:
        """(slice index, its uncertainty, number of candidates) of the most uncertain unannotated slice."""
        if reportNode is None:
            raise ValueError(_("Segment first: the suggestion comes from the model's uncertainty."))
        report = check_report(json.loads(reportNode.GetAttribute(UNCERTAINTY_ATTRIBUTE)))
        if report["num_slices"] != volumeNode.GetImageData().GetDimensions()[report["slice_axis"]]:
            raise ValueError(_("The uncertainty report belongs to another CT; segment this CT again."))
        annotated = self.annotationStatus(annotationNode, volumeNode)["slices"] if annotationNode else []
        ranked = rank_slices(report, annotated)
        if not ranked:
            return None
        uncertainty = {s["index"]: s["uncertainty"] for s in report["slices"]}
        return ranked[0], uncertainty[ranked[0]], len(ranked)

    def jumpToSlice(self, volumeNode, index: int) -> None:
        """Centre all slice views on axial slice `index` of the CT."""
        self.sceneOps().jump_to_slice(volumeNode, index)


#
# Self-test
#


class DiffusionSegTest(ScriptedLoadableModuleTest):
    """Inside Slicer: annotate a synthetic CT programmatically, fine-tune a few CPU iterations, segment, and check
    names, geometry, subject hierarchy, that painted slices are untouched, and the slice suggestion."""

    PAINTED = (3, 7, 11)

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_DiffusionSegWorkflow()

    @staticmethod
    def syntheticCT():
        """A 64 x 56 x 16 CT in HU: air, a body ellipse, a liver-like and a spleen-like blob, with their labels."""
        k, j, i = np.mgrid[0:16, 0:56, 0:64]
        body = ((i - 32) / 28.0) ** 2 + ((j - 28) / 22.0) ** 2 <= 1
        liver = ((i - 20) / 10.0) ** 2 + ((j - 26) / 9.0) ** 2 <= 1
        spleen = ((i - 46) / 6.0) ** 2 + ((j - 30) / 6.0) ** 2 <= 1
        ct = np.full(k.shape, -1000, dtype=np.int16)
        ct[body] = -80
        ct[liver] = 60
        ct[spleen] = 45
        labels = np.zeros(k.shape, dtype=np.uint8)
        labels[liver] = 1
        labels[spleen] = 3
        return ct + np.random.default_rng(0).normal(0, 10, ct.shape).astype(np.int16), labels

    def test_DiffusionSegWorkflow(self):
        self.delayDisplay("Preparing a synthetic CT")
        logic = DiffusionSegLogic()
        messages = []
        logic.logCallback = messages.append
        missing = logic.missingDependencies()
        if missing:
            logic.installDependencies()
        ct, labels = self.syntheticCT()
        ijkToRAS = np.diag([-6.0, -6.0, 12.0, 1.0])  # spacing 6 x 6 x 12 mm, LPS-aligned
        volume = slicer.util.addVolumeFromArray(ct, ijkToRAS=ijkToRAS, name="SyntheticCT")

        self.delayDisplay("Annotating slices")
        annotation = logic.prepareAnnotation(volume)
        segmentation = annotation.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), 13)
        liverId = segmentation.GetSegmentIdBySegmentName("Liver")
        spleenId = segmentation.GetSegmentIdBySegmentName("Spleen")
        for segmentId, label in ((liverId, 1), (spleenId, 3)):
            mask = np.zeros_like(labels)
            mask[list(self.PAINTED)] = labels[list(self.PAINTED)] == label
            slicer.util.updateSegmentBinaryLabelmapFromArray(mask, annotation, segmentId, volume)
        status = logic.annotationStatus(annotation, volume)
        self.assertEqual(status["slices"], list(self.PAINTED))
        self.assertEqual(status["organs"], ["liver", "spleen"])
        paintedBefore = {s: slicer.util.arrayFromSegmentBinaryLabelmap(annotation, s, volume)[list(self.PAINTED)].copy()
                         for s in (liverId, spleenId)}

        self.delayDisplay("Fine-tuning a few iterations on the CPU, then segmenting and writing back")
        results = []
        settings = commands.FinetuneSettings(strategy="fs", preset="tiny", iterations=3)
        name = f"selftest-{int(time.time())}"
        logic.finetune(volume, annotation, settings, name, "cpu", lambda ok, message, oom: results.append((ok, message)))
        logic.waitForCompletion(1800)
        self.assertTrue(results and results[0][0], f"{results} {messages[-10:]}")
        model = logic.lastModel
        try:
            self.assertTrue((model / "model.json").is_file())
            self.assertIn(str(model), [str(m.path) for m in logic.segmentationModels()])
            self.assertEqual(segmentation.GetNumberOfSegments(), 13)
            for segmentId, before in paintedBefore.items():
                after = slicer.util.arrayFromSegmentBinaryLabelmap(annotation, segmentId, volume)[list(self.PAINTED)]
                np.testing.assert_array_equal(after, before)
            for segmentId in set(segmentation.GetSegmentIDs()) - {liverId, spleenId}:  # painted background stays background
                self.assertFalse(slicer.util.arrayFromSegmentBinaryLabelmap(annotation, segmentId, volume)[list(self.PAINTED)].any())
            self.assertEqual(logic.annotationStatus(annotation, volume)["slices"], list(self.PAINTED))

            self.delayDisplay("Segmenting with the fine-tuned model")
            results.clear()
            result = logic.segment(volume, None, str(model), "cpu", lambda ok, message, oom: results.append((ok, message)))
            logic.waitForCompletion(600)
            self.assertTrue(results and results[0][0], f"{results} {messages[-10:]}")
            from DiffusionSegLib.organs import ORGANS

            names = {ORGANS[i].display_name for i in range(13)}
            resultSegmentation = result.GetSegmentation()
            for segmentId in resultSegmentation.GetSegmentIDs():
                segment = resultSegmentation.GetSegment(segmentId)
                self.assertIn(segment.GetName(), names)
                self.assertIsNotNone(scene.segment_name_and_terminology(resultSegmentation, segmentId)[1])
            self.assertEqual(result.GetNodeReference(result.GetReferenceImageGeometryReferenceRole()), volume)
            labelmap, _unmatched = logic.sceneOps().labels_on_volume(result, volume)
            self.assertEqual(labelmap.shape, slicer.util.arrayFromVolume(volume).shape)
            shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
            self.assertEqual(shNode.GetItemParent(shNode.GetItemByDataNode(result)), shNode.GetItemParent(shNode.GetItemByDataNode(volume)))

            self.delayDisplay("Suggesting the next slice")
            suggestion = logic.suggestSlice(annotation, annotation, volume)
            self.assertIsNotNone(suggestion)
            self.assertNotIn(suggestion[0], self.PAINTED)
            logic.jumpToSlice(volume, suggestion[0])
        finally:
            if model is not None and logic.isUserModel(str(model)):
                logic.deleteModel(str(model))
        self.delayDisplay("Test passed")
