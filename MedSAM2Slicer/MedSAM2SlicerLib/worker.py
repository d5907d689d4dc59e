"""Background work for the panel: model loading, encoding and propagation run on one worker thread,
while MRML is only touched on the main thread.

The worker thread never calls back into Qt or MRML: it posts events to a queue, and the main thread
drains that queue (from a QTimer in the widget, or directly in tests). All state changes happen in
:meth:`BackgroundWorker.drain` or :meth:`BackgroundWorker.cancel`, both on the main thread, so the
panel's state needs no lock. No ``processEvents`` loop is ever needed.

States::

    IDLE -> PREPARING -> PROPAGATING -> DONE
                 \\            \\-> FAILED
                  \\-> CANCELLING -> CANCELLED (or FAILED)
    DONE / CANCELLED / FAILED -> PREPARING (next run) or IDLE (reset)

A result that arrives after the user pressed Cancel is discarded (state CANCELLED): Cancel promises
that the segment stays as it was.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)


class WorkerState(str, enum.Enum):
    IDLE = "idle"
    PREPARING = "preparing"
    PROPAGATING = "propagating"
    CANCELLING = "cancelling"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"


ACTIVE_STATES = frozenset({WorkerState.PREPARING, WorkerState.PROPAGATING, WorkerState.CANCELLING})
_TERMINAL = frozenset({WorkerState.DONE, WorkerState.CANCELLED, WorkerState.FAILED})
_ALLOWED: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.IDLE: frozenset({WorkerState.PREPARING}),
    WorkerState.PREPARING: frozenset(
        {WorkerState.PROPAGATING, WorkerState.CANCELLING, WorkerState.DONE, WorkerState.FAILED}
    ),
    WorkerState.PROPAGATING: frozenset({WorkerState.CANCELLING, WorkerState.DONE, WorkerState.FAILED}),
    WorkerState.CANCELLING: frozenset({WorkerState.CANCELLED, WorkerState.FAILED}),
    WorkerState.DONE: frozenset({WorkerState.PREPARING, WorkerState.IDLE}),
    WorkerState.CANCELLED: frozenset({WorkerState.PREPARING, WorkerState.IDLE}),
    WorkerState.FAILED: frozenset({WorkerState.PREPARING, WorkerState.IDLE}),
}


class WorkerStateError(RuntimeError):
    """A transition the state machine forbids (a programming error in the caller)."""


class JobCancelled(Exception):
    """Raised by a job (via :meth:`JobContext.raise_if_cancelled`) that stops because of Cancel."""


class JobContext:
    """What a job running on the worker thread may use: phase, progress and the cancel flag."""

    def __init__(self, events: queue.Queue, cancel_event: threading.Event) -> None:
        self._events = events
        self.cancel_event = cancel_event

    def phase(self, state: WorkerState) -> None:
        if state not in (WorkerState.PREPARING, WorkerState.PROPAGATING):
            raise ValueError(f"a job can only report the preparing or propagating phase, not {state.value}")
        self._events.put(("phase", state))

    def progress(self, done: int, total: int) -> None:
        self._events.put(("progress", int(done), int(total)))

    def message(self, text: str) -> None:
        self._events.put(("message", str(text)))

    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def raise_if_cancelled(self) -> None:
        if self.cancel_event.is_set():
            raise JobCancelled("cancelled")


Job = Callable[[JobContext], Any]


def _engine_errors() -> tuple[type[BaseException], ...]:
    """(PropagationCancelled, MedSAM2Error) when the engine is importable; empty before installation."""
    try:
        from medsam2.errors import MedSAM2Error, PropagationCancelled
    except ImportError:
        return ()
    return (PropagationCancelled, MedSAM2Error)


def _is_cancellation(exc: BaseException) -> bool:
    engine = _engine_errors()
    return isinstance(exc, JobCancelled) or (bool(engine) and isinstance(exc, engine[0]))


def _user_message(exc: BaseException) -> str:
    """One line for the panel: the engine's own errors are written for users; anything else is a bug,
    so its type is kept and the traceback goes to the log."""
    first_line = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, _engine_errors()):
        return first_line
    if isinstance(exc, MemoryError):
        return "out of memory; close other sessions, crop the volume or use a smaller model"
    return f"unexpected error ({type(exc).__name__}): {first_line}" if first_line else type(exc).__name__


class BackgroundWorker:
    """Runs one job at a time on a daemon thread; callbacks are invoked from :meth:`drain` only."""

    def __init__(
        self,
        on_state: Optional[Callable[[WorkerState], None]] = None,
        on_progress: Optional[Callable[[int, int], None]] = None,
        on_result: Optional[Callable[[Any], None]] = None,
        on_failure: Optional[Callable[[str], None]] = None,
        on_message: Optional[Callable[[str], None]] = None,
    ) -> None:
        self.on_state = on_state
        self.on_progress = on_progress
        self.on_result = on_result
        self.on_failure = on_failure
        self.on_message = on_message
        self.state = WorkerState.IDLE
        self.progress: tuple[int, int] = (0, 0)
        self.error: Optional[str] = None
        self.result: Any = None
        self._events: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def busy(self) -> bool:
        return self.state in ACTIVE_STATES

    def _set_state(self, new: WorkerState) -> None:
        if new == self.state:
            return
        if new not in _ALLOWED[self.state]:
            raise WorkerStateError(f"worker cannot go from {self.state.value} to {new.value}")
        self.state = new
        if self.on_state:
            self.on_state(new)

    def start(self, job: Job) -> None:
        if self.busy:
            raise WorkerStateError(f"a run is already {self.state.value}; cancel it or wait")
        # Fresh queue and cancel flag per job: a late event of an earlier job can never leak in.
        self._events = queue.Queue()
        self._cancel = threading.Event()
        self.progress, self.error, self.result = (0, 0), None, None
        self._set_state(WorkerState.PREPARING)
        context = JobContext(self._events, self._cancel)
        self._thread = threading.Thread(target=self._run, args=(job, context), name="MedSAM2 worker", daemon=True)
        self._thread.start()

    def _run(self, job: Job, context: JobContext) -> None:
        events = context._events
        try:
            result = job(context)
        except BaseException as exc:  # noqa: B036  (everything must reach the main thread as an event)
            if _is_cancellation(exc):
                events.put(("cancelled",))
            else:
                logger.error("MedSAM2 run failed", exc_info=exc)
                events.put(("failed", _user_message(exc)))
        else:
            events.put(("done", result))

    def cancel(self) -> bool:
        """Ask the running job to stop; returns False when nothing is running."""
        if not self.busy:
            return False
        self._cancel.set()
        self._set_state(WorkerState.CANCELLING)
        return True

    def drain(self) -> bool:
        """Deliver queued events on the calling (main) thread; returns True while a job is still running."""
        last_progress: Optional[tuple[int, int]] = None
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            kind = event[0]
            if kind == "progress":
                last_progress = (event[1], event[2])
            elif kind == "message":
                if self.on_message:
                    self.on_message(event[1])
            elif kind == "phase":
                if self.state != WorkerState.CANCELLING:
                    self._set_state(event[1])
            else:
                if last_progress is not None:
                    self._report_progress(last_progress)
                    last_progress = None
                self._finish(event)
        if last_progress is not None and self.busy:
            self._report_progress(last_progress)
        return self.busy

    def _report_progress(self, value: tuple[int, int]) -> None:
        self.progress = value
        if self.on_progress:
            self.on_progress(*value)

    def _finish(self, event: tuple) -> None:
        kind = event[0]
        if kind == "done" and self.state != WorkerState.CANCELLING:
            self.result = event[1]
            self._set_state(WorkerState.DONE)
            if self.on_result:
                self.on_result(event[1])
        elif kind == "failed":
            self.error = event[1]
            self._set_state(WorkerState.FAILED)
            if self.on_failure:
                self.on_failure(event[1])
        else:  # cancelled, or a result that arrived after Cancel: discarded
            if self.state != WorkerState.CANCELLING:
                self._set_state(WorkerState.CANCELLING)
            self._set_state(WorkerState.CANCELLED)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the worker thread ends (tests and module shutdown); True if it has ended."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def reset(self) -> None:
        if self.busy:
            raise WorkerStateError(f"cannot reset while {self.state.value}")
        if self.state != WorkerState.IDLE:
            self._set_state(WorkerState.IDLE)
