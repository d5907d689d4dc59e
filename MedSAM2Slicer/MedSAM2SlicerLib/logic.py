"""Every decision of the MedSAM2 panel, on the MRML scene and without Qt: which job to start, when a
box is complete, what a window/level change does, which controls are enabled, what is written where
and what undo restores. The module's widget forwards Qt signals here and applies ``controls()``;
tests drive the same calls on a ``slicer-core`` scene.

The worker runs one job at a time. Background encoding is the job that runs when nothing else is
asked for; a prompt or a propagation cancels it (between slices) and it resumes afterwards, skipping
the slices already encoded. A request made while a preview or propagation runs is queued (one
preview and one propagation at most; a propagation makes a queued preview unnecessary).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, MutableMapping, Optional

import numpy as np

from medsam2.errors import InvalidPromptError

from . import geometry, prompts, segments
from .engine_client import EngineClient, LocalEngineClient
from .errors import describeError
from .licences import LicenceQuestion, LicenceRecord, licenceQuestion
from .panel_state import Activity, controlStates
from .runs import EncodeJob, PromptJob, PropagationRequest, SlabResult
from .sessions import SessionCache, SessionHandle, sessionKey
from .worker import BackgroundWorker, WorkerState
from .writer import SegmentWriter

logger = logging.getLogger(__name__)

VIEW_AXES = ("axial", "coronal", "sagittal")


def intensityFromDisplay(volumeNode: Any) -> str:
    """The window/level the user sees, as an engine intensity spec ("W,L")."""
    display = volumeNode.GetDisplayNode() if volumeNode is not None else None
    if display is None or not display.GetWindow() > 0:
        return "minmax"
    return f"{display.GetWindow():.6g},{display.GetLevel():.6g}"


@dataclass
class PanelSettings:
    model: str = "medsam2-latest"
    device: str = "auto"
    windowPreset: Optional[str] = None  # an engine preset ("abdomen", "mri"...) or None: the view's W/L
    sliceAxis: Optional[str] = None  # "axial"/"coronal"/"sagittal", or None: the view prompts come from
    usePaintedSlice: bool = False
    previewPrompts: bool = True  # preview the prompted slice after each click or completed box


class PanelLogic:
    def __init__(
        self,
        scene: Any,
        engine: Optional[EngineClient] = None,
        engineKey: tuple[str, ...] = ("local",),
        licenceStore: Optional[MutableMapping[str, str]] = None,
        writer: Optional[SegmentWriter] = None,
    ) -> None:
        self.scene = scene
        self.engine: EngineClient = engine or LocalEngineClient()
        self.engineKey = engineKey
        self.sessions = SessionCache(self.engine)
        self._writer = writer
        self.licences = LicenceRecord(licenceStore if licenceStore is not None else {})
        self.settings = PanelSettings()
        self.worker = BackgroundWorker()
        self.volumeNode: Any = None
        self.segmentationNode: Any = None
        self.segmentId: str = ""
        self.positiveNode: Any = None
        self.negativeNode: Any = None
        self.roiNode: Any = None
        self.promptView: Any = None  # slice node the latest prompt was placed in
        self.status = ""  # the latest outcome or error, one line
        self.error = False
        self.encodingText = ""  # "encoding 37/120" while slices are encoded in the background
        self.encodingView: Any = None  # a slice node whose slice is encoded first (the widget's Red view)
        self.licencePending: Optional[LicenceQuestion] = None
        self._job: Optional[tuple[str, Any]] = None  # (kind, job) running on the worker
        self._queued: dict[str, Any] = {}  # "preview" -> True, "propagate" -> PropagationRequest
        self._boxSeen: Optional[bytes] = None  # corners of the box last previewed
        self._observations: list[tuple[Any, int]] = []
        self.onChange: Optional[Callable[[], None]] = None  # the widget refreshes its controls

    @property
    def writer(self) -> SegmentWriter:
        """Writes through the Segment Editor's logic; made on first use unless the panel gives one
        (in Slicer: bound to the embedded Segment Editor's node and history)."""
        if self._writer is None:
            self._writer = SegmentWriter(self.scene)
        return self._writer

    @writer.setter
    def writer(self, writer: SegmentWriter) -> None:
        self._writer = writer

    # ------------------------------------------------------------------ inputs
    def setEngine(self, engine: EngineClient, engineKey: tuple[str, ...]) -> None:
        """Switch between the in-process engine and a server; sessions of the old one are closed."""
        self.closeSessions()
        self.engine, self.engineKey = engine, engineKey
        self.sessions = SessionCache(engine)
        self.startEncoding()

    def configureEngine(self, server: Any = None) -> None:
        """The in-process engine (None) or a server (remote_settings.ServerSettings); switching
        closes the old engine's sessions, keeping the same one does nothing."""
        from .remote_settings import engineFor

        key = server.key() if server is not None else ("local",)
        if key != self.engineKey:
            self.setEngine(engineFor(server), key)

    def setSource(self, volumeNode: Any, model: Optional[str] = None, device: Optional[str] = None) -> None:
        """A source volume (and model) chosen: encoding starts in the background."""
        if model is not None:
            self.settings.model = model
        if device is not None:
            self.settings.device = device
        if volumeNode is not None:
            geometry.checkVolume(volumeNode)
        self.volumeNode = volumeNode
        if self._job is not None and self._job[0] == "encode" and self.worker.busy:
            self.worker.cancel()  # the old volume's or model's encoding; the new one is queued below
        self.startEncoding()

    def setPromptNodes(self, positive: Any, negative: Any, roi: Any) -> None:
        """The markups the user places prompts in; the box is watched for completion and drags."""
        for node, tag in self._observations:
            node.RemoveObserver(tag)
        self._observations = []
        self.positiveNode, self.negativeNode, self.roiNode = positive, negative, roi
        if roi is not None:
            for event in (roi.PointPositionDefinedEvent, roi.PointEndInteractionEvent):
                self._observations.append((roi, roi.AddObserver(event, self._onBoxEvent)))

    def _onBoxEvent(self, caller: Any = None, event: Any = None) -> None:
        # Decided later in tick(): when these events fire the ROI may still be mid-update.
        self._queued.setdefault("boxCheck", True)

    def notePromptView(self, sliceNode: Any) -> None:
        """The slice view the user is placing a prompt in (from the widget's interaction events)."""
        self.promptView = sliceNode

    def onDisplayChanged(self) -> None:
        """Window/level changed in the views: the session keeps its own window (see sessions.py)."""

    # ------------------------------------------------------------------ what the session is
    def currentAxis(self) -> int:
        if self.settings.sliceAxis is not None:
            return geometry.voxelAxisForView(self.volumeNode, self.settings.sliceAxis)
        if self.promptView is not None:
            return geometry.sliceAxisForSliceNode(self.volumeNode, self.promptView)
        return geometry.voxelAxisForView(self.volumeNode, "axial")

    def currentHandle(self, create: bool = True) -> Optional[SessionHandle]:
        if self.volumeNode is None:
            return None
        key = sessionKey(self.volumeNode, self.currentAxis(), self.settings.model, self.settings.device, self.engineKey)
        handle = self.sessions.get(key)
        if handle is None and create:
            intensity = self.settings.windowPreset or intensityFromDisplay(self.volumeNode)
            handle = self.sessions.open(key, self.volumeNode, intensity)
        return handle

    def intensityText(self) -> str:
        handle = self.currentHandle(create=False)
        return handle.intensity if handle is not None else ""

    def activity(self) -> Activity:
        if self.volumeNode is None:
            return Activity.NO_INPUT
        if self.worker.state == WorkerState.CANCELLING and self._job and self._job[0] == "propagate":
            return Activity.CANCELLING
        kind = self._job[0] if self._job and self.worker.busy else None
        return {"encode": Activity.ENCODING, "preview": Activity.PREVIEWING, "propagate": Activity.PROPAGATING}.get(
            kind or "", Activity.IDLE
        )

    def controls(self) -> dict[str, bool]:
        return controlStates(self.activity(), self.writer.canUndo(), self.writer.canRedo())

    def say(self, text: str, error: bool = False) -> None:
        self.status, self.error = text, error
        if self.onChange:
            self.onChange()

    # ------------------------------------------------------------------ licences
    def _modelAllowed(self) -> bool:
        if self.licences.accepted(self.settings.model):
            self.licencePending = None
            return True
        self.licencePending = licenceQuestion(self.settings.model)
        self.say(f"accept the licence of {self.settings.model} to use it", error=True)
        return False

    def answerLicence(self, accepted: bool) -> None:
        if accepted:
            self.licences.accept(self.settings.model)
            self.licencePending = None
            self.startEncoding()
        else:
            self.licences.decline(self.settings.model)
            self.say(f"{self.settings.model} was not accepted; choose another model", error=True)

    # ------------------------------------------------------------------ jobs
    def startEncoding(self) -> None:
        """Encode the current session's slices when the worker has nothing else to do."""
        if self.volumeNode is None or not self._modelAllowed():
            return
        self._queued.setdefault("encode", True)
        self.tick()

    def _jobBase(self, handle: SessionHandle) -> dict[str, Any]:
        needsVolume = not self.engine.has_session(handle.sessionId)
        view = geometry.imageToArray(self.volumeNode.GetImageData()) if needsVolume else None
        return dict(
            engine=self.engine, handle=handle, volumeView=view, geometry=geometry.volumeGeometry(self.volumeNode)
        )

    def requestPreview(self) -> None:
        """A prompt was placed: preview its slice (now, or after the running preview)."""
        if self.settings.previewPrompts and self.volumeNode is not None and self.segmentationNode is not None:
            self._queued["preview"] = True
            self.tick()

    def propagate(self, request: Optional[PropagationRequest] = None) -> None:
        if self.volumeNode is None:
            raise InvalidPromptError("no source volume selected")
        self._queued.pop("preview", None)  # the propagation sends the same prompts
        self._queued["propagate"] = request or PropagationRequest()
        self.tick()

    def cancel(self) -> None:
        self._queued.pop("propagate", None)
        self._queued.pop("preview", None)
        if self._job is not None and self.worker.busy:
            self.worker.cancel()

    def _prompts(self, handle: SessionHandle, withPaintedSlice: bool) -> prompts.PromptBundle:
        masks = {}
        if withPaintedSlice:
            view = self.promptView
            if view is None:
                raise InvalidPromptError("show the painted slice in a slice view first")
            index = geometry.sliceIndexForSliceNode(self.volumeNode, view, handle.axis)
            masks[index] = segments.segmentSliceMask(
                self.segmentationNode, self.segmentId, self.volumeNode, handle.axis, index
            )
        return prompts.collectPrompts(
            self.volumeNode, handle.axis, self.positiveNode, self.negativeNode, self.roiNode, masks
        )

    def _startNext(self) -> None:
        """Pick the next job: propagation, then preview, then background encoding."""
        if self._queued.pop("boxCheck", None):
            self._checkBox()
        for kind in ("propagate", "preview"):
            if kind not in self._queued:
                continue
            if self.worker.busy:  # encoding gives way; a preview or propagation is waited for
                if self._job and self._job[0] == "encode":
                    self.worker.cancel()
                return
            request = self._queued.pop(kind)
            try:
                job = self._promptJob(request if kind == "propagate" else None)
            except Exception as exc:  # noqa: BLE001 - one line in the status, panel stays usable
                self.say(describeError(exc), error=True)
                continue
            if job is None:
                continue
            self._run(kind, job)
            return
        if self._queued.get("encode") and not self.worker.busy:
            handle = self.currentHandle()
            if handle is None or handle.encoded >= handle.numSlices:
                self._queued.pop("encode", None)
                return
            self._run("encode", EncodeJob(**self._jobBase(handle), fromSlice=self._encodingStart()))

    def _promptJob(self, request: Optional[PropagationRequest]) -> Optional[PromptJob]:
        segments.checkSegmentation(self.segmentationNode, self.segmentId)
        handle = self.currentHandle()
        assert handle is not None
        bundle = self._prompts(handle, self.settings.usePaintedSlice and request is not None)
        if request is None and bundle.is_empty():
            return None
        if request is not None and bundle.is_empty() and not handle.log:
            raise InvalidPromptError("no prompts: place a point, draw a box or use the painted slice first")
        objectId = handle.objectId(self.segmentationNode.GetID(), self.segmentId)
        return PromptJob(**self._jobBase(handle), objectId=objectId, prompts=bundle, request=request)

    def _run(self, kind: str, job: Any) -> None:
        self._job = (kind, job)
        if kind != "encode":
            self._job[1].target = (self.segmentationNode, self.segmentId, self.volumeNode)
        self.worker.start(job)
        if kind == "encode":
            self.encodingText = f"encoding {job.handle.encoded}/{job.handle.numSlices}"
        else:
            self.say({"preview": "previewing", "propagate": "propagating"}[kind])

    def _checkBox(self) -> None:
        """Preview the box once it is complete, and again after its handles are dragged."""
        if self.roiNode is None or self.volumeNode is None:
            return
        axis = self.currentAxis()
        if not prompts.boxIsComplete(self.volumeNode, self.roiNode, axis):
            return
        box = prompts.roiBoxIjk(self.volumeNode, self.roiNode, axis)
        signature = np.concatenate(box).tobytes() if box else None
        if signature != self._boxSeen:
            self._boxSeen = signature
            if self.settings.previewPrompts and self.segmentationNode is not None:
                self._queued["preview"] = True

    def tick(self) -> bool:
        """GUI thread (the widget's timer; tests call it): deliver the worker's events, write finished
        results, start what is queued. True while anything is running or queued."""
        self.worker.drain()
        if self._job is not None and not self.worker.busy:
            kind, job = self._job
            self._job = None
            self._finish(kind, job)
        if not self.worker.busy:
            self._startNext()
        elif self._queued.get("boxCheck") or "propagate" in self._queued or "preview" in self._queued:
            self._startNext()
        if self.worker.busy and self._job and self._job[0] == "encode":
            handle = self._job[1].handle
            self.encodingText = f"encoding {handle.encoded}/{handle.numSlices}"
        return self.worker.busy or bool(self._queued)

    def _finish(self, kind: str, job: Any) -> None:
        state = self.worker.state
        if state == WorkerState.FAILED:
            self.say(self.worker.error or "failed", error=True)
        elif state == WorkerState.CANCELLED:
            if kind == "propagate":
                self.say("cancelled: the segment is unchanged")
            if kind == "encode":
                self._queued.setdefault("encode", True)  # resumed when the worker is free
        elif state == WorkerState.DONE:
            try:
                self._write(kind, job, self.worker.result)
            except Exception as exc:  # noqa: BLE001 - an MRML write that fails must not leave the panel stuck
                self.say(describeError(exc), error=True)
        self.worker.reset()
        if kind != "encode" and not self._queued.get("encode"):
            self._queued["encode"] = True

    def _write(self, kind: str, job: Any, result: Any) -> None:
        if kind == "encode":
            self.encodingText = f"encoded {result} slices"
            if self.onChange:
                self.onChange()
            return
        segmentationNode, segmentId, volumeNode = job.target
        if segmentationNode.GetScene() is None or segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
            self.say("the segment was deleted while it was computed; nothing written", error=True)
            return
        axis = job.handle.axis
        if kind == "preview":
            for preview in result:
                self.writer.writePreview(
                    segmentationNode, segmentId, volumeNode, axis, int(preview.slice_index), preview.mask
                )
            self.say("preview shown; propagate with Enter")
            return
        assert isinstance(result, SlabResult)
        self.writer.writePropagation(
            segmentationNode, segmentId, volumeNode, result.axis, result.lo, result.hi, result.slab
        )
        self.say(f"done: slices {result.lo} to {result.hi} updated")

    def waitIdle(self, includeEncoding: bool = False, timeout: float = 600.0) -> None:
        """Scripts and tests: tick until nothing runs or is queued (background encoding only counts
        with ``includeEncoding``)."""
        while True:
            self.tick()
            pending = {k for k in self._queued if k != "encode"}
            running = self._job is not None and self.worker.busy
            encodingOnly = running and self._job is not None and self._job[0] == "encode"
            if not pending and (not running or (encodingOnly and not includeEncoding)):
                if not (includeEncoding and self._queued.get("encode")):
                    return
            if running and not self.worker.wait(timeout):
                raise TimeoutError("MedSAM2 worker did not finish")

    def segment(
        self,
        volumeNode: Any,
        positiveRas: Any,
        negativeRas: Any = (),
        request: Optional[PropagationRequest] = None,
        name: Optional[str] = None,
    ) -> tuple[Any, str]:
        """Blocking, for Slicer's Python console and scripts: clicks in world RAS on one slice, then
        a propagation; returns (segmentation node, segment ID)."""
        points = []
        for label, coordinates in (("positive", positiveRas), ("negative", negativeRas)):
            node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"MedSAM2 {label}")
            for p in coordinates:
                node.AddControlPoint(float(p[0]), float(p[1]), float(p[2]))
            points.append(node)
        try:
            self.setPromptNodes(points[0], points[1], None)
            self.setSource(volumeNode)
            if not self.licences.accepted(self.settings.model):
                raise InvalidPromptError(f"accept the licence of {self.settings.model} first (answerLicence)")
            self.segmentId = ""
            self.ensureOutput()
            if name:
                self.segmentationNode.GetSegmentation().GetSegment(self.segmentId).SetName(name)
            self.propagate(request)
            self.waitIdle()
            if self.error:
                raise InvalidPromptError(self.status)
            return self.segmentationNode, self.segmentId
        finally:
            self.setPromptNodes(None, None, None)
            for node in points:
                self.scene.RemoveNode(node)

    # ------------------------------------------------------------------ segments, undo
    def setOutput(self, segmentationNode: Any, segmentId: str) -> None:
        if (segmentationNode, segmentId) != (self.segmentationNode, self.segmentId):
            self.writer.endRound()
        self.segmentationNode, self.segmentId = segmentationNode, segmentId
        self._boxSeen = None

    def ensureOutput(self, terminologyEntry: Optional[str] = None) -> tuple[Any, str]:
        """The output segmentation and segment, created (on the volume's geometry) when missing."""
        if self.segmentationNode is None or self.segmentationNode.GetScene() is None:
            self.segmentationNode = segments.createSegmentationNode(self.volumeNode)
        if not self.segmentId or self.segmentationNode.GetSegmentation().GetSegment(self.segmentId) is None:
            self.segmentId = segments.addSegment(
                self.segmentationNode, self.volumeNode, terminologyEntry=terminologyEntry
            )
        return self.segmentationNode, self.segmentId

    def addSegment(self, name: Optional[str] = None, terminologyEntry: Optional[str] = None) -> str:
        """A new segment next to the others; prompts on screen are cleared (the engine keeps the
        previous segment's, so its next propagation still builds on them)."""
        if self.segmentationNode is None:
            self.ensureOutput(terminologyEntry)
        else:
            self.setOutput(
                self.segmentationNode,
                segments.addSegment(self.segmentationNode, self.volumeNode, name, terminologyEntry=terminologyEntry),
            )
        self.clearMarkups()
        return self.segmentId

    def clearMarkups(self) -> None:
        for node in (self.positiveNode, self.negativeNode, self.roiNode):
            if node is not None:
                node.RemoveAllControlPoints()
        self._boxSeen = None

    def clearPrompts(self) -> None:
        """Forget the current segment's prompts, on screen and in the engine (off the GUI thread)."""
        self.clearMarkups()
        for handle in self.sessions.handles.values():
            objectId = (
                handle.objectIds.pop((self.segmentationNode.GetID(), self.segmentId), None)
                if self.segmentationNode
                else None
            )
            if objectId is None:
                continue
            handle.log.pop(objectId, None)
            if handle.sessionId is not None:
                self.sessions.inBackground(_call(self.engine.remove_object, handle.sessionId, objectId))

    def rewindow(self, windowPreset: Optional[str] = None) -> str:
        """Re-encode the current axis with a new window (None: the view's W/L now); prompts are kept."""
        if self.worker.busy and self._job and self._job[0] != "encode":
            raise InvalidPromptError("wait for the running propagation, or cancel it, before re-windowing")
        self.settings.windowPreset = windowPreset
        handle = self.currentHandle()
        assert handle is not None
        if self.worker.busy:  # the old window's encoding
            self.worker.cancel()
        fresh = self.sessions.replace(handle, windowPreset or intensityFromDisplay(self.volumeNode))
        self._queued["encode"] = True
        self.tick()
        return fresh.intensity

    def undo(self) -> bool:
        return (
            self.activity() not in (Activity.PROPAGATING, Activity.CANCELLING, Activity.PREVIEWING)
            and self.writer.undo()
        )

    def redo(self) -> bool:
        return (
            self.activity() not in (Activity.PROPAGATING, Activity.CANCELLING, Activity.PREVIEWING)
            and self.writer.redo()
        )

    def _encodingStart(self) -> Optional[int]:
        """Where background encoding starts: the slice shown in the view of the last prompt, else in
        ``encodingView`` (the widget sets the Red view); None (slice order) when neither is known."""
        view = self.promptView or self.encodingView
        if view is None or self.volumeNode is None:
            return None
        try:
            return self.sliceIndexInView(view)
        except Exception:  # a view whose plane is not along the session's axis: encode in slice order
            return None

    def sliceIndexInView(self, sliceNode: Any) -> int:
        """For "Set from current slice": the slice the view shows, along the session's axis."""
        return geometry.sliceIndexForSliceNode(self.volumeNode, sliceNode, self.currentAxis())

    # ------------------------------------------------------------------ closing
    def closeSessions(self) -> None:
        """Close every engine session (the running job closes the one it is creating)."""
        self._queued.clear()
        if self.worker.busy:
            self.worker.cancel()
        self.sessions.closeAll()

    def close(self) -> None:
        """Scene or module closed, in any state."""
        self.closeSessions()
        self.setPromptNodes(None, None, None)
        self.volumeNode = self.segmentationNode = None
        self.segmentId = ""
        self.promptView = None


def _call(function: Callable[..., Any], *args: Any) -> Callable[[], None]:
    """A call with its arguments bound now (a lambda in a loop would see the loop's last values)."""

    def run() -> None:
        function(*args)

    return run
