"""The jobs the background worker runs: encoding a volume, previews of prompts, propagation.

Each job is built on the GUI thread from what it needs (a numpy *view* of the volume, never a copy:
the copy is made on the worker thread) and runs on the worker thread touching only the engine. Its
result is plain numpy, ready to be written by writer.py on the GUI thread: a propagation returns the
slab it owns, already cut out of the engine's whole-volume mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from medsam2.errors import InvalidPromptError

from .engine_client import EngineClient, PromptBundle, PropagationOutcome, SlicePreview
from .geometry import slabIndex
from .sessions import SessionHandle
from .worker import JobCancelled, JobContext, WorkerState


@dataclass
class PropagationRequest:
    direction: str = "both"  # "both", "forward" (increasing slice index) or "backward"
    sliceRange: Optional[tuple[int, int]] = None  # inclusive limits along the session axis
    stopWhenAbsent: Optional[int] = None  # end a direction after this many slices without the object


@dataclass
class SlabResult:
    """What a propagation writes: slices lo..hi along ``axis``, as a [k, j, i] slab."""

    axis: int
    lo: int
    hi: int
    slab: np.ndarray
    outcome: PropagationOutcome


def writtenRange(outcome: PropagationOutcome, objectId: int, request: PropagationRequest) -> tuple[int, int]:
    """Slices a run owns: those it visited, plus the rest of a direction that ended with the object
    (the engine cleared them: the object is absent there)."""
    first, last = outcome.propagated[objectId]
    lo, hi = request.sliceRange if request.sliceRange is not None else (0, outcome.num_slices - 1)
    stopped = outcome.stopped_early.get(objectId, [])
    if "forward" in stopped:
        last = hi
    if "backward" in stopped:
        first = lo
    return int(first), int(last)


@dataclass
class EngineJob:
    """Shared by every job: make sure the engine has the session (creating it from the volume view,
    replaying logged prompts after a re-window), honouring a handle closed meanwhile."""

    engine: EngineClient
    handle: SessionHandle
    volumeView: Optional[np.ndarray]  # [k, j, i] view of the node's voxels, copied on the worker thread
    geometry: Any

    def ensureSession(self, context: JobContext) -> str:
        handle = self.handle
        if not self.engine.has_session(handle.sessionId):
            if self.volumeView is None:
                raise InvalidPromptError("the engine lost its session; choose the volume again")
            context.message(f"loading {handle.key.model} and preparing the volume")
            volume = np.array(self.volumeView, copy=True)  # the engine must never share the node's buffer
            sessionId = self.engine.create_session(volume, self.geometry, handle.options(), progress=context.progress)
            del volume
            if handle.closed:  # the scene or panel closed while this session was being made
                self.engine.close_session(sessionId)
                raise JobCancelled("closed")
            handle.sessionId = sessionId
            for objectId, bundles in sorted(handle.log.items()):  # a re-window keeps every prompt
                for bundle in bundles:
                    self.engine.add_prompts(sessionId, objectId, bundle)
        context.raise_if_cancelled()
        assert handle.sessionId is not None
        return handle.sessionId


@dataclass
class EncodeJob(EngineJob):
    """Encode every slice in the background (medsam2 Session.precompute_features), outward from the
    slice in view when it is known, stoppable between slices: the progress callback checks the cancel
    flag."""

    fromSlice: Optional[int] = None

    def __call__(self, context: JobContext) -> int:
        context.phase(WorkerState.PREPARING)
        sessionId = self.ensureSession(context)
        session = self.engine.session(sessionId)  # type: ignore[attr-defined]
        total = self.handle.numSlices

        def progress(done: int, todo: int) -> None:
            # precompute_features counts the slices still to encode; the panel shows all of them.
            self.handle.encoded = total - todo + done
            context.progress(self.handle.encoded, total)
            if self.handle.closed:  # another volume or model was chosen, or the scene closed
                raise JobCancelled("closed")
            context.raise_if_cancelled()

        context.phase(WorkerState.PROPAGATING)
        session.precompute_features(progress, self.fromSlice)
        self.handle.encoded = total
        return total


@dataclass
class PromptJob(EngineJob):
    """Send one object's prompts; with a request, propagate after them. Returns previews (no request)
    or the SlabResult to write."""

    objectId: int = 0
    prompts: PromptBundle = field(default_factory=PromptBundle)
    request: Optional[PropagationRequest] = None

    def __call__(self, context: JobContext) -> Any:
        context.phase(WorkerState.PREPARING)
        sessionId = self.ensureSession(context)
        previews: list[SlicePreview] = []
        if not self.prompts.is_empty():
            previews = self.engine.add_prompts(sessionId, self.objectId, self.prompts)
            self.handle.log.setdefault(self.objectId, []).append(self.prompts)
        context.raise_if_cancelled()
        if self.request is None:
            return previews
        context.phase(WorkerState.PROPAGATING)
        outcome = self.engine.propagate(
            sessionId,
            [self.objectId],
            direction=self.request.direction,
            slice_range=self.request.sliceRange,
            stop_when_absent=self.request.stopWhenAbsent,
            progress=context.progress,
            cancel=context.cancel_event,
        )
        lo, hi = writtenRange(outcome, self.objectId, self.request)
        axis = self.handle.axis
        slab = np.ascontiguousarray(outcome.masks[self.objectId][slabIndex(axis, lo, hi)], dtype=np.uint8)
        return SlabResult(axis, lo, hi, slab, outcome)
