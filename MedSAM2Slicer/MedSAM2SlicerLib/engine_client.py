"""Where the model runs: in this process (local GPU or CPU) or, later, on an inference server.

The Slicer logic talks to an :class:`EngineClient` only, with plain numpy arrays and voxel indices,
so the remote client (server issue) can implement the same calls over HTTP. Sessions are named by
string ids because a remote client can only hold a handle, not the session object.

Prompt semantics (both implementations): every call to :meth:`EngineClient.add_prompts` replaces,
slice by slice, the object's earlier prompts on the slices it mentions; slices it does not mention
keep their earlier prompts, so a refinement on a new slice adds to what was there.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

# medsam2.api is numpy-only: the panel imports it without torch (remote mode).
from medsam2.api import CancelCheck, ProgressCallback, Session, SlicePreview, send_prompts

logger = logging.getLogger(__name__)

# (model name, device name, download progress) -> an EngineVideoPredictor
PredictorLoader = Callable[[str, str, Optional[ProgressCallback]], Any]

# A model name with this prefix builds SAM2 with random weights at a small size (no download): only for
# plumbing checks (tests, the module's self-test), never for segmentation. Format: prefix + config [+ @size].
RANDOM_WEIGHTS_PREFIX = "random-weights:"


@dataclass(frozen=True)
class SessionOptions:
    model: str = "medsam2-latest"  # a medsam2.models.registry name
    device: str = "auto"
    intensity: str = "minmax"  # anything medsam2.intensity.parse_intensity reads: "abdomen", "400,40", "mri"
    axis: int = 2  # voxel axis the volume is cut along (0 = i, 1 = j, 2 = k)
    memory_budget_bytes: Optional[int] = None


@dataclass
class PromptBundle:
    """One object's prompts, in continuous voxel indices (i, j, k) of the session's volume."""

    points_ijk: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # (N, 3)
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=int))  # (N,) 1 positive, 0 negative
    boxes: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # opposite corners, one per slice
    masks: dict[int, np.ndarray] = field(default_factory=dict)  # slice index -> 2D mask as cut from [k, j, i]

    def is_empty(self) -> bool:
        return len(self.points_ijk) == 0 and not self.boxes and not self.masks


@dataclass
class PropagationOutcome:
    masks: dict[int, np.ndarray]  # uint8 [k, j, i] per object
    propagated: dict[int, tuple[int, int]]  # first and last slice visited per object
    stopped_early: dict[int, list[str]]  # directions ("forward"/"backward") ended because the object ended
    axis: int
    num_slices: int


class EngineClient(ABC):
    """The calls the Slicer logic makes; all of them may block and are run off the GUI thread."""

    @abstractmethod
    def create_session(
        self,
        volume: np.ndarray,
        geometry: Any,
        options: SessionOptions,
        progress: Optional[ProgressCallback] = None,
    ) -> str:
        """Prepare a [k, j, i] volume with its medsam2.geometry.VolumeGeometry; returns a session id."""

    @abstractmethod
    def add_prompts(self, session_id: str, object_id: int, prompts: PromptBundle) -> list[SlicePreview]:
        """Send one object's prompts; returns the model's mask on each prompted slice."""

    @abstractmethod
    def propagate(
        self,
        session_id: str,
        object_ids: list[int],
        direction: str = "both",
        slice_range: Optional[tuple[int, int]] = None,
        stop_when_absent: Optional[int] = None,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelCheck] = None,
    ) -> PropagationOutcome:
        """Propagate; raises medsam2.errors.PropagationCancelled when ``cancel`` fires."""

    @abstractmethod
    def fetch_mask(self, session_id: str, object_id: int) -> np.ndarray:
        """The object's latest propagated mask, uint8 [k, j, i]."""

    @abstractmethod
    def remove_object(self, session_id: str, object_id: int) -> None:
        """Forget an object's prompts and results (the segment's voxels are not touched)."""

    @abstractmethod
    def close_session(self, session_id: str) -> None:
        """Free the session (its cached slice features)."""

    def has_session(self, session_id: Optional[str]) -> bool:
        return False

    def describe(self) -> str:
        return type(self).__name__


def default_predictor_loader(model: str, device: str, progress: Optional[ProgressCallback] = None) -> Any:
    """A model name to a predictor: random-weight test models here, catalogue models through the model
    registry (which downloads on first use and reports bytes through ``progress``), or the path of a
    local checkpoint (a department's fine-tuned model)."""
    from medsam2.devices import resolve_device
    from medsam2.errors import ModelError

    torch_device = resolve_device(device)
    if model.startswith(RANDOM_WEIGHTS_PREFIX):
        from medsam2.models.build import build_predictor

        spec = model[len(RANDOM_WEIGHTS_PREFIX) :]
        config, _, size = spec.partition("@")
        return build_predictor(config, image_size=int(size) if size else None, device=torch_device, seed=0)
    try:
        from medsam2.models.registry import load_model
    except ImportError:
        raise ModelError(
            f"cannot load model {model!r}: this build has no model registry (medsam2.models.registry)"
        ) from None

    def bytes_progress(done: int, total: Optional[int]) -> None:
        if progress is not None:
            progress(int(done), int(total or 0))

    if model.lower().endswith((".pt", ".pth")) and os.path.isfile(os.path.expanduser(model)):
        # A local checkpoint, e.g. one `medsam2 finetune` wrote (it records its config, size and intensity).
        predictor, _entry = load_model(checkpoint=model, device=torch_device)
        return predictor
    predictor, _entry = load_model(model, device=torch_device, progress=bytes_progress if progress else True)
    return predictor


