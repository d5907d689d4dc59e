"""MedSAM2 for 3D Slicer: click on one slice, get the object through the whole CT or MR volume.

The widget only wires the panel to the logic and the background worker. All MRML work lives in
MedSAM2SlicerLib.logic (tested outside Slicer with slicer-core), the model in the ``medsam2`` engine
package beside this file. The engine needs torch and sam2, which a fresh Slicer does not have: they
are imported only after the dependency check (MedSAM2SlicerLib.dependencies) has passed, and are
installed only when the user agrees.
"""

import logging
import os
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, Minimum, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from MedSAM2SlicerLib import dependencies
from MedSAM2SlicerLib.worker import BackgroundWorker, WorkerState

SETTINGS_GROUP = "MedSAM2Slicer"
REMEMBERED_SETTINGS = ("model", "device", "windowPreset", "engineLocation", "serverUrl")

# Names shown in the model selector when the registry cannot list its models (it is optional at
# start-up: it needs the engine installed).
DEFAULT_MODELS = (
    "medsam2-latest",
    "medsam2-ct-lesion",
    "medsam2-mri-liver-lesion",
    "medsam2-us-heart",
    "sam2.1-tiny",
)

# Window preset label -> engine intensity spec (medsam2.intensity.parse_intensity).
WINDOW_PRESETS = {
    "Volume display": None,  # the window/level the user sees in the slice views
    "Abdomen": "abdomen",
    "Soft tissue": "soft_tissue",
    "Liver": "liver",
    "Mediastinum": "mediastinum",
    "Lung": "lung",
    "Bone": "bone",
    "Brain": "brain",
    "MRI (percentile)": "mri",
    "Min-max": "minmax",
}
SLICE_AXES = ("Follow clicked view", "Axial", "Coronal", "Sagittal")
DIRECTIONS = {"Both directions": "both", "Forward (increasing slice)": "forward", "Backward": "backward"}

POSITIVE_COLOR = (0.2, 0.9, 0.3)
NEGATIVE_COLOR = (0.95, 0.2, 0.2)
BOX_COLOR = (1.0, 0.85, 0.1)


#
# Module
#


class MedSAM2Slicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedSAM2")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []  # PyTorch is an extension dependency, loaded on first use
        self.parent.contributors = ["MedSAM2Slicer contributors"]
        self.parent.helpText = _(
            "Segment an organ or lesion through a whole CT or MR volume from a few clicks, a box or one "
            "painted slice, with SAM 2 / MedSAM2 propagating from slice to slice. "
            "Keys: P positive point, N negative point, B box, Enter propagate, Esc cancel, Ctrl+Z undo."
        )
        self.parent.acknowledgementText = _(
            "Uses Meta's Segment Anything 2 and, where chosen, bowang-lab MedSAM2 weights "
            "(CC-BY-SA-4.0; research and education use only, as its model card says)."
        )


#
# Parameter node
#


@parameterNodeWrapper
class MedSAM2SlicerParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    positivePoints: slicer.vtkMRMLMarkupsFiducialNode
    negativePoints: slicer.vtkMRMLMarkupsFiducialNode
    boxRoi: slicer.vtkMRMLMarkupsROINode
    segmentId: str = ""
    model: str = DEFAULT_MODELS[0]
    device: Annotated[str, Choice(["auto", "cuda", "mps", "cpu"])] = "auto"
    windowPreset: Annotated[str, Choice(list(WINDOW_PRESETS))] = "Volume display"
    sliceAxis: Annotated[str, Choice(list(SLICE_AXES))] = SLICE_AXES[0]
    direction: Annotated[str, Choice(list(DIRECTIONS))] = "Both directions"
    limitSlices: bool = False
    firstSlice: Annotated[int, Minimum(0)] = 0
    lastSlice: Annotated[int, Minimum(0)] = 0
    stopWhenAbsent: bool = False
    absentSlices: Annotated[int, WithinRange(1, 50)] = 3
    previewPrompts: bool = True
    usePaintedSlice: bool = False
    engineLocation: Annotated[str, Choice(["local", "remote"])] = "local"
    serverUrl: str = "http://127.0.0.1:8765"


