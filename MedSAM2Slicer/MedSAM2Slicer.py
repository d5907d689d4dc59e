"""MedSAM2 for 3D Slicer 5.10 and later: click on one slice, get the object through the whole CT or MR
volume.

The widget only forwards Qt signals: every decision is made in MedSAM2SlicerLib (logic.PanelLogic and
the files it uses, one job each), which runs on Slicer's MRML and is tested outside Slicer with
slicer-core. The engine (``medsam2``, beside this file) needs torch and sam2 only for the in-process
model; they are installed after asking, and a panel that uses a server needs neither.
"""

import logging
from typing import Annotated, Optional

import ctk
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

from medsam2.models.catalogue import DEFAULT_MODEL
from MedSAM2SlicerLib import dependencies, versions
from MedSAM2SlicerLib.errors import describeError
from MedSAM2SlicerLib.panel_state import DIRECTIONS, SLICE_AXES, WINDOW_PRESETS
from MedSAM2SlicerLib.remote_settings import ServerSettings

SETTINGS_GROUP = "MedSAM2Slicer"
REMEMBERED_SETTINGS = ("model", "device", "windowPreset", "engineLocation", "serverUrl", "pacsUrl")
COLORS = {"positive": (0.2, 0.9, 0.3), "negative": (0.95, 0.2, 0.2), "box": (1.0, 0.85, 0.1)}


class MedSAM2Slicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedSAM2")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedSAM2Slicer contributors"]
        self.parent.helpText = _(
            "Segment an organ or lesion through a whole CT or MR volume from a few clicks, a box or one "
            "painted slice (needs Slicer {version} or later). Keys: P positive point, N negative point, "
            "B box, Enter propagate, Esc cancel, Ctrl+Z undo."
        ).format(version=versions.MINIMUM_SLICER_TEXT)
        self.parent.acknowledgementText = _(
            "Uses Meta's Segment Anything 2 and, where chosen, bowang-lab MedSAM2 weights "
            "(CC-BY-SA-4.0; research and education use only, as its model card says)."
        )


@parameterNodeWrapper
class MedSAM2SlicerParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    positivePoints: slicer.vtkMRMLMarkupsFiducialNode
    negativePoints: slicer.vtkMRMLMarkupsFiducialNode
    boxRoi: slicer.vtkMRMLMarkupsROINode
    segmentId: str = ""
    model: str = DEFAULT_MODEL  # medsam2.models.catalogue's default (torch-free, bundled with the module)
    device: Annotated[str, Choice(["auto", "cuda", "mps", "cpu"])] = "auto"
    windowPreset: Annotated[str, Choice(list(WINDOW_PRESETS))] = "Volume display"
    sliceAxis: Annotated[str, Choice(list(SLICE_AXES))] = "Follow clicked view"
    direction: Annotated[str, Choice(list(DIRECTIONS))] = "Both directions"
    limitSlices: bool = False
    firstSlice: Annotated[int, Minimum(0)] = 0
    lastSlice: Annotated[int, Minimum(0)] = 0
    stopWhenAbsent: bool = False
    absentSlices: Annotated[int, WithinRange(1, 50)] = 3
    previewPrompts: bool = True
    usePaintedSlice: bool = False
    engineLocation: Annotated[str, Choice(["local", "remote"])] = "local"
    serverUrl: str = "https://127.0.0.1:8765"
    allowPlainHttp: bool = False
    pacsUrl: str = ""


