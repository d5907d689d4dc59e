"""How a session propagates: the passes through the slices (full or local), tracking each object on
each slice with sam2's own code (predictor.track_slice / track_slices), stopping where the object
ends, and writing the slices into the result. A mixin of :class:`medsam2.session.SegmentationSession`,
which holds the state these methods read (declared below for the type checker).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from medsam2.api import (
    DIRECTIONS,
    MODES,
    CancelCheck,
    ProgressCallback,
    PropagationResult,
    cancel_check,
)
from medsam2.devices import autocast
from medsam2.errors import InvalidPromptError, PropagationCancelled
from medsam2.geometry import SliceLayout
from medsam2.host_memory import release_free_host_memory
from medsam2.predictor import EngineVideoPredictor
from medsam2.propagation_plan import (
    LOCAL_AGREEING_SLICES,
    LOCAL_IOU,
    FrameSink,
    ObjectPass,
    RunBook,
    changed_slices,
    mask_iou,
    outward_passes,
)


@dataclass


class Propagation:
    """Propagation methods of a segmentation session (see the module docstring)."""

    predictor: EngineVideoPredictor
    device: torch.device
    shape: tuple[int, int, int]
    layout: SliceLayout
    num_slices: int
    encode_batch_size: int
    batch_objects: bool
    copy_chunk: int
    _state: dict[str, Any]
    _masks: dict[int, np.ndarray]
    _probabilities: dict[int, np.ndarray]
    _model_lock: threading.RLock
    _prompt_revisions: dict[int, dict[int, int]]
    _run_revisions: dict[int, dict[int, int]]
    _covered: dict[int, tuple[int, int]]
    _runs: int

    @property
    def object_ids(self) -> list[int]:
        return list(self._state["obj_ids"])

    def _object_index(self, object_id: int) -> int:
        """sam2's index of an object (the session checks the id first)."""
        return self.predictor.object_index(self._state, int(object_id))

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
        largest_component: bool = False,
        mode: Optional[str] = None,
    ) -> PropagationResult:
        """Propagate each object through the volume from its prompted slices.

        ``direction``: ``both`` runs forward from the object's first prompted slice to the end, then
        backward from that slice to the start; ``forward`` runs from the first prompted slice to the
        end, ``backward`` from the last prompted slice to the start. Either way every prompted slice
        in the run's range is visited, and a prompted slice always keeps its own result.

        ``slice_range`` (inclusive) limits the run; results outside it are kept from earlier runs, so a
        correction can re-propagate only the part of the volume it concerns. ``stop_when_absent=k`` ends
        a direction after k consecutive slices where SAM2's object score says the object is absent: the
        slices after that are cleared up to the object's next prompted slice in that direction, where
        tracking resumes. Raises PropagationCancelled (leaving the previous result in place) when
        ``cancel`` fires; it is checked before every slice. ``largest_component`` keeps only each
        object's largest 3D connected component (MedSAM2's post-processing), removing islands only
        inside the slices this run covered.

        ``mode``: ``full`` re-runs every selected object through the range; ``local`` (the default
        after the session's first run, with ``direction="both"`` and no ``slice_range``) re-runs only
        objects whose prompts changed, from each changed slice outward until the masks agree with
        the previous run's (see :mod:`medsam2.propagation_plan`). An object never propagated before
        is always run in full. ``result.recomputed`` lists the slices each object's run recomputed.
        """
        lo, hi, selected = self.check_run(direction, slice_range, stop_when_absent, object_ids, mode)
        is_cancelled = cancel_check(cancel)
        if mode is None:
            mode = "local" if self._runs > 0 else "full"
        local = mode == "local" and direction == "both" and slice_range is None

        predictor, state = self.predictor, self._state
        with torch.inference_mode(), autocast(self.device):
            try:
                with self._model_lock:
                    predictor.propagate_in_video_preflight(state)
            except RuntimeError as exc:  # an object whose prompts were all cleared: sam2's own message
                raise InvalidPromptError(f"{exc}; or remove that object") from None
            prompted: dict[int, set[int]] = {}
            for o in selected:
                cond = [f for f in predictor.prompted_slices(state, o) if lo <= f <= hi]
                if not cond:
                    raise InvalidPromptError(f"object {o} has no prompt between slices {lo} and {hi}")
                prompted[o] = set(cond)

            # Which objects run, and how: in full (never run before, or mode full) or locally from
            # their changed slices; unchanged objects keep their previous result in local mode.
            full_objs: list[int] = []
            local_changes: dict[int, list[int]] = {}
            for o in selected:
                if not local or o not in self._masks or o not in self._run_revisions:
                    full_objs.append(o)
                    continue
                changed = changed_slices(self._prompt_revisions.get(o, {}), self._run_revisions[o])
                if changed:
                    local_changes[o] = changed

            # Each pass: (reverse, frames in visiting order, {object: where it joins}, local).
            passes: list[tuple[bool, list[int], dict[int, int], bool]] = []
            if full_objs:
                start_forward = {o: min(prompted[o]) for o in full_objs}
                start_backward = {
                    o: min(prompted[o]) if direction == "both" else max(prompted[o]) for o in full_objs
                }
                if direction in ("both", "forward"):
                    first = min(start_forward.values())
                    passes.append((False, list(range(first, hi + 1)), start_forward, False))
                if direction in ("both", "backward"):
                    first = max(start_backward.values())
                    passes.append((True, list(range(first, lo - 1, -1)), start_backward, False))
            for o, changed in local_changes.items():
                for reverse, begin in outward_passes(changed, prompted[o]):
                    if 0 <= begin < self.num_slices:
                        frames = list(range(begin, lo - 1, -1)) if reverse else list(range(begin, hi + 1))
                        passes.append((reverse, frames, {o: begin}, True))

            ran = full_objs + list(local_changes)
            book = RunBook(
                masks={o: self._masks.get(o, np.zeros(self.shape, np.uint8)).copy() for o in ran},
                probs={o: self._probabilities.get(o, np.zeros(self.shape, np.float32)).copy() for o in ran}
                if probabilities
                else None,
                scores={o: np.full(self.num_slices, np.nan, dtype=np.float32) for o in selected},
                recomputed={o: set() for o in selected},
                tracked={o: set() for o in selected},
                stopped={o: [] for o in selected},
                total=sum(len(frames) for _, frames, _, _ in passes),
            )
            try:
                for reverse, frames, begins, is_local in passes:
                    self._run_pass(
                        reverse, frames, begins, is_local, prompted, stop_when_absent, book, is_cancelled, progress
                    )
            finally:
                state["prefetch_plan"] = None
                release_free_host_memory()  # the run's transient tensors (see host_memory)
        if progress and book.done < book.total:
            progress(book.total, book.total)  # local passes that stopped early skip their remaining slices

        covered: dict[int, tuple[int, int]] = {}
        for o in selected:
            spans = [] if o in full_objs or o not in self._covered else [self._covered[o]]
            if book.tracked[o]:
                spans.append((min(book.tracked[o]), max(book.tracked[o])))
            first = min(prompted[o])
            covered[o] = (min(a for a, _ in spans), max(b for _, b in spans)) if spans else (first, first)
        if largest_component:
            for o in ran:
                if book.tracked[o]:
                    span = (min(book.tracked[o]), max(book.tracked[o]))
                    _keep_largest_component(book.masks[o], self.layout, span)
        self._masks.update(book.masks)
        if book.probs is not None:
            self._probabilities.update(book.probs)
        for o in ran:
            self._run_revisions[o] = dict(self._prompt_revisions.get(o, {}))
            self._covered[o] = covered[o]
        self._runs += 1
        return PropagationResult(
            masks={o: self._masks[o] for o in selected},
            probabilities={o: self._probabilities[o] for o in selected if o in self._probabilities}
            if probabilities
            else None,
            propagated=covered,
            object_scores=book.scores,
            stopped_early={o: d for o, d in book.stopped.items() if d},
            recomputed={o: sorted(book.recomputed[o]) for o in selected},
        )

    def _run_pass(
        self,
        reverse: bool,
        frames: list[int],
        begins: dict[int, int],
        is_local: bool,
        prompted: dict[int, set[int]],
        stop_when_absent: Optional[int],
        book: RunBook,
        is_cancelled: Callable[[], bool],
        progress: Optional[ProgressCallback],
    ) -> None:
        """One direction of a run for the objects in ``begins``."""
        state = self._state
        order = {f: n for n, f in enumerate(frames)}
        state["prefetch_plan"] = lambda f: frames[order[f] : order[f] + self.encode_batch_size] if f in order else [f]
        objs = {o: ObjectPass(begin=b, local=is_local) for o, b in begins.items()}
        # Reading a score or comparing with the previous run needs the slice on the host now.
        sync_each = stop_when_absent is not None or is_local
        sink = FrameSink(
            write=lambda o, f, logits: self._write_frame(o, f, logits, book.masks, book.probs),
            scores=book.scores,
            chunk=1 if sync_each else self.copy_chunk,
        )
        way = "backward" if reverse else "forward"
        for f in frames:
            if all(p.stopped for p in objs.values()):
                break
            if is_cancelled():
                raise PropagationCancelled("propagation cancelled; the previous result is unchanged")
            to_track: list[int] = []
            for o, p in objs.items():
                if not p.joined:
                    if (f > p.begin) if reverse else (f < p.begin):
                        continue
                    p.joined = True
                if p.stopped:
                    continue
                if p.local and f != p.begin and f in prompted[o]:
                    p.stopped, p.stop_reason = True, "prompt"  # the next prompted slice keeps its result
                    continue
                if f in prompted[o]:  # the user's own slice: tracking resumes here
                    p.ended, p.absent_run = False, 0
                if p.ended:
                    self._clear_frame(o, f, book.masks, book.probs)
                    book.recomputed[o].add(f)
                    self._after_slice(o, f, p, book, stop_when_absent, way, None)
                    continue
                to_track.append(o)
            # The lock is taken per slice, so another session's clicks or background encoding on
            # the same model wait at most one slice.
            with self._model_lock:
                tracked = [(group, *self._track_many(group, f, reverse)) for group in self._track_groups(to_track, f)]
            for group, logits, group_scores in tracked:
                for n, o in enumerate(group):
                    sink.add(o, f, logits[n], group_scores[n])
                    book.recomputed[o].add(f)
                    book.tracked[o].add(f)
            if sync_each:
                sink.flush()
                for o in to_track:
                    self._after_slice(o, f, objs[o], book, stop_when_absent, way, float(book.scores[o][f]))
            book.done += 1
            if progress:
                progress(book.done, book.total)
        sink.flush()

    def _after_slice(
        self,
        object_id: int,
        frame: int,
        p: ObjectPass,
        book: RunBook,
        stop_when_absent: Optional[int],
        way: str,
        score: Optional[float],
    ) -> None:
        """Absence counting (stop_when_absent) and, in a local pass, agreement with the previous run."""
        if score is not None and stop_when_absent is not None:
            present = bool(score > 0) and bool(self.layout.frame(book.masks[object_id], frame).any())
            p.absent_run = 0 if present else p.absent_run + 1
            if p.absent_run >= stop_when_absent:
                p.ended = True
                if way not in book.stopped[object_id]:
                    book.stopped[object_id].append(way)
        if p.local and frame != p.begin:
            previous = self.layout.frame(self._masks[object_id], frame)
            agree = mask_iou(self.layout.frame(book.masks[object_id], frame), previous) >= LOCAL_IOU
            p.agreeing_run = p.agreeing_run + 1 if agree else 0
            if p.agreeing_run >= LOCAL_AGREEING_SLICES:
                p.stopped, p.stop_reason = True, "agrees"

    def _track_groups(self, object_ids: list[int], frame: int) -> list[list[int]]:
        """Objects tracked together on ``frame``: a prompted slice's output is returned as is (one
        object each); the others are grouped by memory layout when batching is on."""
        groups: dict[object, list[int]] = {}
        for o in object_ids:
            prompted_here = frame in self._state["output_dict_per_obj"][self._object_index(o)]["cond_frame_outputs"]
            key: object = ("own", o) if prompted_here or not self.batch_objects else self.predictor.batch_key(
                self._state, o, frame
            )
            groups.setdefault(key, []).append(o)
        return list(groups.values())

    def _track_many(self, object_ids: list[int], frame: int, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits (N, H, W) and score logits (N,) of the objects on one slice, still on the device."""
        if len(object_ids) == 1:
            logits, score = self._track(object_ids[0], frame, reverse)
            return logits[None], torch.as_tensor(score).reshape(1)
        return self.predictor.track_slices(self._state, object_ids, frame, reverse)

    def _check_range(self, slice_range: Optional[tuple[int, int]]) -> tuple[int, int]:
        if slice_range is None:
            return 0, self.num_slices - 1
        try:
            lo, hi = (int(v) for v in slice_range)
        except (TypeError, ValueError):
            raise InvalidPromptError(f"slice range must be two slice indices, got {slice_range!r}") from None
        if not (0 <= lo <= hi < self.num_slices):
            raise InvalidPromptError(f"slice range {lo}:{hi} is outside 0:{self.num_slices - 1} or reversed")
        return lo, hi

    def check_run(
        self,
        direction: str = "both",
        slice_range: Optional[tuple[int, int]] = None,
        stop_when_absent: Optional[int] = None,
        object_ids: Optional[Sequence[int]] = None,
        mode: Optional[str] = None,
    ) -> tuple[int, int, list[int]]:
        """What propagate checks before its first slice, each a one-line InvalidPromptError: the
        options, the slice range and the objects. Returns the range and the selected objects (the
        server calls it to answer a 400 before it starts a run)."""
        if direction not in DIRECTIONS:
            raise InvalidPromptError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
        if mode is not None and mode not in MODES:
            raise InvalidPromptError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if stop_when_absent is not None and stop_when_absent < 1:
            raise InvalidPromptError(f"stop_when_absent must be at least 1 slice, got {stop_when_absent}")
        lo, hi = self._check_range(slice_range)
        if not self.object_ids:
            raise InvalidPromptError("no prompts: add points, a box or a mask on a slice first")
        selected = [int(o) for o in (object_ids if object_ids is not None else self.object_ids)]
        for o in selected:
            if o not in self._state["obj_id_to_idx"]:
                raise InvalidPromptError(f"unknown object id {o}")
        return lo, hi, selected

    def _track(self, object_id: int, frame: int, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One object on one slice, exactly as SAM2VideoPredictor.propagate_in_video does it (logits
        and score stay on the device)."""
        return self.predictor.track_slice_tensors(self._state, object_id, frame, reverse)

    def _write_frame(
        self,
        object_id: int,
        frame: int,
        logits: torch.Tensor,
        masks: dict[int, np.ndarray],
        probs: Optional[dict[int, np.ndarray]],
    ) -> None:
        self.layout.frame(masks[object_id], frame)[...] = (logits > 0).to(torch.uint8).cpu().numpy()
        if probs is not None:
            self.layout.frame(probs[object_id], frame)[...] = torch.sigmoid(logits.float()).cpu().numpy()

    def _clear_frame(
        self, object_id: int, frame: int, masks: dict[int, np.ndarray], probs: Optional[dict[int, np.ndarray]]
    ) -> None:
        """A slice past the object's end: empty, and no stale memory from an earlier run left behind."""
        self.layout.frame(masks[object_id], frame)[...] = 0
        if probs is not None:
            self.layout.frame(probs[object_id], frame)[...] = 0
        self.predictor.forget_tracked_slice(self._state, object_id, frame)


def _keep_largest_component(mask: np.ndarray, layout: SliceLayout, covered: tuple[int, int]) -> None:
    """Clear, in place, voxels outside the largest 6-connected component, within slices ``covered``."""
    from scipy import ndimage

    labels, count = ndimage.label(mask > 0)
    if count <= 1:
        return
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    islands = (labels != int(np.argmax(sizes))) & (labels > 0)
    inside = np.zeros(mask.shape, bool)
    window = [slice(None)] * 3
    window[layout.array_axis] = slice(covered[0], covered[1] + 1)
    inside[tuple(window)] = True
    mask[islands & inside] = 0
