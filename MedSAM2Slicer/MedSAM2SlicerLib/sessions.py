"""Engine sessions as the panel keeps them: one per slice axis of the current volume and model.

A session's key is what makes its cached slice features valid: the volume node and its voxels (image
modification time), its geometry, the slice axis, the model, the device and the engine. The intensity
window is *not* in the key: it is fixed when the session starts (and shown in the panel), so a
window/level change in the views, or a click in another view, never closes a session or loses its
prompts. Re-windowing is an explicit action: a new session with the new window, into which every
prompt sent so far is replayed (``PromptLog``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .engine_client import EngineClient, PromptBundle, SessionOptions
from .geometry import volumeIjkToWorld, volumeShape


@dataclass(frozen=True)
class SessionKey:
    volumeId: str
    imageMTime: int
    geometry: bytes
    axis: int
    model: str
    device: str
    engine: tuple[str, ...]


def sessionKey(volumeNode: Any, axis: int, model: str, device: str, engine: tuple[str, ...]) -> SessionKey:
    return SessionKey(
        volumeNode.GetID(),
        int(volumeNode.GetImageData().GetMTime()),  # edited voxels mean a new session
        volumeIjkToWorld(volumeNode).round(9).tobytes(),
        int(axis),
        model,
        device,
        engine,
    )


@dataclass
class SessionHandle:
    """The engine session for one key. ``sessionId`` is set by the worker thread once the engine has
    the volume; ``closed`` tells a job still running to close what it creates."""

    key: SessionKey
    intensity: str  # fixed for the session's life: "W,L", a preset name or "mri"
    numSlices: int
    sessionId: Optional[str] = None
    objectIds: dict[tuple[str, str], int] = field(default_factory=dict)  # (segmentation, segment) -> id
    log: dict[int, list[PromptBundle]] = field(default_factory=dict)  # object id -> bundles sent
    encoded: int = 0  # slices encoded so far (as the last encoding job reported)
    closed: bool = False

    @property
    def axis(self) -> int:
        return self.key.axis

    def options(self) -> SessionOptions:
        return SessionOptions(model=self.key.model, device=self.key.device, intensity=self.intensity, axis=self.axis)

    def objectId(self, segmentationId: str, segmentId: str) -> int:
        ids = self.objectIds
        return ids.setdefault((segmentationId, segmentId), max(ids.values(), default=0) + 1)


class SessionCache:
    """Handles by axis for the current (volume, model, device, engine); closing happens off the GUI
    thread, since a server session is closed over HTTP."""

    def __init__(self, engine: EngineClient) -> None:
        self.engine = engine
        self.handles: dict[int, SessionHandle] = {}
        self._closers: list[threading.Thread] = []

    def get(self, key: SessionKey) -> Optional[SessionHandle]:
        handle = self.handles.get(key.axis)
        return handle if handle is not None and handle.key == key and not handle.closed else None

    def open(self, key: SessionKey, volumeNode: Any, intensity: str) -> SessionHandle:
        """The handle for ``key``: the existing one (its intensity kept), or a new one with
        ``intensity``. Handles of another volume, model, device or engine are closed."""
        existing = self.get(key)
        if existing is not None:
            return existing
        for axis, handle in list(self.handles.items()):
            sameSource = (
                handle.key.volumeId,
                handle.key.imageMTime,
                handle.key.geometry,
                handle.key.model,
                handle.key.device,
                handle.key.engine,
            ) == (key.volumeId, key.imageMTime, key.geometry, key.model, key.device, key.engine)
            if not sameSource or axis == key.axis:
                self.close(axis)
        handle = SessionHandle(key=key, intensity=intensity, numSlices=volumeShape(volumeNode)[2 - key.axis])
        self.handles[key.axis] = handle
        return handle

    def replace(self, handle: SessionHandle, intensity: str) -> SessionHandle:
        """Re-window: a new handle for the same key with ``intensity`` and the old one's prompts."""
        fresh = SessionHandle(key=handle.key, intensity=intensity, numSlices=handle.numSlices)
        fresh.objectIds = dict(handle.objectIds)
        fresh.log = {k: list(v) for k, v in handle.log.items()}
        self.close(handle.axis)
        self.handles[handle.axis] = fresh
        return fresh

    def close(self, axis: int) -> None:
        handle = self.handles.pop(axis, None)
        if handle is None:
            return
        handle.closed = True  # a job still creating it closes it when it is done
        if handle.sessionId is not None:
            engine, sessionId = self.engine, handle.sessionId
            self.inBackground(lambda: engine.close_session(sessionId))

    def closeAll(self) -> None:
        for axis in list(self.handles):
            self.close(axis)

    def inBackground(self, call: Callable[[], None]) -> None:
        """Run a short engine call (close, remove an object) on its own daemon thread."""

        def run() -> None:
            try:
                call()
            except Exception:  # noqa: BLE001 - a server that is gone must not stop the panel
                import logging

                logging.getLogger(__name__).warning("MedSAM2: background engine call failed", exc_info=True)

        thread = threading.Thread(target=run, name="MedSAM2 close", daemon=True)
        self._closers = [t for t in self._closers if t.is_alive()] + [thread]
        thread.start()

    def waitForBackground(self, timeout: float = 30.0) -> None:
        """Tests and module shutdown: wait for the background calls to finish."""
        for thread in list(self._closers):
            thread.join(timeout)
