"""Pieces of a propagation run that are not sam2's tracking: the run modes, where local corrections
start and stop, and the chunked copy of finished slices to the host.

``full``: every selected object is propagated through the whole range (what the parity test checks
against Meta's predictor). ``local``: only objects whose prompts changed since their last run are
re-run, each from every changed slice outward in both directions, and a direction stops at the next
prompted slice or once the new masks agree with the previous run's (IoU >= ``LOCAL_IOU`` on
``LOCAL_AGREEING_SLICES`` consecutive slices): past that point the correction no longer changes what
the radiologist sees, and the rest of the previous result is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

LOCAL_IOU = 0.98
LOCAL_AGREEING_SLICES = 3


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two binary masks; two empty masks agree fully (1.0)."""
    a, b = a != 0, b != 0
    union = int(np.count_nonzero(a | b))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(a & b)) / union


def changed_slices(now: dict[int, int], last: dict[int, int]) -> list[int]:
    """Slices whose prompt revision differs between now and the last run (added, changed or cleared)."""
    return sorted(s for s in set(now) | set(last) if now.get(s) != last.get(s))


def outward_passes(changed: list[int], prompted: set[int]) -> list[tuple[bool, int]]:
    """(reverse, first slice) of each local pass: forward from every changed slice in ascending order,
    then backward in descending order. A slice whose prompts were cleared is re-tracked once, by
    the forward pass; its backward pass starts on the slice before it."""
    passes = [(False, c) for c in changed]
    passes += [(True, c if c in prompted else c - 1) for c in sorted(changed, reverse=True)]
    return passes


@dataclass
class FrameSink:
    """Finished slices' mask logits, kept on the device and copied to the host ``chunk`` slices at
    a time (one transfer, one synchronisation per chunk instead of per slice)."""

    write: Callable[[int, int, torch.Tensor], None]  # (object id, slice, host logits (H, W))
    scores: dict[int, np.ndarray]  # object-score logit per slice, filled on flush
    chunk: int = 1
    _pending: list[tuple[int, int, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    _frames: set[int] = field(default_factory=set)

    def add(self, object_id: int, frame: int, logits: torch.Tensor, score: torch.Tensor) -> None:
        self._pending.append((object_id, frame, logits, score))
        self._frames.add(frame)
        if len(self._frames) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        logits = torch.stack([p[2].float() for p in self._pending]).cpu()
        scores = torch.stack([p[3].float().reshape(()) for p in self._pending]).cpu().numpy()
        for n, (object_id, frame, _, _) in enumerate(self._pending):
            self.scores[object_id][frame] = scores[n]
            self.write(object_id, frame, logits[n])
        self._pending.clear()
        self._frames.clear()


@dataclass
class ObjectPass:
    """One object's progress through one pass."""

    begin: int
    local: bool
    joined: bool = False
    stopped: bool = False
    ended: bool = False  # stop_when_absent fired: slices are cleared until the next prompted one
    absent_run: int = 0
    agreeing_run: int = 0
    stop_reason: Optional[str] = None


@dataclass
class RunBook:
    """What one propagation run has produced so far (published only when it completes)."""

    masks: dict[int, np.ndarray]
    probs: Optional[dict[int, np.ndarray]]
    scores: dict[int, np.ndarray]
    recomputed: dict[int, set[int]]  # slices written (tracked or cleared)
    tracked: dict[int, set[int]]  # slices tracked by the model (what `propagated` spans)
    stopped: dict[int, list[str]]
    done: int = 0
    total: int = 0