#
# Widget
#


class MedSAM2SlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.worker = None
        self.timer = None
        self.currentRun = None
        self.lastSliceNode = None
        self.shortcuts = []
        self._restoringSettings = False
        self._dependenciesReady = False

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedSAM2Slicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedSAM2SlicerLogic()

        # The worker thread posts events; this timer delivers them on the main thread, where MRML
        # may be touched. It only runs while a job is active.
        self.worker = BackgroundWorker(
            on_state=self.onWorkerState,
            on_progress=self.onWorkerProgress,
            on_result=self.onWorkerResult,
            on_failure=self.onWorkerFailure,
            on_message=self.onWorkerMessage,
        )
        self.timer = qt.QTimer()
        self.timer.setInterval(100)
        self.timer.connect("timeout()", self.onTimer)

        self.ui.modelSelector.editable = True
        for name in self.logic.modelNames():
            self.ui.modelSelector.addItem(name)
        self.ui.serverTokenLineEdit.echoMode = qt.QLineEdit.Password
        self.ui.segmentSelector.setMRMLScene(slicer.mrmlScene)
        self.ui.segmentSelector.segmentationNodeSelectorVisible = False  # the node combo box above is bound

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyOrCancel)
        self.ui.positivePointButton.connect("clicked(bool)", self.onPlacePositive)
        self.ui.negativePointButton.connect("clicked(bool)", self.onPlaceNegative)
        self.ui.boxButton.connect("clicked(bool)", self.onPlaceBox)
        self.ui.clearPromptsButton.connect("clicked(bool)", self.onClearPrompts)
        self.ui.addSegmentButton.connect("clicked(bool)", self.onAddSegment)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.redoButton.connect("clicked(bool)", self.onRedo)
        self.ui.exportDicomSegButton.connect("clicked(bool)", self.onExportDicomSeg)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.segmentSelector.connect("currentSegmentChanged(QString)", self.onSegmentChanged)
        self.ui.outputSegmentationSelector.connect(
            "currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged
        )
        self.ui.modelSelector.connect("currentTextChanged(QString)", self.onModelChanged)

        self.updateDependencyStatus()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        self.removeShortcuts()
        if self.worker is not None and self.worker.busy:
            self.worker.cancel()
            self.worker.wait(10)
        if self.timer is not None:
            self.timer.stop()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.installShortcuts()

    def exit(self) -> None:
        self.removeShortcuts()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified
            )

    # ------------------------------------------------------------------ shortcuts and settings
    def installShortcuts(self) -> None:
        """Module-wide keys while this module is shown (removed on exit so other modules keep theirs)."""
        if self.shortcuts:
            return
        keys = (
            ("p", self.onPlacePositive),
            ("n", self.onPlaceNegative),
            ("b", self.onPlaceBox),
            ("Return", self.onApplyShortcut),
            ("Enter", self.onApplyShortcut),
            ("Escape", self.onCancel),
            ("Ctrl+Z", self.onUndo),
            ("Ctrl+Y", self.onRedo),
        )
        for key, callback in keys:
            shortcut = qt.QShortcut(slicer.util.mainWindow())
            shortcut.setKey(qt.QKeySequence(key))
            shortcut.connect("activated()", callback)
            self.shortcuts.append(shortcut)

    def removeShortcuts(self) -> None:
        for shortcut in self.shortcuts:
            shortcut.disconnect("activated()")
            shortcut.setParent(None)
        self.shortcuts = []

    def restoreSettings(self) -> None:
        """Model, device, window preset and engine location are remembered between sessions (the
        server token is not: QSettings is a plain-text file)."""
        if self._parameterNode is None:
            return
        settings = qt.QSettings()
        settings.beginGroup(SETTINGS_GROUP)
        self._restoringSettings = True  # each assignment below must not save the half-restored set
        try:
            for name in REMEMBERED_SETTINGS:
                value = settings.value(name)
                if value:
                    try:
                        setattr(self._parameterNode, name, str(value))
                    except ValueError:
                        logging.warning("MedSAM2: ignoring remembered %s=%r", name, value)
        finally:
            self._restoringSettings = False
            settings.endGroup()
        self.ui.modelSelector.currentText = self._parameterNode.model

    def saveSettings(self) -> None:
        if self._parameterNode is None or self._restoringSettings:
            return
        settings = qt.QSettings()
        settings.beginGroup(SETTINGS_GROUP)
        for name in REMEMBERED_SETTINGS:
            settings.setValue(name, str(getattr(self._parameterNode, name)))
        settings.endGroup()

    # ------------------------------------------------------------------ parameter node
    def onSceneStartClose(self, caller, event) -> None:
        if self.worker is not None and self.worker.busy:
            self.worker.cancel()
        self.setParameterNode(None)
        if self.logic is not None:
            self.logic.reset()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume
        self.restoreSettings()  # the user's latest model/device/window, also for a new scene

    def setParameterNode(self, inputParameterNode: Optional[MedSAM2SlicerParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified
            )
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.ui.segmentSelector.setCurrentNode(self._parameterNode.outputSegmentation)
            if self._parameterNode.segmentId:
                self.ui.segmentSelector.setCurrentSegmentID(self._parameterNode.segmentId)
        self.updateButtons()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        self.saveSettings()
        self.updateButtons()

    def onModelChanged(self, text) -> None:
        if self._parameterNode is not None and text:
            self._parameterNode.model = text

    def onSegmentationChanged(self, node) -> None:
        self.ui.segmentSelector.setCurrentNode(node)

    def onSegmentChanged(self, segmentId) -> None:
        """Points on screen belong to the current segment: a switch clears them (the engine keeps each
        segment's earlier prompts, so its next propagation still builds on them)."""
        p = self._parameterNode
        if p is None or (segmentId or "") == p.segmentId:
            return
        p.segmentId = segmentId or ""
        for node in (p.positivePoints, p.negativePoints, p.boxRoi):
            if node:
                node.RemoveAllControlPoints()

    # ------------------------------------------------------------------ state shown in the panel
    def updateButtons(self) -> None:
        if not hasattr(self, "ui"):
            return
        busy = self.worker is not None and self.worker.busy
        ready = self._parameterNode is not None and self._parameterNode.inputVolume is not None
        self.ui.applyButton.text = _("Cancel (Esc)") if busy else _("Propagate (Enter)")
        self.ui.applyButton.enabled = busy or (ready and self._dependenciesReady)
        for widget in (self.ui.positivePointButton, self.ui.negativePointButton, self.ui.boxButton):
            widget.enabled = ready and not busy
        segmentation = self._parameterNode.outputSegmentation if self._parameterNode else None
        self.ui.undoButton.enabled = not busy and self.logic.canUndo(segmentation)
        self.ui.redoButton.enabled = not busy and self.logic.canRedo(segmentation)
        self.ui.exportDicomSegButton.enabled = not busy and segmentation is not None and ready
        remote = self._parameterNode is not None and self._parameterNode.engineLocation == "remote"
        self.ui.serverUrlLineEdit.enabled = remote
        self.ui.serverTokenLineEdit.enabled = remote
        limited = self._parameterNode is not None and self._parameterNode.limitSlices
        self.ui.firstSliceSpinBox.enabled = limited
        self.ui.lastSliceSpinBox.enabled = limited
        self.ui.absentSlicesSpinBox.enabled = (
            self._parameterNode is not None and self._parameterNode.stopWhenAbsent
        )

    def setStatus(self, text: str, error: bool = False) -> None:
        self.ui.statusLabel.text = text
        self.ui.statusLabel.setStyleSheet("color: #d03030" if error else "")

    def onWorkerState(self, state: WorkerState) -> None:
        labels = {
            WorkerState.PREPARING: _("Preparing (model, volume)..."),
            WorkerState.PROPAGATING: _("Propagating..."),
            WorkerState.CANCELLING: _("Cancelling..."),
            WorkerState.CANCELLED: _("Cancelled: the segment is unchanged."),
        }
        if state in labels:
            self.setStatus(labels[state])
        if state == WorkerState.CANCELLED:
            self.currentRun = None
        self.ui.progressBar.visible = self.worker.busy
        if state == WorkerState.PREPARING:
            self.ui.progressBar.setRange(0, 0)  # busy indicator until slices are counted
        self.updateButtons()

    def onWorkerProgress(self, done: int, total: int) -> None:
        self.ui.progressBar.setRange(0, max(total, 1))
        self.ui.progressBar.value = done
        if self.worker.state == WorkerState.PROPAGATING:
            self.ui.progressBar.format = _("{done} / {total} slices").format(done=done, total=total)
        else:  # preparing: bytes of the model download
            self.ui.progressBar.format = _("Downloading model %p%")

    def onWorkerMessage(self, text: str) -> None:
        self.setStatus(text)

    def onWorkerResult(self, result) -> None:
        run, self.currentRun = self.currentRun, None
        try:
            self.saveSegmentEditorUndoState(run.segmentationNode)
            written = self.logic.core().applyRun(run, result)
        except Exception as exc:  # an MRML write that fails must not leave the panel stuck
            self.onWorkerFailure(_describeError(exc))
            return
        if written is None:
            self.setStatus(_("Preview shown. Propagate with Enter."))
        else:
            self.setStatus(_("Done: slices {lo} to {hi} updated.").format(lo=written[0], hi=written[1]))
        self.updateButtons()

    def onWorkerFailure(self, message: str) -> None:
        run, self.currentRun = self.currentRun, None
        self.setStatus(message, error=True)
        if run is None or run.request is not None:  # a failed preview only shows in the status line
            slicer.util.errorDisplay(_("MedSAM2: {message}").format(message=message))
        self.updateButtons()

    def onTimer(self) -> None:
        if not self.worker.drain():
            self.timer.stop()

    def saveSegmentEditorUndoState(self, segmentationNode) -> None:
        """So that the Segment Editor's own Ctrl+Z also steps back over a propagation when it is
        editing the same segmentation (our own undo works without it)."""
        try:
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        except AttributeError:
            return
        if editor.segmentationNode() == segmentationNode:
            editor.saveStateForUndo()

    # ------------------------------------------------------------------ dependencies
    def updateDependencyStatus(self) -> None:
        """Checked when the panel opens and after an installation (not on every click: it scans the
        installed packages)."""
        plan = dependencies.plan_installation()
        self._dependenciesReady = not plan.needed
        self.ui.dependencyFrame.visible = plan.needed
        if plan.needed:
            self.ui.dependencyStatusLabel.text = "\n".join(plan.reasons)

    def onInstallDependencies(self) -> None:
        try:
            with slicer.util.WaitCursor():
                installed = dependencies.ensure_dependencies(
                    confirm=slicer.util.confirmOkCancelDisplay,
                    install_torch=self.logic.installTorch,
                    pip_install=slicer.util.pip_install,
                )
        except Exception as exc:
            slicer.util.errorDisplay(_("Installation failed: {error}").format(error=_describeError(exc)))
            installed = False
        self.updateDependencyStatus()
        if installed:
            self.setStatus(_("Dependencies installed."))
        self.updateButtons()

    # ------------------------------------------------------------------ prompts
    def ensurePromptNodes(self) -> None:
        p = self._parameterNode
        if not p.positivePoints:
            p.positivePoints = self.logic.createPointsNode("MedSAM2 positive", POSITIVE_COLOR)
        if not p.negativePoints:
            p.negativePoints = self.logic.createPointsNode("MedSAM2 negative", NEGATIVE_COLOR)
        if not p.boxRoi:
            p.boxRoi = self.logic.createBoxNode("MedSAM2 box", BOX_COLOR)
        event = slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent
        for node in (p.positivePoints, p.negativePoints, p.boxRoi):
            if not self.hasObserver(node, event, self.onPromptPlaced):
                self.addObserver(node, event, self.onPromptPlaced)

    def startPlacing(self, node, persistent: bool) -> None:
        selectionNode = slicer.app.applicationLogic().GetSelectionNode()
        selectionNode.SetReferenceActivePlaceNodeClassName(node.GetClassName())
        selectionNode.SetActivePlaceNodeID(node.GetID())
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        interactionNode.SetPlaceModePersistence(1 if persistent else 0)
        interactionNode.SetCurrentInteractionMode(interactionNode.Place)

    def onPlacePositive(self) -> None:
        if self._parameterNode and self._parameterNode.inputVolume:
            self.ensurePromptNodes()
            self.startPlacing(self._parameterNode.positivePoints, persistent=True)

    def onPlaceNegative(self) -> None:
        if self._parameterNode and self._parameterNode.inputVolume:
            self.ensurePromptNodes()
            self.startPlacing(self._parameterNode.negativePoints, persistent=True)

    def onPlaceBox(self) -> None:
        if self._parameterNode and self._parameterNode.inputVolume:
            self.ensurePromptNodes()
            self._parameterNode.boxRoi.RemoveAllControlPoints()  # one box at a time
            self.startPlacing(self._parameterNode.boxRoi, persistent=False)

    def onClearPrompts(self) -> None:
        p = self._parameterNode
        for node in (p.positivePoints, p.negativePoints, p.boxRoi):
            if node:
                node.RemoveAllControlPoints()
        if p.outputSegmentation and p.segmentId:
            self.logic.core().forgetSegmentPrompts(p.outputSegmentation, p.segmentId)

    def onPromptPlaced(self, caller=None, event=None) -> None:
        """Remember the view the click came from (it sets the slice axis), then preview that slice."""
        crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        if crosshair is not None:
            sliceNode = crosshair.GetCursorPositionXYZ([0.0, 0.0, 0.0])
            if sliceNode is not None:
                self.lastSliceNode = sliceNode
        if self._parameterNode.previewPrompts and not self.worker.busy:
            self.startRun(preview=True)

    # ------------------------------------------------------------------ segments
    def ensureOutput(self):
        """The output segmentation and segment, created (on the volume's geometry) when missing."""
        p = self._parameterNode
        core = self.logic.core()
        if not p.outputSegmentation:
            p.outputSegmentation = core.createSegmentationNode(p.inputVolume)
            self.ui.segmentSelector.setCurrentNode(p.outputSegmentation)
        segmentation = p.outputSegmentation.GetSegmentation()
        if not p.segmentId or segmentation.GetSegment(p.segmentId) is None:
            p.segmentId = core.addSegment(p.outputSegmentation, p.inputVolume)
            self.ui.segmentSelector.setCurrentSegmentID(p.segmentId)
        return p.inputVolume, p.outputSegmentation, p.segmentId

    def onAddSegment(self) -> None:
        p = self._parameterNode
        if not p.inputVolume:
            return
        try:
            volume, segmentation, _segment = self.ensureOutput()
            p.segmentId = self.logic.core().addSegment(segmentation, volume)
            self.ui.segmentSelector.setCurrentSegmentID(p.segmentId)
            self.onClearPrompts()
        except Exception as exc:
            self.setStatus(_describeError(exc), error=True)

    # ------------------------------------------------------------------ runs
    def currentAxis(self, core, volume) -> int:
        choice = self._parameterNode.sliceAxis
        if choice != SLICE_AXES[0]:
            return core.voxelAxisForView(volume, choice.lower())
        if self.lastSliceNode is not None:
            return core.sliceAxisForSliceNode(volume, self.lastSliceNode)
        box = self._parameterNode.boxRoi
        if box is not None and box.GetNumberOfDefinedControlPoints():
            return core.voxelAxisForRoi(volume, box)
        return core.voxelAxisForView(volume, "axial")

    def currentSliceNode(self):
        if self.lastSliceNode is not None:
            return self.lastSliceNode
        return slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()

    def startRun(self, preview: bool = False) -> None:
        if self.worker.busy:
            return
        try:
            core = self.logic.core(
                self._parameterNode.engineLocation,
                self._parameterNode.serverUrl,
                self.ui.serverTokenLineEdit.text,
            )
            volume, segmentation, segmentId = self.ensureOutput()
            self.ensurePromptNodes()
            axis = self.currentAxis(core, volume)
            p = self._parameterNode
            maskSlices = {}
            if p.usePaintedSlice and not preview:
                sliceIndex = core.sliceIndexForSliceNode(volume, self.currentSliceNode(), axis)
                maskSlices[sliceIndex] = core.segmentSliceMask(
                    segmentation, segmentId, volume, axis, sliceIndex
                )
            prompts = core.collectPrompts(
                volume, axis, p.positivePoints, p.negativePoints, p.boxRoi, maskSlices
            )
            options = self.logic.sessionOptions(p, volume, axis)
            request = None if preview else self.logic.propagationRequest(p)
            run = core.prepareRun(volume, segmentation, segmentId, options, prompts, request)
        except Exception as exc:
            self.setStatus(_describeError(exc), error=True)
            return
        self.currentRun = run
        self.worker.start(run)
        self.timer.start()

    def onApplyOrCancel(self) -> None:
        if self.worker.busy:
            self.worker.cancel()
        else:
            self.startRun(preview=False)

    def onApplyShortcut(self) -> None:
        if not self.worker.busy:
            self.startRun(preview=False)

    def onCancel(self) -> None:
        self.worker.cancel()

    def onUndo(self) -> None:
        if self.worker.busy or not self._parameterNode:
            return
        if self.logic.core().undo(self._parameterNode.outputSegmentation):
            self.setStatus(_("Undone."))
        self.updateButtons()

    def onRedo(self) -> None:
        if self.worker.busy or not self._parameterNode:
            return
        if self.logic.core().redo(self._parameterNode.outputSegmentation):
            self.setStatus(_("Redone."))
        self.updateButtons()

    def onExportDicomSeg(self) -> None:
        if self.worker.busy or not self._parameterNode:
            return
        try:
            with slicer.util.tryWithErrorDisplay(_("DICOM-SEG export failed."), waitCursor=True):
                count = self.logic.exportDicomSeg(
                    self._parameterNode.outputSegmentation, self._parameterNode.inputVolume
                )
                self.setStatus(_("Exported {count} DICOM-SEG object(s) to the DICOM database.").format(count=count))
        except Exception as exc:  # already shown by tryWithErrorDisplay; keep the panel's status honest
            self.setStatus(_describeError(exc), error=True)


def _describeError(exc: Exception) -> str:
    """Engine errors are one line written for users; anything else keeps its type and is logged."""
    if isinstance(exc, dependencies.DependencyError) or _isEngineError(exc):
        return str(exc)
    logging.error("MedSAM2 error", exc_info=exc)
    return f"{type(exc).__name__}: {exc}"


def _isEngineError(exc: Exception) -> bool:
    try:
        from medsam2.errors import MedSAM2Error
    except ImportError:  # engine not installed: nothing can be one of its errors
        return False
    return isinstance(exc, MedSAM2Error)


#
# Logic
#


class MedSAM2SlicerLogic(ScriptedLoadableModuleLogic):
    """Slicer's module logic. The work is done by MedSAM2SlicerLib.logic.MedSAM2SlicerLogic (the
    "core"), imported on first use because it needs torch."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._core = None
        self._engineKey = None

    def getParameterNode(self):
        return MedSAM2SlicerParameterNode(super().getParameterNode())

    def core(self, engineLocation: Optional[str] = None, serverUrl: str = "", token: str = ""):
        """The core logic; with ``engineLocation`` given, switched to that engine first (undo kept)."""
        from MedSAM2SlicerLib.logic import MedSAM2SlicerLogic as CoreLogic

        if self._core is None:
            self._core = CoreLogic(self._localEngine())
            self._engineKey = ("local",)
        if engineLocation is not None:
            key = (engineLocation, serverUrl, token) if engineLocation == "remote" else ("local",)
            if key != self._engineKey:
                self._core.setEngine(self._makeEngine(*key) if key[0] == "remote" else self._localEngine())
                self._engineKey = key
        return self._core

    @staticmethod
    def _localEngine():
        from MedSAM2SlicerLib.engine_client import LocalEngineClient

        return LocalEngineClient()

    @staticmethod
    def _makeEngine(location: str, serverUrl: str, token: str):
        from MedSAM2SlicerLib.engine_client import RemoteEngineClient

        return RemoteEngineClient(serverUrl, token)

    def reset(self) -> None:
        if self._core is not None:
            self._core.closeSession()

    def exportDicomSeg(self, segmentationNode, referenceVolumeNode) -> int:
        """Export through Slicer's own DICOM segmentation exporter (the DICOMSegmentationPlugin that the
        DICOM module's Export dialog uses) and import the result into the DICOM database, where it
        appears under the source study. Needs Slicer's DICOM module, so it is not exercised by the
        slicer-core tests; the segment terminology and reference geometry it relies on are (logic.py)."""
        if segmentationNode is None or referenceVolumeNode is None:
            raise ValueError(_("Choose the source volume and the segmentation to export."))
        shNode = slicer.mrmlScene.GetSubjectHierarchyNode()
        volumeItem = shNode.GetItemByDataNode(referenceVolumeNode)
        if not shNode.GetItemUID(volumeItem, "DICOM"):
            raise ValueError(
                _("The source volume was not loaded from DICOM, so a DICOM-SEG cannot reference it; "
                  "save the segmentation as .seg.nrrd instead.")
            )
        # The SEG must sit in the volume's study in the subject hierarchy to reference its series.
        segItem = shNode.GetItemByDataNode(segmentationNode)
        shNode.SetItemParent(segItem, shNode.GetItemParent(volumeItem))
        segmentationNode.SetNodeReferenceID(
            segmentationNode.GetReferenceImageGeometryReferenceRole(), referenceVolumeNode.GetID()
        )
        import DICOMSegmentationPlugin  # Slicer's DICOM module (QuantitativeReporting/dcmqi backed)
        from DICOMLib import DICOMUtils

        exporter = DICOMSegmentationPlugin.DICOMSegmentationPluginClass()
        exportables = exporter.examineForExport(segItem)
        if not exportables:
            raise ValueError(_("Slicer's DICOM exporter found nothing to export in this segmentation."))
        outputFolder = os.path.join(slicer.app.temporaryPath, "MedSAM2Slicer-DICOMSEG", segmentationNode.GetID())
        os.makedirs(outputFolder, exist_ok=True)
        for exportable in exportables:
            exportable.directory = outputFolder
        error = exporter.export(exportables)
        if error:
            raise RuntimeError(_("DICOM-SEG export failed: {error}").format(error=error))
        DICOMUtils.importDicom(outputFolder)
        return len(exportables)

    def canUndo(self, segmentationNode) -> bool:
        return self._core is not None and self._core.canUndo(segmentationNode)

    def canRedo(self, segmentationNode) -> bool:
        return self._core is not None and self._core.canRedo(segmentationNode)

    def modelNames(self):
        try:
            from MedSAM2SlicerLib.engine_client import model_names

            return model_names() or list(DEFAULT_MODELS)
        except Exception:  # engine not (fully) installed yet: the selector still needs names
            logging.info("MedSAM2: model registry unavailable; showing the default model names")
            return list(DEFAULT_MODELS)

    def sessionOptions(self, parameterNode, volumeNode, axis: int):
        from MedSAM2SlicerLib.engine_client import SessionOptions

        preset = WINDOW_PRESETS[parameterNode.windowPreset]
        if preset is None:
            preset = self.core().intensityFromDisplay(volumeNode)
        return SessionOptions(
            model=parameterNode.model, device=parameterNode.device, intensity=preset, axis=axis
        )

    @staticmethod
    def propagationRequest(parameterNode):
        from MedSAM2SlicerLib.logic import PropagationRequest

        limits = (parameterNode.firstSlice, parameterNode.lastSlice) if parameterNode.limitSlices else None
        stop = parameterNode.absentSlices if parameterNode.stopWhenAbsent else None
        return PropagationRequest(DIRECTIONS[parameterNode.direction], limits, stop)

    @staticmethod
    def createPointsNode(name: str, color):
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        node.CreateDefaultDisplayNodes()
        node.GetDisplayNode().SetSelectedColor(*color)
        node.GetDisplayNode().SetColor(*color)
        node.GetDisplayNode().SetPointLabelsVisibility(False)
        return node

    @staticmethod
    def createBoxNode(name: str, color):
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
        node.CreateDefaultDisplayNodes()
        node.GetDisplayNode().SetSelectedColor(*color)
        return node

    @staticmethod
    def installTorch(requirements) -> bool:
        """torch through the PyTorch extension (declared as this extension's dependency)."""
        try:
            import PyTorchUtils
        except ImportError:
            raise dependencies.DependencyError(
                "the PyTorch extension is missing: install 'PyTorch' (Extensions Manager), restart Slicer"
            ) from None
        specs = {r.name: r.specifier or None for r in requirements}
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False,
            torchVersionRequirement=specs.get("torch"),
            torchvisionVersionRequirement=specs.get("torchvision"),
        )
        return torch is not None


#
# Test (runs inside Slicer: Developer mode, "Reload and Test")
#


class MedSAM2SlicerTest(ScriptedLoadableModuleTest):
    """Runs the real logic on Slicer's MRHead sample. The model is SAM2 tiny with random weights
    (no download), so the test checks placement and the undo/cancel contracts, not quality."""

    MODEL = "random-weights:configs/sam2.1/sam2.1_hiera_t.yaml@128"

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        if dependencies.plan_installation().needed:
            self.delayDisplay("MedSAM2 dependencies are not installed: test skipped")
            return
        self.test_MedSAM2Slicer_sampleData()

    def test_MedSAM2Slicer_sampleData(self):
        import numpy as np
        import SampleData

        from MedSAM2SlicerLib.engine_client import SessionOptions
        from MedSAM2SlicerLib.logic import MedSAM2SlicerLogic as CoreLogic
        from MedSAM2SlicerLib.logic import PropagationRequest
        from MedSAM2SlicerLib.worker import BackgroundWorker

        self.delayDisplay("Loading MRHead")
        volume = SampleData.SampleDataLogic().downloadSample("MRHead")
        core = CoreLogic()
        segmentation = core.createSegmentationNode(volume)
        segment = core.addSegment(segmentation, volume, "test")
        axis = core.voxelAxisForView(volume, "axial")
        centre = core.ijkToWorld(volume, [np.array(core.volumeShape(volume)[::-1]) // 2])[0]
        points = MedSAM2SlicerLogic.createPointsNode("test points", POSITIVE_COLOR)
        points.AddControlPoint(vtk.vtkVector3d(*centre))
        prompts = core.collectPrompts(volume, axis, positiveNode=points)
        expected = np.array(core.volumeShape(volume)[::-1]) // 2
        self.assertTrue(np.allclose(prompts.points_ijk[0], expected))

        options = SessionOptions(model=self.MODEL, device="cpu", intensity="minmax", axis=axis)
        run = core.prepareRun(volume, segmentation, segment, options, prompts, PropagationRequest())
        results = []
        worker = BackgroundWorker(on_result=results.append)
        worker.start(run)
        self.assertTrue(worker.wait(600))
        worker.drain()
        self.assertEqual(worker.state, WorkerState.DONE)
        written = core.applyRun(run, results[0])
        self.assertEqual(written, (0, core.volumeShape(volume)[2 - axis] - 1))
        result = core.segmentArray(segmentation, segment, volume)
        engineMask = core.engine.fetch_mask(run.handle.sessionId, run.objectId)
        self.assertTrue(np.array_equal(result, engineMask))
        self.assertTrue(core.undo(segmentation))
        self.assertFalse(core.segmentArray(segmentation, segment, volume).any())
        self.assertTrue(os.path.isfile(self._export(core, segmentation)))
        self.delayDisplay("MedSAM2 test passed")

    @staticmethod
    def _export(core, segmentationNode) -> str:
        path = os.path.join(slicer.app.temporaryPath, "MedSAM2SlicerTest.seg.nrrd")
        core.exportSegmentation(segmentationNode, path)
        return path
