"""Encoding a session's slices in a background thread, outward from the slice the user looks at.

Why: the image encoder is most of a first propagation's cost, and a radiologist needs seconds to find
the slice to click on. Encoding while they look means the click finds its slice, and most of the
slices the propagation will visit, already in the feature cache.

sam2's modules are not thread-safe (they keep per-call state and share CUDA streams), so every model
call goes through the session's one lock. The thread takes it for one small batch at a time: a click,
a preview or a propagation waits at most one batch, and a call that needs a slice not yet encoded
encodes it itself instead of waiting for the thread to get there.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

from medsam2.api import ProgressCallback
from medsam2.host_memory import release_free_host_memory


def outward_order(start: int, num_slices: int) -> list[int]:
    """start, start+1, start-1, start+2, start-2, ... within 0..num_slices-1: the propagation
    visits the slices next to the click first, in both directions."""
    start = min(max(int(start), 0), num_slices - 1)
    order = [start]
    for step in range(1, num_slices):
        for s in (start + step, start - step):
            if 0 <= s < num_slices:
                order.append(s)
    return order


class BackgroundEncoding:
    """One background encoding run; ``cancel()`` stops it after the batch in progress.

    ``encode_batch(indices) -> bool`` encodes those slices under the session's lock and returns False
    when the feature budget is full (the thread then stops: encoding past the budget is wasted work).
    ``pending(index)`` says whether a slice still needs encoding (another call may have done it)."""

    def __init__(
        self,
        order: list[int],
        pending: Callable[[int], bool],
        encode_batch: Callable[[list[int]], bool],
        batch_size: int,
        progress: Optional[ProgressCallback] = None,
    ) -> None:
        self._order = order
        self._pending = pending
        self._encode_batch = encode_batch
        self._batch_size = max(1, int(batch_size))
        self._progress = progress
        self._stop = threading.Event()
        self.encoded = 0
        self.budget_full = False
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="medsam2-encode", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        total = len(self._order)
        try:
            position = 0
            while position < total and not self._stop.is_set():
                batch: list[int] = []
                while position < total and len(batch) < self._batch_size:
                    if self._pending(self._order[position]):
                        batch.append(self._order[position])
                    position += 1
                if batch:
                    if not self._encode_batch(batch):
                        self.budget_full = True
                        break
                    self.encoded += len(batch)
                if self._progress is not None:
                    self._progress(position, total)
        except BaseException as exc:  # reported through .error; a background thread must not die silently
            self.error = exc
        finally:
            # This thread's malloc arena holds the encoder's transient tensors (see host_memory).
            release_free_host_memory()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def cancel(self, wait: bool = True) -> None:
        self._stop.set()
        if wait:
            self._thread.join()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the run ends (True) or ``timeout`` seconds pass (False)."""
        self._thread.join(timeout)
        return not self._thread.is_alive()