class MedSAM2SlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.panel = None  # MedSAM2SlicerLib.logic.PanelLogic, through self.logic
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.shortcuts = []
        self.timer = None
        self.sideWorker = None  # Test connection and PACS send, next to the model's worker

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        problem = versions.versionProblem(slicer.app.applicationVersion) or versions.apiProblem(slicer)
        if problem:  # Slicer 5.8 or older: one line saying what is needed, nothing that would fail later
            label = qt.QLabel(problem)
            label.wordWrap = True
            self.layout.addWidget(label)
            return
        from MedSAM2SlicerLib.engine_client import model_names
        from MedSAM2SlicerLib.worker import BackgroundWorker

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedSAM2Slicer.ui"))
        self.layout.addWidget(uiWidget)
        self.uiWidget = uiWidget
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedSAM2SlicerLogic()
        self.panel = self.logic.panel
        self.panel.onChange = self.updateGui
        # Background encoding starts at the slice the Red view shows (then its neighbours).
        self.panel.encodingView = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
        self.sideWorker = BackgroundWorker()
        self._setupEditor()

        self.ui.modelSelector.editable = True
        for name in model_names():  # the engine's catalogue: one list of model names
            self.ui.modelSelector.addItem(name)
        self.ui.serverTokenLineEdit.echoMode = qt.QLineEdit.Password
        self.ui.caFilePathLineEdit.filters = ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Readable
        self.ui.caFilePathLineEdit.currentPath = qt.QSettings().value(f"{SETTINGS_GROUP}/caFile") or ""
        self.ui.segmentSelector.setMRMLScene(slicer.mrmlScene)
        self.ui.segmentSelector.segmentationNodeSelectorVisible = False

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        connections = (
            (self.ui.applyButton, "clicked(bool)", self.onApplyOrCancel),
            (self.ui.positivePointButton, "clicked(bool)", lambda: self.onPlace("positive")),
            (self.ui.negativePointButton, "clicked(bool)", lambda: self.onPlace("negative")),
            (self.ui.boxButton, "clicked(bool)", lambda: self.onPlace("box")),
            (self.ui.clearPromptsButton, "clicked(bool)", lambda: self.call(self.panel.clearPrompts)),
            (self.ui.addSegmentButton, "clicked(bool)", self.onAddSegment),
            (self.ui.undoButton, "clicked(bool)", lambda: self.call(self.panel.undo)),
            (self.ui.redoButton, "clicked(bool)", lambda: self.call(self.panel.redo)),
            (self.ui.rewindowButton, "clicked(bool)", self.onRewindow),
            (self.ui.setFirstSliceButton, "clicked(bool)", lambda: self.onSetLimit("firstSlice")),
            (self.ui.setLastSliceButton, "clicked(bool)", lambda: self.onSetLimit("lastSlice")),
            (self.ui.exportDicomSegButton, "clicked(bool)", self.onExportDicomSeg),
            (self.ui.testConnectionButton, "clicked(bool)", self.onTestConnection),
            (self.ui.installDependenciesButton, "clicked(bool)", self.onInstallDependencies),
            (self.ui.applyTerminologyButton, "clicked(bool)", self.onApplyTerminology),
            (self.ui.segmentSelector, "currentSegmentChanged(QString)", self.onSegmentChanged),
            (self.ui.outputSegmentationSelector, "currentNodeChanged(vtkMRMLNode*)", self.onOutputChanged),
            (self.ui.inputVolumeSelector, "currentNodeChanged(vtkMRMLNode*)", lambda node: self.onSourceChanged()),
            (self.ui.modelSelector, "currentTextChanged(QString)", self.onModelChanged),
            (self.ui.caFilePathLineEdit, "currentPathChanged(QString)", self.onCaFileChanged),
        )
        for widget, signal, slot in connections:
            widget.connect(signal, slot)
        # The worker posts events; this timer delivers them on the GUI thread, where MRML may be touched.
        self.timer = qt.QTimer()
        self.timer.setInterval(100)
        self.timer.connect("timeout()", self.onTimer)
        self.timer.start()
        self.updateDependencyStatus()
        self.initializeParameterNode()

    def _setupEditor(self) -> None:
        """The embedded Segment Editor: the radiologist paints the mask-prompt slice here, and its
        history is the one every propagation saves a state in (writer.py)."""
        from MedSAM2SlicerLib.writer import SegmentWriter, WidgetHistory

        editor = self.ui.segmentEditorWidget
        editor.setMRMLScene(slicer.mrmlScene)
        editorNode = slicer.mrmlScene.GetSingletonNode("MedSAM2", "vtkMRMLSegmentEditorNode")
        if editorNode is None:
            editorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
            editorNode.SetSingletonTag("MedSAM2")
        editor.setMRMLSegmentEditorNode(editorNode)
        editor.segmentationNodeSelectorVisible = False
        editor.sourceVolumeNodeSelectorVisible = False
        editor.setEffectNameOrder(["Paint", "Draw", "Erase", "Threshold"])
        editor.unorderedEffectsVisible = False
        history = WidgetHistory.ofEditor(editor, lambda name: slicer.util.findChild(editor, name))
        self.panel.writer = SegmentWriter(slicer.mrmlScene, editorNode, history)

    def cleanup(self) -> None:
        self.removeObservers()
        self.removeShortcuts()
        if self.timer is not None:
            self.timer.stop()
        if self.panel is not None:
            self.panel.close()  # in any state: the running job closes the session it is making

    def onReload(self) -> None:
        """Developer Reload: Slicer re-imports only this file, so the Lib is reloaded first."""
        from MedSAM2SlicerLib import reloading

        reloading.reloadLib()
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        if self.panel is None:
            return
        self.initializeParameterNode()
        self.installShortcuts()

    def exit(self) -> None:
        self.removeShortcuts()

    # ------------------------------------------------------------------ shortcuts and settings
    def installShortcuts(self) -> None:
        if self.shortcuts:
            return
        keys = (
            ("p", lambda: self.onPlace("positive")),
            ("n", lambda: self.onPlace("negative")),
            ("b", lambda: self.onPlace("box")),
            ("Return", self.onPropagate),
            ("Enter", self.onPropagate),
            ("Escape", lambda: self.panel.cancel()),
            ("Ctrl+Z", lambda: self.call(self.panel.undo)),
            ("Ctrl+Y", lambda: self.call(self.panel.redo)),
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
        """Model, device, window, engine and server address are remembered (not the token: QSettings
        is a plain-text file)."""
        settings = qt.QSettings()
        for name in REMEMBERED_SETTINGS:
            value = settings.value(f"{SETTINGS_GROUP}/{name}")
            if value:
                try:
                    setattr(self._parameterNode, name, str(value))
                except ValueError:
                    logging.warning("MedSAM2: ignoring remembered %s=%r", name, value)
        self.ui.modelSelector.currentText = self._parameterNode.model

    def saveSettings(self) -> None:
        settings = qt.QSettings()
        for name in REMEMBERED_SETTINGS:
            settings.setValue(f"{SETTINGS_GROUP}/{name}", str(getattr(self._parameterNode, name)))

    # ------------------------------------------------------------------ parameter node
    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        if self.panel is not None:
            self.panel.close()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        self.restoreSettings()
        if not p.inputVolume:
            p.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        self.ensurePromptNodes()
        self.onSourceChanged()

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = parameterNode
        if parameterNode:
            self._parameterNodeGuiTag = parameterNode.connectGui(self.ui)
            self.addObserver(parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self.updateGui()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        settings = self.panel.settings
        settings.device, settings.windowPreset = p.device, WINDOW_PRESETS[p.windowPreset]
        settings.sliceAxis, settings.usePaintedSlice = SLICE_AXES[p.sliceAxis], p.usePaintedSlice
        settings.previewPrompts = p.previewPrompts
        self.saveSettings()
        if p.engineLocation != getattr(self, "_engineLocation", None):  # local needs torch, remote does not
            self._engineLocation = p.engineLocation
            self.updateDependencyStatus()
            self.onSourceChanged()
        self.updateGui()

    # ------------------------------------------------------------------ forwarding to the panel logic
    def call(self, action, *args):
        """Run a panel action; its one-line error goes to the status line."""
        try:
            return action(*args)
        except Exception as exc:  # noqa: BLE001 - the panel must stay usable
            self.panel.say(describeError(exc), error=True)
        finally:
            self.updateGui()

    def onSourceChanged(self) -> None:
        p = self._parameterNode
        if p is None or not self.dependenciesReady():
            return
        token, caFile = self.ui.serverTokenLineEdit.text, self.ui.caFilePathLineEdit.currentPath or ""
        server = ServerSettings(p.serverUrl, token, caFile, p.allowPlainHttp)
        self.call(self.panel.configureEngine, server if p.engineLocation == "remote" else None)
        self.call(self.panel.setSource, p.inputVolume, p.model, p.device)
        self.askLicence()
        editor = self.ui.segmentEditorWidget
        editor.setSourceVolumeNode(p.inputVolume)

    def onModelChanged(self, text) -> None:
        if self._parameterNode is not None and text and text != self._parameterNode.model:
            self._parameterNode.model = text
            self.onSourceChanged()

    def askLicence(self) -> None:
        question = self.panel.licencePending
        if question is not None:
            self.panel.answerLicence(slicer.util.confirmYesNoDisplay(question.text(), windowTitle=_("Model licence")))

    def ensurePromptNodes(self) -> None:
        from MedSAM2SlicerLib.prompts import createPromptNode

        p = self._parameterNode
        for name, cls, attribute in (
            ("positive", "vtkMRMLMarkupsFiducialNode", "positivePoints"),
            ("negative", "vtkMRMLMarkupsFiducialNode", "negativePoints"),
            ("box", "vtkMRMLMarkupsROINode", "boxRoi"),
        ):
            if not getattr(p, attribute):
                setattr(p, attribute, createPromptNode(slicer.mrmlScene, f"MedSAM2 {name}", cls, COLORS[name]))
        self.panel.setPromptNodes(p.positivePoints, p.negativePoints, p.boxRoi)
        for node in (p.positivePoints, p.negativePoints, p.boxRoi):
            for event in (node.PointPositionDefinedEvent, node.PointEndInteractionEvent):
                if not self.hasObserver(node, event, self.onPromptPlaced):
                    self.addObserver(node, event, self.onPromptPlaced)

    def onPromptPlaced(self, caller=None, event=None) -> None:
        """Note the view under the mouse (it sets the slice axis); previews are the logic's decision."""
        crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        sliceNode = crosshair.GetCursorPositionXYZ([0.0, 0.0, 0.0]) if crosshair else None
        if sliceNode is not None and not (
            caller.IsA("vtkMRMLMarkupsROINode") and caller.GetNumberOfDefinedControlPoints() > 1
        ):
            self.panel.notePromptView(sliceNode)
        self.call(self.ensureOutput)
        if not caller.IsA("vtkMRMLMarkupsROINode"):  # a box is previewed by the logic once complete
            self.panel.requestPreview()

    def onPlace(self, kind: str) -> None:
        p = self._parameterNode
        if p is None or not p.inputVolume or not self.ui.positivePointButton.enabled:
            return
        node = {"positive": p.positivePoints, "negative": p.negativePoints, "box": p.boxRoi}[kind]
        if kind == "box":
            node.RemoveAllControlPoints()  # one box at a time
        selection = slicer.app.applicationLogic().GetSelectionNode()
        selection.SetReferenceActivePlaceNodeClassName(node.GetClassName())
        selection.SetActivePlaceNodeID(node.GetID())
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        interaction.SetPlaceModePersistence(0 if kind == "box" else 1)
        interaction.SetCurrentInteractionMode(interaction.Place)

    def ensureOutput(self) -> None:
        p = self._parameterNode
        self.panel.setOutput(p.outputSegmentation, p.segmentId)
        segmentation, segmentId = self.panel.ensureOutput(self.currentTerminologyEntry())
        if p.outputSegmentation is not segmentation or p.segmentId != segmentId:
            p.outputSegmentation, p.segmentId = segmentation, segmentId
            self.ui.segmentSelector.setCurrentNode(segmentation)
            self.ui.segmentSelector.setCurrentSegmentID(segmentId)
        self.ui.segmentEditorWidget.setSegmentationNode(segmentation)
        self.ui.segmentEditorWidget.setCurrentSegmentID(segmentId)

    def onOutputChanged(self, node) -> None:
        self.ui.segmentSelector.setCurrentNode(node)
        self.ui.segmentEditorWidget.setSegmentationNode(node)

    def onSegmentChanged(self, segmentId) -> None:
        p = self._parameterNode
        if p is None or (segmentId or "") == p.segmentId:
            return
        p.segmentId = segmentId or ""
        self.panel.setOutput(p.outputSegmentation, p.segmentId)
        self.panel.clearMarkups()  # the engine keeps that segment's prompts

    def onAddSegment(self) -> None:
        self.call(self.ensureOutput)
        segmentId = self.call(self.panel.addSegment, None, self.currentTerminologyEntry())
        if segmentId:
            self._parameterNode.segmentId = segmentId
            self.ui.segmentSelector.setCurrentSegmentID(segmentId)

    def onApplyOrCancel(self) -> None:
        if self.panel.activity().value in ("propagating", "cancelling"):
            self.panel.cancel()
        else:
            self.onPropagate()

    def onPropagate(self) -> None:
        from MedSAM2SlicerLib.runs import PropagationRequest

        p = self._parameterNode
        self.call(self.ensureOutput)
        request = PropagationRequest(
            DIRECTIONS[p.direction],
            (p.firstSlice, p.lastSlice) if p.limitSlices else None,
            p.absentSlices if p.stopWhenAbsent else None,
        )
        self.call(self.panel.propagate, request)

    def onRewindow(self) -> None:
        self.call(self.panel.rewindow, WINDOW_PRESETS[self._parameterNode.windowPreset])

    def onSetLimit(self, name: str) -> None:
        view = self.panel.promptView or slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
        index = self.call(self.panel.sliceIndexInView, view)
        if index is not None:
            setattr(self._parameterNode, name, index)
            self._parameterNode.limitSlices = True

    # ------------------------------------------------------------------ terminology, DICOM, server
    def currentTerminologyEntry(self) -> Optional[str]:
        from MedSAM2SlicerLib.terminology import entryFromNavigator

        return entryFromNavigator(self.ui.terminologyNavigator)

    def onApplyTerminology(self) -> None:
        from MedSAM2SlicerLib.segments import setSegmentTerminology

        entry = self.currentTerminologyEntry()
        p = self._parameterNode
        if entry and p.outputSegmentation and p.segmentId:
            self.call(setSegmentTerminology, p.outputSegmentation, p.segmentId, entry)

    def onExportDicomSeg(self) -> None:
        from DICOMLib import DICOMUtils

        from MedSAM2SlicerLib.dicom_export import exportDicomSeg, parseSendTarget, sendExported

        p = self._parameterNode
        with slicer.util.WaitCursor():
            result = self.call(
                exportDicomSeg,
                p.outputSegmentation,
                p.inputVolume,
                slicer.dicomDatabase,
                lambda folder: DICOMUtils.importDicom(folder, copyFiles=True),
                p.model,
                p.model,
            )
        if result is None:
            return
        self.panel.say(_("DICOM-SEG of {n} segment(s) added to the DICOM database.").format(n=len(result.segments)))
        target = self.call(parseSendTarget, p.pacsUrl)
        if target is not None and not self.sideWorker.busy:  # a network call: never on the GUI thread
            self.sideWorker.start(lambda context: sendExported(target, result.path))

    def onTestConnection(self) -> None:
        from MedSAM2SlicerLib.remote_settings import testConnection

        p = self._parameterNode
        token, caFile = self.ui.serverTokenLineEdit.text, self.ui.caFilePathLineEdit.currentPath or ""
        settings = ServerSettings(p.serverUrl, token, caFile, p.allowPlainHttp)
        if not self.sideWorker.busy:
            self.sideWorker.start(lambda context: testConnection(settings))

    def onCaFileChanged(self, path) -> None:
        qt.QSettings().setValue(f"{SETTINGS_GROUP}/caFile", path)

    # ------------------------------------------------------------------ state shown
    def onTimer(self) -> None:
        if self.panel is None:
            return
        self.panel.tick()
        if self.sideWorker.state.value in ("preparing", "propagating", "cancelling"):
            self.sideWorker.drain()
        elif self.sideWorker.state.value in ("done", "failed"):
            self.sideWorker.drain()
            result, error = self.sideWorker.result, self.sideWorker.error
            self.sideWorker.reset()
            self.panel.say(error or str(result), bool(error))
        self.updateGui()

    def updateGui(self) -> None:
        if self.panel is None or not hasattr(self, "ui"):
            return
        for name, enabled in self.panel.controls().items():
            getattr(self.ui, name).enabled = enabled and (
                self.dependenciesReady() or name == "installDependenciesButton"
            )
        running = self.panel.activity().value in ("propagating", "cancelling")
        self.ui.applyButton.text = _("Cancel (Esc)") if running else _("Propagate (Enter)")
        self.ui.statusLabel.text = self.panel.status
        self.ui.statusLabel.setStyleSheet("color: #d03030" if self.panel.error else "")
        self.ui.encodingLabel.text = self.panel.encodingText
        self.ui.intensityLabel.text = self.panel.intensityText() or _("(set when encoding starts)")
        progress = self.panel.worker.progress
        self.ui.progressBar.visible = running
        self.ui.progressBar.setRange(0, max(progress[1], 1))
        self.ui.progressBar.value = progress[0]

    # ------------------------------------------------------------------ dependencies
    def dependenciesReady(self) -> bool:
        return getattr(self, "_dependenciesReady", False)

    def updateDependencyStatus(self) -> None:
        location = self._parameterNode.engineLocation if self._parameterNode else "local"
        plan = dependencies.plan_installation(dependencies.requirements_for(location))
        self._dependenciesReady = not plan.needed
        self.ui.dependencyFrame.visible = plan.needed
        self.ui.dependencyStatusLabel.text = "\n".join(plan.reasons)

    def onInstallDependencies(self) -> None:
        location = self._parameterNode.engineLocation
        self.uiWidget.enabled = False  # pip runs here and processes events: nothing may be pressed meanwhile
        try:
            with slicer.util.WaitCursor():
                dependencies.ensure_dependencies(
                    confirm=slicer.util.confirmOkCancelDisplay,
                    install_torch=dependencies.install_torch_with_pytorch_extension,
                    pip_install=slicer.util.pip_install,
                    requirements=dependencies.requirements_for(location),
                )
        except Exception as exc:  # noqa: BLE001
            slicer.util.errorDisplay(_("Installation failed: {error}").format(error=describeError(exc)))
        finally:
            self.uiWidget.enabled = True
        self.updateDependencyStatus()
        self.onSourceChanged()


class MedSAM2SlicerLogic(ScriptedLoadableModuleLogic):
    """The module's one Logic. ``panel`` (MedSAM2SlicerLib.logic.PanelLogic) holds every decision;
    ``segment(...)`` is the blocking call for Slicer's Python console and scripts::

        logic = slicer.util.getModuleLogic("MedSAM2Slicer")
        segmentationNode, segmentId = logic.segment(volumeNode, [[10.0, -20.0, 35.0]], model="medsam2-latest")
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        from MedSAM2SlicerLib.logic import PanelLogic
        from MedSAM2SlicerLib.settings_store import SettingsStore

        self.panel = PanelLogic(slicer.mrmlScene, licenceStore=SettingsStore(qt.QSettings, SETTINGS_GROUP))

    def getParameterNode(self):
        return MedSAM2SlicerParameterNode(super().getParameterNode())

    def segment(self, volumeNode, positiveRas, negativeRas=(), model=None, device="auto", request=None, name=None):
        if model is not None:
            self.panel.settings.model = model
        self.panel.settings.device = device
        return self.panel.segment(volumeNode, positiveRas, negativeRas, request, name)


class MedSAM2SlicerTest(ScriptedLoadableModuleTest):
    """Runs the module's Logic on Slicer's MRHead sample with SAM2 tiny at random weights (no
    download): it checks placement, undo and closing, not quality. Under ctest Slicer's runner calls
    test_MedSAM2Slicer_sampleData by name, so that method checks the dependencies itself."""

    MODEL = "random-weights:configs/sam2.1/sam2.1_hiera_t.yaml@128"

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        import unittest

        self.setUp()
        try:
            self.test_MedSAM2Slicer_sampleData()
        except unittest.SkipTest as reason:
            self.delayDisplay(str(reason))

    def test_MedSAM2Slicer_sampleData(self):
        reason = dependencies.self_test_skip_reason()
        if reason:
            self.skipTest(reason)
        import numpy as np
        import SampleData

        volume = SampleData.SampleDataLogic().downloadSample("MRHead")
        logic = MedSAM2SlicerLogic()
        dims = np.array(volume.GetImageData().GetDimensions())
        matrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(matrix)
        centre = matrix.MultiplyPoint([*(dims // 2), 1.0])[:3]
        segmentation, segmentId = logic.segment(volume, [centre], model=self.MODEL, device="cpu")
        result = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
        self.assertEqual(result.shape, slicer.util.arrayFromVolume(volume).shape)
        self.assertTrue(logic.panel.writer.canUndo())
        logic.panel.close()
        logic.panel.sessions.waitForBackground()
        self.assertFalse(logic.panel.sessions.handles)
        self.delayDisplay("MedSAM2 test passed")
