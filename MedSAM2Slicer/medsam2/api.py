"""The engine's interface, declared once: the Session protocol every session implements (in process,
:class:`medsam2.session.SegmentationSession`; on a server, :class:`medsam2.remote.RemoteSession`),
the prompt and result types, the callback aliases, and the one function that groups an object's
prompts by slice.

Plain numpy and the standard library only (no torch import), so the remote client and the Slicer
panel, which may run without torch, use the same types. mypy checks each implementation against
:class:`Session` (see the ``_conforms`` functions at the end of session.py and remote/client.py).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence, Union

import numpy as np

from medsam2.errors import InvalidPromptError
from medsam2.features import CacheStats
from medsam2.geometry import SliceLayout

# (done, total) after each slice; may be called from a worker thread.
ProgressCallback = Callable[[int, int], None]
# Polled before every slice: a function returning True, or an Event that is set, cancels the run.
CancelCheck = Union[Callable[[], bool], threading.Event]
DIRECTIONS = ("both", "forward", "backward")
# Run modes: "full" re-runs every selected object; "local" only what changed (medsam2.propagation_plan).
MODES = ("full", "local")

PointsIJK = Union[Sequence[Sequence[float]], np.ndarray]
CornerIJK = Union[Sequence[float], np.ndarray]
PointLabels = Union[Sequence[int], np.ndarray]  # 1 positive, 0 negative


@dataclass
class SlicePreview:
    """The model's mask on the prompted slice right after a prompt (before propagation)."""

    object_id: int
    slice_index: int
    mask: np.ndarray  # uint8, the 2D slice as cut from the [k, j, i] array (not display-flipped)


@dataclass
class PropagationResult:
    masks: dict[int, np.ndarray]  # uint8 [k, j, i] per object, the whole volume
    probabilities: Optional[dict[int, np.ndarray]]  # float32 [k, j, i] per object when asked for
    propagated: dict[int, tuple[int, int]]  # first and last slice each object's run covered
    object_scores: dict[int, np.ndarray]  # SAM2 object-score logit per slice (NaN where not visited)
    stopped_early: dict[int, list[str]] = field(default_factory=dict)  # directions ended by absence
    # Slices each object's run recomputed (all it visited in a full run; a local correction's
    # stretch around the changed slices; none for an object left unchanged). Empty when not reported.
    recomputed: dict[int, list[int]] = field(default_factory=dict)


class Session(Protocol):
    """One volume, prompts on any slice for any object, propagation through it.

    Coordinates are continuous voxel indices (i, j, k); slices are cut along ``layout``'s voxel axis;
    masks are uint8 arrays indexed [k, j, i]. Errors are :mod:`medsam2.errors` classes with one line.
    """

    shape: tuple[int, int, int]
    layout: SliceLayout
    num_slices: int

    @property
    def object_ids(self) -> list[int]: ...

    @property
    def cache_stats(self) -> CacheStats: ...

    def add_points(
        self, object_id: int, points_ijk: PointsIJK, labels: PointLabels, *, replace: bool = False
    ) -> SlicePreview:
        """Positive (1) and negative (0) clicks on one slice, added to that slice's earlier clicks
        for the object unless ``replace``."""
        ...

    def add_box(
        self,
        object_id: int,
        corner_a_ijk: CornerIJK,
        corner_b_ijk: CornerIJK,
        points_ijk: Optional[PointsIJK] = None,
        labels: Optional[PointLabels] = None,
    ) -> SlicePreview:
        """A box by two opposite corners on one slice; replaces that slice's prompts for the object."""
        ...

    def add_mask(self, object_id: int, slice_index: int, mask: np.ndarray) -> SlicePreview:
        """A painted mask on one slice, as cut from the [k, j, i] array along the session's axis."""
        ...

    def add_mask_volume(self, object_id: int, mask: np.ndarray) -> list[int]:
        """Every slice with labelled voxels in ``mask`` becomes a mask prompt; returns those slices."""
        ...

    def clear_slice(self, object_id: int, slice_index: int) -> None: ...

    def remove_object(self, object_id: int) -> None: ...

    def reset(self) -> None: ...

    def mask(self, object_id: int) -> np.ndarray:
        """The object's latest propagated mask."""
        ...

    def precompute_features(
        self, progress: Optional[ProgressCallback] = None, from_slice: Optional[int] = None
    ) -> None:
        """Encode every slice now (e.g. while the user is still looking for the first click): in slice
        order, or outward from ``from_slice`` (the slice in view is encoded first, then its
        neighbours, which a click there needs next)."""
        ...

    def propagate(
        self,
        direction: str = "both",
        slice_range: Optional[tuple[int, int]] = None,
        stop_when_absent: Optional[int] = None,
        *,
        object_ids: Optional[Sequence[int]] = None,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelCheck] = None,
        probabilities: bool = False,
        mode: Optional[str] = None,
    ) -> PropagationResult:
        """Propagate each object from its prompted slices; PropagationCancelled leaves the previous
        result in place. ``mode`` is one of MODES; None: ``local`` after the session's first run."""
        ...

    def close(self) -> None:
        """Release the session (its cached features; on a server, its slot). Closing twice is harmless."""
        ...


