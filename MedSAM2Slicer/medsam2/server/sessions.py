"""The server's sessions: one :class:`SegmentationSession` per uploaded volume, within shared limits.

- At most ``max_sessions`` at once, each expiring after ``idle_seconds`` without a request.
- A device-memory budget shared by all sessions. A session reserves what it will hold on the device:
  its volume plus a slice-feature cache large enough for all its slices (capped per session and by
  the whole budget); the engine session gets exactly that as its ``memory_budget_bytes``, so its
  cache can never outgrow the reservation. A volume that does not fit now is a 503 with a hint of
  when an idle session will expire; one that could never fit is a 413.
- Propagation runs in a worker thread per session so the event loop keeps answering (status polls,
  per-slice masks, other sessions). Every failure is caught in that thread and reported in the
  run's status; it never reaches another session or the server.
- The engine session is not thread-safe, so one operation at a time runs on it: a prompt while a
  propagation is running is a 409, not a corrupted inference state.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar, Union, cast

import numpy as np
import torch

from medsam2.devices import autocast, available_memory_bytes
from medsam2.errors import (
    MedSAM2Error,
    MemoryBudgetError,
    ModelError,
    PropagationCancelled,
    SessionBusyError,
)
from medsam2.geometry import SliceLayout, VolumeGeometry
from medsam2.intensity import IntensityPreparation
from medsam2.predictor import EngineVideoPredictor
from medsam2.server.live import LiveSession, Run, RunBody, describe_failure, is_out_of_memory
from medsam2.server.locking import FairLock, SerialisedPredictor
from medsam2.server.placement import DevicePlacement
from medsam2.server.settings import ServerSettings
from medsam2.server.users import User
from medsam2.volume import as_3d, device_bytes

log = logging.getLogger("medsam2.server")

PredictorFactory = Callable[[str], EngineVideoPredictor]
DevicePredictorFactory = Callable[[str, torch.device], EngineVideoPredictor]  # with --devices
T = TypeVar("T")
GiB = float(1 << 30)
PROMPT_WAIT_SECONDS = 30.0  # a prompt waits this long for another request on the same session
RETRY_WHEN_ALL_BUSY = 30  # Retry-After when every session is propagating (no expiry in sight)
_EXPIRED_MEMORY = 4096  # ids remembered so a late client hears "expired", not "unknown"
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # token_urlsafe ids; anything else is not echoed back


# ----------------------------------------------------------------------------- errors
class ServerError(MedSAM2Error):
    """A request the server refuses; app.py maps each subclass to an HTTP status."""


class BadRequestError(ServerError):
    pass


class SessionNotFoundError(ServerError):
    pass


class RequestTooLargeError(ServerError):
    pass


class UserLimitError(ServerError):
    """The user has as many sessions open as their entry in the users file allows (429)."""


class ServerOutOfMemoryError(ServerError):
    """The device ran out of memory during a request (503); the request changed nothing."""

    retry_after = RETRY_WHEN_ALL_BUSY


class ServerFullError(ServerError):
    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# ----------------------------------------------------------------------------- estimates
def measure_slice_feature_bytes(predictor: EngineVideoPredictor) -> int:
    """What one slice's entry in the feature cache takes, measured by encoding a blank slice under the
    device's autocast: the dtype (float32, or bf16 on CUDA) and the model's levels are then exactly
    what the cache will hold, with no guess to go stale (4 * image_size**2 values for SAM2 tiny)."""
    device = torch.device(predictor.device)
    size = int(predictor.image_size)
    with torch.inference_mode(), autocast(device):
        levels = predictor.forward_image(torch.zeros(1, 3, size, size, device=device))["backbone_fpn"]
    return int(sum(t.numel() * t.element_size() for t in levels))


@dataclass
class LoadedModel:
    predictor: EngineVideoPredictor
    lock: FairLock  # one forward pass at a time (locking.py says why)
    slice_feature_bytes: int


def count_slices(shape: tuple[int, ...], geometry: Optional[VolumeGeometry], axis: Union[int, str]) -> int:
    """Slices along the session axis, chosen exactly as SegmentationSession chooses it."""
    geom = geometry or VolumeGeometry()
    if isinstance(axis, str):
        voxel_axis = geom.voxel_axis_for_view(axis)
        if shape[0] == 1 and geometry is None:
            voxel_axis = 2
    else:
        voxel_axis = int(axis)
    return SliceLayout.for_axis(voxel_axis, geom).num_slices(cast(tuple[int, int, int], shape))


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


class ManagedSession:
    def __init__(
        self,
        session_id: str,
        model: str,
        session: LiveSession,
        reserved_bytes: int,
        clock: Callable[[], float],
        owner: str = "",
    ) -> None:
        self.id = session_id
        self.owner = owner  # the user who created it; only they (and an admin, to end it) see it
        self.model = model
        self.session = session
        self.reserved_bytes = reserved_bytes
        self.clock = clock
        self.created = self.last_used = clock()
        self.closed = False
        self.released = False
        self.slot = 0  # which of the server's devices holds it (placement.py)
        self.run: Optional[Run] = None
        self._op_lock = threading.Lock()  # the engine session is not thread-safe

    @property
    def running(self) -> bool:
        return self.run is not None and self.run.active

    @property
    def busy(self) -> bool:
        return self.running or self._op_lock.locked()

    def _busy_message(self) -> str:
        if self.running:
            return (
                f"session {self.id} is running a {self.run.kind if self.run else 'propagation'}; "
                "wait for it (GET .../propagate/status) or cancel it (POST .../cancel) first"
            )
        return f"session {self.id} is busy with another request; retry"

    def operate(self, fn: Callable[[LiveSession], T]) -> T:
        """Run a short operation (a prompt, a reset) on the engine session, one at a time."""
        if self.running:
            raise SessionBusyError(self._busy_message())
        if not self._op_lock.acquire(timeout=PROMPT_WAIT_SECONDS):
            raise SessionBusyError(self._busy_message())
        try:
            if self.closed:
                raise SessionNotFoundError(f"session {self.id} was closed")
            try:
                return fn(self.session)
            except MedSAM2Error:
                raise
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                # LiveSession rolled the session back; answered as a client-visible 503, not a crash.
                raise ServerOutOfMemoryError(
                    "out of memory on the server; the request changed nothing; retry when other sessions "
                    "have finished"
                ) from None
        finally:
            self.last_used = self.clock()
            self._op_lock.release()

    def start_run(self, kind: str, body: RunBody, on_exit: Callable[[ManagedSession], None]) -> Run:
        if not self._op_lock.acquire(blocking=False):
            raise SessionBusyError(self._busy_message())
        run = Run(run_id=secrets.token_hex(8), kind=kind)
        thread = threading.Thread(
            target=self._execute, args=(run, body, on_exit), name=f"medsam2-{kind}-{self.id[:8]}", daemon=True
        )
        run.thread = thread
        self.run = run
        try:
            thread.start()
        except BaseException:
            run.state, run.error_type, run.error = (
                "failed",
                "InternalError",
                f"could not start the {kind} thread",
            )
            self._op_lock.release()
            raise
        return run

    def _execute(self, run: Run, body: RunBody, on_exit: Callable[[ManagedSession], None]) -> None:
        # The op lock was taken by start_run on the request's thread and is released here.
        try:
            run.result = body(self.session, run)
            run.state = "done"
        except PropagationCancelled as exc:
            run.state, run.error_type, run.error = "cancelled", "PropagationCancelled", str(exc)
        except BaseException as exc:  # noqa: B036 (a worker must never die silently)
            run.error_type, run.error = describe_failure(exc, run.kind)
            run.state = "failed"
            if run.error_type == "InternalError":
                log.exception("session %s: %s failed", self.id, run.kind)
            else:
                log.warning("session %s: %s failed: %s", self.id, run.kind, run.error)
        finally:
            self.last_used = self.clock()
            self._op_lock.release()
            on_exit(self)

    def cancel(self) -> Optional[Run]:
        if self.run is not None and self.run.active:
            self.run.cancel.set()
        return self.run


# ----------------------------------------------------------------------------- manager
class SessionManager:
    def __init__(
        self,
        settings: ServerSettings,
        predictor_factory: PredictorFactory,
        *,
        clock: Callable[[], float] = time.monotonic,
        placement: Optional[DevicePlacement] = None,
        device_factory: Optional[DevicePredictorFactory] = None,
    ) -> None:
        self.settings = settings
        self._factory = predictor_factory
        # Several devices (serve --devices): a model copy and a memory budget per device.
        if placement is not None and device_factory is None:
            raise ValueError("a device placement needs a device_factory")
        self._placement = placement
        self._device_factory = device_factory
        self._models_on: dict[tuple[str, int], LoadedModel] = {}
        self.clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, ManagedSession] = {}
        self._expired: OrderedDict[str, None] = OrderedDict()
        self._reserved = 0
        self._building = 0  # sessions admitted whose engine session is still being built
        self._building_by: dict[str, int] = {}  # the same, per owner
        self._budget: Optional[int] = settings.memory_budget_bytes
        self._models: dict[str, LoadedModel] = {}
        self._load_lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper: Optional[threading.Thread] = None

    # ---- models
    def resolve_model(self, name: Optional[str]) -> str:
        models = self.settings.models
        if not name:
            return models[0] if models else "default"
        if models and name not in models:
            raise ModelError(f"model {name!r} is not served here; this server serves: {', '.join(models)}")
        return name

    def predictor(self, name: str, slot: int = 0) -> LoadedModel:
        """The shared predictor for a model (on the device of ``slot`` with several devices),
        loaded on first use."""
        with self._load_lock:
            if self._placement is not None:
                key = (name, slot)
                if key not in self._models_on:
                    assert self._device_factory is not None
                    predictor = self._device_factory(name, self._placement.devices[slot])
                    self._models_on[key] = LoadedModel(
                        predictor, FairLock(), measure_slice_feature_bytes(predictor)
                    )
                return self._models_on[key]
            if name not in self._models:
                predictor = self._factory(name)
                self._models[name] = LoadedModel(
                    predictor, FairLock(), measure_slice_feature_bytes(predictor)
                )
                if self._budget is None:
                    # Half of what is free once the model is loaded; the rest is for activations.
                    self._budget = available_memory_bytes(torch.device(predictor.device)) // 2
                    log.info("memory budget for sessions: %s", _gib(self._budget))
            return self._models[name]

    @property
    def budget_bytes(self) -> Optional[int]:
        if self._placement is not None:
            return self._placement.total_budget
        return self._budget

    @property
    def placement(self) -> Optional[DevicePlacement]:
        return self._placement

    @property
    def reserved_bytes(self) -> int:
        return self._reserved

    # ---- lifecycle
    def check_capacity(self, user: Optional[User] = None) -> None:
        """Cheap early refusal (before the upload is decoded) when every session slot is taken."""
        with self._lock:
            self._expire_idle_locked()
            self._check_count_locked(user)

    def create(
        self,
        volume: np.ndarray,
        geometry: Optional[VolumeGeometry],
        axis: Union[int, str],
        intensity: Optional[IntensityPreparation],
        model: Optional[str],
        user: Optional[User] = None,
    ) -> ManagedSession:
        volume = as_3d(volume)
        name = self.resolve_model(model)
        loaded = self.predictor(name)
        device = torch.device(loaded.predictor.device)
        volume_bytes = device_bytes(volume)
        cache_bytes = count_slices(volume.shape, geometry, axis) * loaded.slice_feature_bytes
        if self.settings.cache_bytes_per_session is not None:
            cache_bytes = min(cache_bytes, self.settings.cache_bytes_per_session)
        placement = self._placement
        budget = cast(int, self._budget) if placement is None else placement.largest_budget
        if volume_bytes > budget:
            raise MemoryBudgetError(
                f"volume {tuple(volume.shape)} needs {_gib(volume_bytes)} on {device}, more than this "
                f"server's whole memory budget of {_gib(budget)}; crop or downsample it"
            )
        need = volume_bytes + min(cache_bytes, budget - volume_bytes)
        owner = user.name if user is not None else ""
        with self._lock:
            self._expire_idle_locked()
            self._check_count_locked(user)
            chosen = 0 if placement is None else placement.choose(need)
            if chosen is None or (placement is None and need > budget - self._reserved):
                free = budget - self._reserved if placement is None else max(
                    placement.room(s) for s in range(len(placement.devices))
                )
                raise ServerFullError(
                    f"server memory budget is full: this volume needs {_gib(need)} (volume and slice-feature "
                    f"cache), {_gib(max(free, 0))} of {_gib(budget)} is free; retry later or close a session",
                    self._retry_after_locked(),
                )
            slot = chosen
            if placement is not None:
                placement.reserve(slot, need)
            self._reserved += need
            self._building += 1
            self._building_by[owner] = self._building_by.get(owner, 0) + 1
        try:
            if placement is not None:
                loaded = self.predictor(name, slot)
            engine = LiveSession(
                cast(EngineVideoPredictor, SerialisedPredictor(loaded.predictor, loaded.lock)),
                volume,
                geometry,
                axis=axis,
                intensity=intensity,
                memory_budget_bytes=need,
            )
        except BaseException:
            with self._lock:
                self._reserved -= need
                self._building -= 1
                self._building_by[owner] -= 1
                if placement is not None:
                    placement.release(slot, need)
            raise
        managed = ManagedSession(secrets.token_urlsafe(16), name, engine, need, self.clock, owner)
        managed.slot = slot
        with self._lock:
            self._building -= 1
            self._building_by[owner] -= 1
            self._sessions[managed.id] = managed
        log.info(
            "session %s of %s: model %s, volume %s %s, reserved %s",
            managed.id,
            owner or "-",
            name,
            tuple(volume.shape),
            volume.dtype,
            _gib(need),
        )
        return managed

    def get(self, session_id: str, user: Optional[User] = None) -> ManagedSession:
        """The session, for its owner (``user`` None: no ownership check, for the server itself).
        Another user's session is "does not exist", exactly as an unknown id: nothing is revealed."""
        with self._lock:
            now = self.clock()
            managed = self._sessions.get(session_id)
            if managed is not None and user is not None and managed.owner != user.name:
                raise SessionNotFoundError(self._gone_message(session_id, known=False))
            if managed is not None and self._is_idle(managed, now):
                self._expire_locked(managed)
                managed = None
            if managed is None:
                raise SessionNotFoundError(self._gone_message(session_id))
            managed.last_used = now
            return managed

    def sessions_of(self, user: Optional[User]) -> list[ManagedSession]:
        """The user's own sessions; every session for an admin (or for ``None``, the server itself)."""
        with self._lock:
            self._expire_idle_locked()
            every = sorted(self._sessions.values(), key=lambda m: m.created)
        if user is None or user.admin:
            return every
        return [m for m in every if m.owner == user.name]

    def close(self, session_id: str, user: Optional[User] = None) -> None:
        """End a session: its owner or an admin may."""
        with self._lock:
            managed = self._sessions.get(session_id)
            if managed is not None and user is not None and not user.admin and managed.owner != user.name:
                raise SessionNotFoundError(self._gone_message(session_id, known=False))
            managed = self._sessions.pop(session_id, None)
            if managed is None:
                raise SessionNotFoundError(self._gone_message(session_id))
            managed.closed = True
            if managed.running:
                managed.cancel()  # its worker releases the reservation when it stops (on_run_exit)
            else:
                self._release_locked(managed)
        log.info("session %s closed", session_id)

    def start_run(self, managed: ManagedSession, kind: str, body: RunBody) -> Run:
        return managed.start_run(kind, body, self._on_run_exit)

    def _on_run_exit(self, managed: ManagedSession) -> None:
        with self._lock:
            if managed.closed:
                self._release_locked(managed)

    def expire_idle(self) -> list[str]:
        with self._lock:
            return self._expire_idle_locked()

    def count(self) -> int:
        with self._lock:
            return len(self._sessions)

    def start_reaper(self) -> None:
        if self._reaper is not None:
            return
        self._stop.clear()
        interval = max(0.05, min(30.0, self.settings.idle_seconds / 4))

        def reap() -> None:
            while not self._stop.wait(interval):
                for sid in self.expire_idle():
                    log.info("session %s expired after %.0f s idle", sid, self.settings.idle_seconds)

        self._reaper = threading.Thread(target=reap, name="medsam2-session-reaper", daemon=True)
        self._reaper.start()

    def shutdown(self, wait_seconds: float = 10.0) -> None:
        """Stop the reaper, cancel every run and wait (bounded) for the workers to stop."""
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(timeout=wait_seconds)
            self._reaper = None
        with self._lock:
            sessions = list(self._sessions.values())
        for managed in sessions:
            managed.cancel()
        deadline = time.monotonic() + wait_seconds
        for managed in sessions:
            thread = managed.run.thread if managed.run is not None else None
            if thread is not None:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            for managed in sessions:
                if self._sessions.pop(managed.id, None) is not None:
                    managed.closed = True
                    if not managed.running:
                        self._release_locked(managed)

    # ---- internals (call with self._lock held)
    def _check_count_locked(self, user: Optional[User] = None) -> None:
        if user is not None and user.max_sessions is not None:
            mine = sum(1 for m in self._sessions.values() if m.owner == user.name)
            mine += self._building_by.get(user.name, 0)
            if mine >= user.max_sessions:
                raise UserLimitError(
                    f"user {user.name} has {mine} of {user.max_sessions} sessions allowed open; close one "
                    "you no longer need (DELETE /sessions/ID) first"
                )
        in_use = len(self._sessions) + self._building
        if in_use >= self.settings.max_sessions:
            raise ServerFullError(
                f"server is full: {in_use} of {self.settings.max_sessions} sessions in use; retry later or "
                "close a session you no longer need",
                self._retry_after_locked(),
            )

    def _is_idle(self, managed: ManagedSession, now: float) -> bool:
        return not managed.busy and now - managed.last_used > self.settings.idle_seconds

    def _expire_idle_locked(self) -> list[str]:
        now = self.clock()
        expired = [m for m in self._sessions.values() if self._is_idle(m, now)]
        for managed in expired:
            self._expire_locked(managed)
        return [m.id for m in expired]

    def _expire_locked(self, managed: ManagedSession) -> None:
        self._sessions.pop(managed.id, None)
        managed.closed = True
        self._release_locked(managed)
        self._expired[managed.id] = None
        while len(self._expired) > _EXPIRED_MEMORY:
            self._expired.popitem(last=False)

    def _release_locked(self, managed: ManagedSession) -> None:
        if not managed.released:
            managed.released = True
            self._reserved -= managed.reserved_bytes
            if self._placement is not None:
                self._placement.release(managed.slot, managed.reserved_bytes)

    def _retry_after_locked(self) -> int:
        """Seconds until the first idle session expires (a hint for the 503's Retry-After)."""
        now = self.clock()
        waits = [
            m.last_used + self.settings.idle_seconds - now for m in self._sessions.values() if not m.busy
        ]
        if not waits:
            return RETRY_WHEN_ALL_BUSY
        return max(1, math.ceil(min(waits)))

    def _gone_message(self, session_id: str, known: bool = True) -> str:
        if not _SESSION_ID.fullmatch(session_id):
            return "no such session: session ids are what POST /sessions returned"
        if known and session_id in self._expired:
            return (
                f"session {session_id} expired after {self.settings.idle_seconds:g} s without requests "
                "and its memory was freed; create a new session (upload the volume again)"
            )
        return (
            f"session {session_id} does not exist on this server (it was closed, or the server restarted); "
            "create a new session (upload the volume again)"
        )
