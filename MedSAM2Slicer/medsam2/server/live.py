"""A session as the server runs it (finished slices readable while a propagation runs), and the
background runs (propagation, encoding) with their one-line failures."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from medsam2.api import PropagationResult
from medsam2.errors import (
    InvalidPromptError,
    MedSAM2Error,
)
from medsam2.predictor import EngineVideoPredictor
from medsam2.server.transactions import all_or_nothing
from medsam2.session import SegmentationSession

log = logging.getLogger("medsam2.server")

PredictorFactory = Callable[[str], EngineVideoPredictor]
DevicePredictorFactory = Callable[[str, torch.device], EngineVideoPredictor]  # with --devices
# ----------------------------------------------------------------------------- engine session
class LiveSession(SegmentationSession):
    """A SegmentationSession whose running propagation can be read slice by slice.

    The engine writes each propagated slice into the new mask volumes as it goes and publishes them
    only at the end (so a cancel leaves the previous result). The server also wants the slices done
    so far (``GET masks?slice=N`` while running); overriding the two per-slice write hooks records
    which slices of the run are final, without changing what the engine computes.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._live_lock = threading.Lock()
        self._live: dict[int, tuple[np.ndarray, set[int]]] = {}

    def propagate(self, *args: Any, **kwargs: Any) -> PropagationResult:
        with self._live_lock:
            self._live = {}
        try:
            return super().propagate(*args, **kwargs)
        finally:
            with self._live_lock:
                self._live = {}

    def _write_frame(
        self,
        object_id: int,
        frame: int,
        logits: torch.Tensor,
        masks: dict[int, np.ndarray],
        probs: Optional[dict[int, np.ndarray]],
    ) -> None:
        super()._write_frame(object_id, frame, logits, masks, probs)
        self._mark_live(object_id, frame, masks)

    def _clear_frame(
        self, object_id: int, frame: int, masks: dict[int, np.ndarray], probs: Optional[dict[int, np.ndarray]]
    ) -> None:
        super()._clear_frame(object_id, frame, masks, probs)
        self._mark_live(object_id, frame, masks)

    def _mark_live(self, object_id: int, frame: int, masks: dict[int, np.ndarray]) -> None:
        with self._live_lock:
            self._live.setdefault(int(object_id), (masks[object_id], set()))[1].add(int(frame))

    # A request that fails half-way (say, out of memory in the preview, after the prompt was recorded)
    # must leave the session as it was: each operation that changes prompts is all or nothing.
    def add_points(self, *args: Any, **kwargs: Any) -> Any:
        with all_or_nothing(self):
            return super().add_points(*args, **kwargs)

    def add_box(self, *args: Any, **kwargs: Any) -> Any:
        with all_or_nothing(self):
            return super().add_box(*args, **kwargs)

    def add_mask(self, *args: Any, **kwargs: Any) -> Any:
        with all_or_nothing(self):
            return super().add_mask(*args, **kwargs)

    def clear_slice(self, *args: Any, **kwargs: Any) -> None:
        with all_or_nothing(self):
            super().clear_slice(*args, **kwargs)

    def remove_object(self, *args: Any, **kwargs: Any) -> None:
        with all_or_nothing(self):
            super().remove_object(*args, **kwargs)

    def reset(self) -> None:
        with all_or_nothing(self):
            super().reset()

    def slice_mask(self, object_id: int, slice_index: int) -> tuple[np.ndarray, bool]:
        """One slice (as cut from the [k, j, i] array) and whether the running propagation has
        already replaced it (False: it is the previous result's slice)."""
        if not 0 <= slice_index < self.num_slices:
            raise InvalidPromptError(f"slice {slice_index} is outside the volume (0..{self.num_slices - 1})")
        with self._live_lock:
            entry = self._live.get(int(object_id))
            if entry is not None and slice_index in entry[1]:
                return np.ascontiguousarray(self._cut(entry[0], slice_index)), True
        return np.ascontiguousarray(self._cut(self.mask(object_id), slice_index)), False


# ----------------------------------------------------------------------------- runs
@dataclass
class Run:
    """A background propagation (or feature precomputation) of one session."""

    run_id: str
    kind: str
    state: str = "running"  # running | done | cancelled | failed
    done: int = 0
    total: int = 0
    error: Optional[str] = None
    error_type: Optional[str] = None
    result: Optional[PropagationResult] = None
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: Optional[threading.Thread] = None

    @property
    def active(self) -> bool:
        return self.state == "running"


RunBody = Callable[[LiveSession, Run], Optional[PropagationResult]]


def is_out_of_memory(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return isinstance(exc, MemoryError) or (oom is not None and isinstance(exc, oom))


def describe_failure(exc: BaseException, kind: str) -> tuple[str, str]:
    """(error type, one-line message) for a run that raised."""
    if isinstance(exc, MedSAM2Error):
        return type(exc).__name__, str(exc)
    if is_out_of_memory(exc):
        return "MemoryBudgetError", (
            f"out of memory during {kind}; retry when other sessions have finished, or restart the server "
            "with a smaller --memory-budget-gb or --max-sessions"
        )
    first = (str(exc).strip().splitlines() or [""])[0]
    return "InternalError", f"internal error during {kind}: {type(exc).__name__}: {first}"