def cancel_check(cancel: Optional[CancelCheck]) -> Callable[[], bool]:
    """A CancelCheck as a plain function (never cancelled when None)."""
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    return cancel


# ----------------------------------------------------------------------------- prompts by slice
@dataclass
class SlicePrompts:
    """One object's prompts on one slice: an optional box (two opposite corners) and clicks."""

    slice_index: int
    points_ijk: np.ndarray  # (N, 3), may be empty
    labels: np.ndarray  # (N,) 1 positive, 0 negative
    box: Optional[tuple[np.ndarray, np.ndarray]] = None


def slice_of(coordinate: float, num_slices: int) -> int:
    """The slice whose centre is nearest to a continuous index along the slice axis (the session's
    rounding; coordinates within half a voxel outside the volume belong to the edge slice)."""
    return int(np.clip(np.round(coordinate), 0, num_slices - 1))


def group_prompts_by_slice(
    points_ijk: PointsIJK,
    labels: PointLabels,
    boxes: Sequence[tuple[CornerIJK, CornerIJK]],
    *,
    slice_axis: int,
    num_slices: int,
) -> list[SlicePrompts]:
    """Clicks and boxes of one object, grouped by the slice they fall on along voxel axis
    ``slice_axis``: boxes first (SAM 2 takes a slice's box and its clicks together), then the slices
    with clicks only, each in slice order. One box per slice."""
    points = np.asarray(points_ijk, dtype=float).reshape(-1, 3)
    label_arr = np.asarray(labels, dtype=int).reshape(-1)
    if len(points) != len(label_arr):
        raise InvalidPromptError(f"{len(points)} points but {len(label_arr)} labels")
    point_slices = np.array([slice_of(p[slice_axis], num_slices) for p in points], dtype=int)
    groups: list[SlicePrompts] = []
    box_slices: set[int] = set()
    for corner_a, corner_b in boxes:
        a, b = np.asarray(corner_a, dtype=float).reshape(3), np.asarray(corner_b, dtype=float).reshape(3)
        s = slice_of(a[slice_axis], num_slices)
        if s in box_slices:
            raise InvalidPromptError(f"two boxes on slice {s}; one box per slice")
        box_slices.add(s)
        on = point_slices == s
        groups.append(SlicePrompts(s, points[on], label_arr[on], (a, b)))
    for s in sorted(set(point_slices.tolist()) - box_slices):
        on = point_slices == s
        groups.append(SlicePrompts(int(s), points[on], label_arr[on]))
    return groups


def send_prompts(
    session: Session,
    object_id: int,
    points_ijk: PointsIJK,
    labels: PointLabels,
    boxes: Sequence[tuple[CornerIJK, CornerIJK]] = (),
) -> list[SlicePreview]:
    """Send one object's clicks and boxes, one call per prompted slice; each call replaces the
    object's earlier prompts on that slice (slices not mentioned keep theirs)."""
    previews = []
    for group in group_prompts_by_slice(
        points_ijk, labels, boxes, slice_axis=session.layout.voxel_axis, num_slices=session.num_slices
    ):
        has_points = len(group.points_ijk) > 0
        if group.box is not None:
            previews.append(
                session.add_box(
                    object_id,
                    group.box[0],
                    group.box[1],
                    group.points_ijk if has_points else None,
                    group.labels if has_points else None,
                )
            )
        else:
            previews.append(session.add_points(object_id, group.points_ijk, group.labels, replace=True))
    return previews
