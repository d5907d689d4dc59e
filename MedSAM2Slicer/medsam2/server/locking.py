"""One model, many sessions: forward passes through a shared predictor are taken in turn.

Why serialise instead of letting sessions run the model concurrently:
- Correctness: the predictor's *state* is per session (each session's inference-state dict), but the
  torch modules are shared, and SAM2 caches a few things on the modules during a forward pass (the
  memory attention's RoPE frequencies, the sine position-encoding cache). Two threads filling those
  at once is a race nobody has tested; taking turns removes it.
- Memory: activations of one forward pass at a time keep the device's peak predictable, which is
  what the per-session memory budget assumes (it counts volumes and feature caches, not activations).
- Speed: nothing is lost. One SAM2 forward already fills a GPU (kernels from two threads on the
  same device queue up on it anyway), and on a CPU it already uses every core; two at once only
  oversubscribe the cores and thrash their caches.

The turn is one predictor call (one slice of one object while propagating, one prompt, one batch
of encoded slices), not a whole propagation, so a click in one session waits for at most one slice
of another session's propagation. The lock is first-come first-served: Python's own Lock lets the
thread that just released it take it straight back, which would starve a waiting click behind a
long propagation.
"""

from __future__ import annotations

import functools
import threading
from typing import Any


class FairLock:
    """A FIFO (ticket) mutex."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._next_ticket = 0
        self._serving = 0

    def acquire(self) -> None:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            while ticket != self._serving:
                self._cond.wait()

    def release(self) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()

    def __enter__(self) -> FairLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def waiting(self) -> int:
        """Callers holding or queued for the lock."""
        with self._cond:
            return self._next_ticket - self._serving


# Bookkeeping that reads the session's own dict and never touches the modules: not worth a turn.
_UNLOCKED = frozenset({"_obj_id_to_idx", "_obj_idx_to_id", "_get_obj_num", "init_volume_state"})


class SerialisedPredictor:
    """Wraps a shared :class:`EngineVideoPredictor` for one session: every method call takes ``lock``.

    Calls the predictor makes on itself (e.g. encoding a missing slice inside a tracking step) are
    inside the caller's turn already. Attributes (``device``, ``image_size``) pass through.
    """

    def __init__(self, predictor: Any, lock: FairLock) -> None:
        self._predictor = predictor
        self._lock = lock

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._predictor, name)
        if name in _UNLOCKED or not callable(value) or not hasattr(value, "__self__"):
            return value
        lock = self._lock

        @functools.wraps(value)
        def in_turn(*args: Any, **kwargs: Any) -> Any:
            with lock:
                return value(*args, **kwargs)

        return in_turn