def model_names() -> list[str]:
    """Catalogue names for the model selector (empty when the registry is not available)."""
    try:
        from medsam2.models.catalogue import list_models
    except ImportError:
        return []
    return [entry.name for entry in list_models()]


class SessionEngineClient(EngineClient):
    """Shared by both engines: the engine's session objects (in-process SegmentationSession or
    medsam2.remote.RemoteSession, which has the same methods and errors) kept by id. Subclasses only
    say how a session is opened and closed."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    @abstractmethod
    def _open_session(
        self, volume: np.ndarray, geometry: Any, options: SessionOptions, progress: Optional[ProgressCallback]
    ) -> Session:
        """A new engine session for the volume."""

    def _close(self, session: Session) -> None:
        """Release an engine session (in process: its cached slice features)."""
        session.close()

    def create_session(
        self,
        volume: np.ndarray,
        geometry: Any,
        options: SessionOptions,
        progress: Optional[ProgressCallback] = None,
    ) -> str:
        session = self._open_session(volume, geometry, options, progress)
        session_id = uuid.uuid4().hex
        with self._lock:
            self._sessions[session_id] = session
        return session_id

    def session(self, session_id: str) -> Session:
        from medsam2.errors import InvalidPromptError

        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise InvalidPromptError(f"no engine session {session_id!r}; start a new propagation")
        return session

    def has_session(self, session_id: Optional[str]) -> bool:
        with self._lock:
            return session_id is not None and session_id in self._sessions

    def add_prompts(self, session_id: str, object_id: int, prompts: PromptBundle) -> list[SlicePreview]:
        session = self.session(session_id)
        previews = [
            session.add_mask(object_id, int(slice_index), mask) for slice_index, mask in sorted(prompts.masks.items())
        ]
        return previews + send_prompts(session, object_id, prompts.points_ijk, prompts.labels, prompts.boxes)

    def propagate(
        self,
        session_id: str,
        object_ids: list[int],
        direction: str = "both",
        slice_range: Optional[tuple[int, int]] = None,
        stop_when_absent: Optional[int] = None,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelCheck] = None,
    ) -> PropagationOutcome:
        session = self.session(session_id)
        result = session.propagate(
            direction,
            slice_range,
            stop_when_absent,
            object_ids=list(object_ids),
            progress=progress,
            cancel=cancel,
        )
        return PropagationOutcome(
            masks=dict(result.masks),
            propagated=dict(result.propagated),
            stopped_early=dict(result.stopped_early),
            axis=session.layout.voxel_axis,
            num_slices=session.num_slices,
        )

    def fetch_mask(self, session_id: str, object_id: int) -> np.ndarray:
        return self.session(session_id).mask(object_id)

    def remove_object(self, session_id: str, object_id: int) -> None:
        session = self.session(session_id)
        if int(object_id) in session.object_ids:
            session.remove_object(object_id)

    def close_session(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is not None:
            self._close(session)


class LocalEngineClient(SessionEngineClient):
    """The engine in this process. Predictors are cached per (model, device): building one takes seconds
    and re-building it for every run is what made earlier plugins slow."""

    def __init__(self, predictor_loader: Optional[PredictorLoader] = None) -> None:
        super().__init__()
        self._loader = predictor_loader or default_predictor_loader
        self._predictors: dict[tuple[str, str], Any] = {}
        # Its own lock: loading may download for minutes, and the GUI thread must still be able to
        # ask has_session() meanwhile.
        self._predictor_lock = threading.Lock()

    def describe(self) -> str:
        return "in-process engine"

    def predictor(self, model: str, device: str, progress: Optional[ProgressCallback] = None) -> Any:
        key = (model, device)
        with self._predictor_lock:
            if key not in self._predictors:
                self._predictors[key] = self._loader(model, device, progress)
            return self._predictors[key]

    def _open_session(
        self, volume: np.ndarray, geometry: Any, options: SessionOptions, progress: Optional[ProgressCallback]
    ) -> Session:
        from medsam2.session import SegmentationSession

        return SegmentationSession(
            self.predictor(options.model, options.device, progress),
            volume,
            geometry,
            axis=int(options.axis),
            intensity=options.intensity,
            memory_budget_bytes=options.memory_budget_bytes,
        )


class RemoteEngineClient(SessionEngineClient):
    """An inference server (``medsam2 serve``) at ``url``: the volume is uploaded once per session, the
    server's GPU does the work, masks come back compressed. The server chooses the device."""

    def __init__(self, url: str, token: str, ca_file: Optional[str] = None, verify_tls: bool = True) -> None:
        super().__init__()
        from medsam2.errors import InvalidPromptError

        if not url.strip():
            raise InvalidPromptError("no server URL; enter the inference server's address (e.g. https://host:8765)")
        if not token.strip():
            raise InvalidPromptError("no server token; enter the access token of the inference server")
        self.url, self._token = url.strip(), token.strip()
        self.ca_file, self.verify_tls = ca_file, verify_tls

    def describe(self) -> str:
        return f"server {self.url}"

    def _open_session(
        self, volume: np.ndarray, geometry: Any, options: SessionOptions, progress: Optional[ProgressCallback]
    ) -> Session:
        from medsam2.remote import RemoteSession

        return RemoteSession(
            self.url,
            self._token,
            volume,
            geometry,
            axis=int(options.axis),
            intensity=options.intensity,
            model=options.model,
            ca_file=self.ca_file,
            verify_tls=self.verify_tls,
        )

    def _close(self, session: Session) -> None:
        try:
            session.close()
        except Exception as exc:  # an unreachable server must not stop the panel from moving on
            logger.warning("could not close the server session: %s", exc)
