"""A segmentation session: one volume, prompts on any slice for any object, propagation through it.

Typical use (coordinates are continuous voxel indices (i, j, k); geometry.VolumeGeometry converts
from RAS/LPS millimetres)::

    session = SegmentationSession(predictor, volume, geometry, axis="axial",
                                  intensity=IntensityPreparation.window_preset("abdomen"))
    session.add_points(1, [[120, 200, 40]], [1])          # a positive click on slice k=40
    result = session.propagate()                          # both ways through the volume
    liver = result.masks[1]                               # uint8 [k, j, i], same shape as volume
    session.add_points(1, [[130, 210, 55]], [0])          # correction on slice 55
    result = session.propagate()                          # no slice is encoded again
"""

from __future__ import annotations

import itertools
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
import torch

from medsam2.api import (
    CornerIJK,
    PointLabels,
    PointsIJK,
    ProgressCallback,
    SlicePreview,
)
from medsam2.background import BackgroundEncoding, outward_order
from medsam2.devices import autocast, available_memory_bytes, cached_feature_dtype, enable_fast_math
from medsam2.errors import InvalidPromptError, MemoryBudgetError
from medsam2.features import CacheStats, SliceFeatureCache
from medsam2.geometry import SliceLayout, VolumeGeometry
from medsam2.host_memory import release_free_host_memory
from medsam2.intensity import IMAGENET_MEAN, IMAGENET_STD, IntensityPreparation, parse_intensity
from medsam2.predictor import EngineVideoPredictor
from medsam2.preparation import SlicePreparer
from medsam2.propagation import Propagation
from medsam2.volume import as_3d, device_bytes, frames_to_device

if TYPE_CHECKING:
    from medsam2.api import Session


@dataclass
class _SlicePrompts:
    points: list[tuple[float, float]] = field(default_factory=list)  # frame pixels (x=col, y=row)
    labels: list[int] = field(default_factory=list)  # 1 positive, 0 negative
    box: Optional[tuple[float, float, float, float]] = None  # frame pixels x0, y0, x1, y1


# Kept beside the predictors rather than on them, so a predictor can still be deep-copied.
_LOCKS: weakref.WeakKeyDictionary[object, threading.RLock] = weakref.WeakKeyDictionary()
_LOCK_CREATION = threading.Lock()


def model_lock(predictor: object) -> threading.RLock:
    """The one re-entrant lock of a predictor, shared by every session that uses it."""
    with _LOCK_CREATION:
        lock = _LOCKS.get(predictor)
        if lock is None:
            lock = _LOCKS[predictor] = threading.RLock()
        return lock


class SegmentationSession(Propagation):
    def __init__(
        self,
        predictor: EngineVideoPredictor,
        volume: np.ndarray,
        geometry: Optional[VolumeGeometry] = None,
        *,
        axis: Union[int, str] = "axial",
        intensity: Union[IntensityPreparation, str, None] = None,
        memory_budget_bytes: Optional[int] = None,
        encode_batch_size: Optional[int] = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        batch_objects: Optional[bool] = None,
    ) -> None:
        self.predictor = predictor
        self.device = torch.device(predictor.device)
        self.volume = as_3d(volume)
        self.shape: tuple[int, int, int] = tuple(self.volume.shape)
        self.geometry = geometry or VolumeGeometry()
        voxel_axis = self.geometry.voxel_axis_for_view(axis) if isinstance(axis, str) else int(axis)
        self.layout = SliceLayout.for_axis(voxel_axis, self.geometry)
        self.num_slices = self.layout.num_slices(self.shape)
        self.frame_shape = self.layout.frame_shape(self.shape)
        if isinstance(intensity, str):
            intensity = parse_intensity(intensity)
        self.intensity = intensity or IntensityPreparation()

        if memory_budget_bytes is None:
            # Half of what is free now: the rest is for the model, activations and the caller.
            memory_budget_bytes = available_memory_bytes(self.device) // 2
        volume_bytes = device_bytes(self.volume)
        if volume_bytes > memory_budget_bytes:
            raise MemoryBudgetError(
                f"volume {self.shape} needs {volume_bytes / 2**30:.2f} GiB on {self.device}, over the memory "
                f"budget of {memory_budget_bytes / 2**30:.2f} GiB; crop the volume or raise the budget"
            )
        self.memory_budget_bytes = memory_budget_bytes
        self.feature_cache = SliceFeatureCache(budget_bytes=memory_budget_bytes - volume_bytes)
        # Batched encoding pays on GPUs (fewer kernel launches, fuller tensor cores); on a CPU the
        # encoder already saturates every core with one slice, and a batch only delays the first mask.
        self.encode_batch_size = encode_batch_size or (8 if self.device.type == "cuda" else 1)

        frames = frames_to_device(self.volume, self.layout, self.device)
        self._prepare = SlicePreparer(frames, self.intensity, predictor.image_size, mean, std)
        self._state = predictor.init_volume_state(
            self._prepare_batch,
            num_frames=self.num_slices,
            frame_height=self.frame_shape[0],
            frame_width=self.frame_shape[1],
            feature_cache=self.feature_cache,
        )
        self._state["feature_dtype"] = cached_feature_dtype(self.device)
        enable_fast_math(self.device)
        self._prompts: dict[int, dict[int, _SlicePrompts]] = {}
        self._masks: dict[int, np.ndarray] = {}
        self._probabilities: dict[int, np.ndarray] = {}
        # sam2's modules are not thread-safe: every model call (prompts, a propagation's slice,
        # a batch of background encoding) holds the predictor's lock, shared by all sessions on it.
        self._model_lock = model_lock(predictor)
        self._background: Optional[BackgroundEncoding] = None
        # Objects tracked with the same memory layout can go through sam2 as one batch. Default on
        # CUDA only: a batch changes floating-point summation order, which on a CPU flips a few
        # voxels in a thousand (Testing/Python/test_engine_speed_paths.py) and would break the
        # CPU's exact parity with the reference; on CUDA bf16 already rounds differently.
        self.batch_objects = self.device.type == "cuda" if batch_objects is None else batch_objects
        # Mask logits are copied to the host in chunks of this many slices: on a GPU a copy per
        # slice would stall the device queue each time; on a CPU there is nothing to wait for.
        self.copy_chunk = 16 if self.device.type == "cuda" else 1
        # What changed since each object's last run, for local corrections: a revision number per
        # prompted slice, and the revisions the last completed run saw.
        self._revision = itertools.count(1)
        self._prompt_revisions: dict[int, dict[int, int]] = {}
        self._run_revisions: dict[int, dict[int, int]] = {}
        self._covered: dict[int, tuple[int, int]] = {}
        self._runs = 0

    # ------------------------------------------------------------------ prompts
    @property
    def cache_stats(self) -> CacheStats:
        return self.feature_cache.stats

    def _prepare_batch(self, indices: list[int]) -> torch.Tensor:
        return self._prepare(indices)

    def _to_frame(self, points_ijk: PointsIJK, what: str) -> tuple[int, np.ndarray]:
        pts = np.asarray(points_ijk, dtype=float)
        if pts.ndim == 1:
            pts = pts[None]
        if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) == 0:
            raise InvalidPromptError(f"{what} must be a non-empty list of (i, j, k) voxel coordinates")
        if not np.all(np.isfinite(pts)):
            raise InvalidPromptError(f"{what} has a non-finite coordinate")
        extent = np.array(self.shape[::-1], dtype=float)  # (i, j, k) sizes
        outside = np.any((pts < -0.5) | (pts > extent - 0.5), axis=1)
        if outside.any():
            p = pts[np.argmax(outside)]
            raise InvalidPromptError(
                f"{what} at voxel ({p[0]:.1f}, {p[1]:.1f}, {p[2]:.1f}) is outside the volume "
                f"(i, j, k sizes {self.shape[2]}, {self.shape[1]}, {self.shape[0]})"
            )
        slice_coord, xy = self.layout.ijk_to_frame(pts, self.shape)
        slices = np.unique(np.clip(np.round(slice_coord), 0, self.num_slices - 1).astype(int))
        if len(slices) != 1:
            raise InvalidPromptError(
                f"{what} lie on different slices ({', '.join(map(str, slices))}); give each slice's prompts separately"
            )
        return int(slices[0]), xy

    def _object_index(self, object_id: int) -> int:
        if not isinstance(object_id, (int, np.integer)) or isinstance(object_id, bool):
            raise InvalidPromptError(f"object id must be an integer, got {object_id!r}")
        return self.predictor.object_index(self._state, int(object_id))

    def add_points(
        self,
        object_id: int,
        points_ijk: PointsIJK,
        labels: PointLabels,
        *,
        replace: bool = False,
    ) -> SlicePreview:
        """Positive (label 1) and negative (label 0) clicks on one slice; added to that slice's earlier
        clicks for the object unless ``replace``."""
        slice_index, xy = self._to_frame(points_ijk, "points")
        labels_arr = np.asarray(labels).reshape(-1)
        if len(labels_arr) != len(xy):
            raise InvalidPromptError(f"{len(xy)} points but {len(labels_arr)} labels")
        if not np.isin(labels_arr, (0, 1)).all():
            raise InvalidPromptError("point labels must be 1 (positive) or 0 (negative)")
        earlier = self._prompts.get(int(object_id), {}).get(slice_index)
        prompts = _SlicePrompts() if replace or earlier is None else earlier
        merged = _SlicePrompts(
            points=prompts.points + [tuple(p) for p in xy.tolist()],
            labels=prompts.labels + [int(v) for v in labels_arr],
            box=prompts.box,
        )
        if merged.box is None and 1 not in merged.labels and not self._was_tracked(object_id, slice_index):
            # Negative clicks alone correct an existing mask; on a fresh slice they select nothing.
            raise InvalidPromptError(
                f"slice {slice_index} of object {object_id} has only negative points and no mask to correct; "
                "add a positive point or a box"
            )
        self._prompts.setdefault(int(object_id), {})[slice_index] = merged
        return self._submit_points(object_id, slice_index, merged)

    def add_box(
        self,
        object_id: int,
        corner_a_ijk: CornerIJK,
        corner_b_ijk: CornerIJK,
        points_ijk: Optional[PointsIJK] = None,
        labels: Optional[PointLabels] = None,
    ) -> SlicePreview:
        """A box given by two opposite corners on one slice (inclusive voxel indices); replaces that
        slice's earlier prompts for the object. Optional clicks refine it."""
        corners = np.stack([np.asarray(corner_a_ijk, dtype=float), np.asarray(corner_b_ijk, dtype=float)])
        slice_index, xy = self._to_frame(corners, "box corners")
        (x0, x1), (y0, y1) = sorted(xy[:, 0]), sorted(xy[:, 1])
        if x1 - x0 < 1e-6 or y1 - y0 < 1e-6:
            raise InvalidPromptError(f"box on slice {slice_index} has zero area ({x1 - x0:g} x {y1 - y0:g} voxels)")
        prompts = _SlicePrompts(box=(float(x0), float(y0), float(x1), float(y1)))
        if points_ijk is not None:
            point_slice, pxy = self._to_frame(points_ijk, "points")
            if point_slice != slice_index:
                raise InvalidPromptError(f"box is on slice {slice_index} but its points are on slice {point_slice}")
            lab = np.asarray(labels if labels is not None else [1] * len(pxy)).reshape(-1)
            if len(lab) != len(pxy) or not np.isin(lab, (0, 1)).all():
                raise InvalidPromptError("box points need one label (1 or 0) per point")
            prompts.points = [tuple(p) for p in pxy.tolist()]
            prompts.labels = [int(v) for v in lab]
        self._prompts.setdefault(int(object_id), {})[slice_index] = prompts
        return self._submit_points(object_id, slice_index, prompts)

    def add_mask(self, object_id: int, slice_index: int, mask: np.ndarray) -> SlicePreview:
        """A hand-drawn mask on one slice, as cut from the [k, j, i] array along the session's axis."""
        if not 0 <= int(slice_index) < self.num_slices:
            raise InvalidPromptError(f"mask slice {slice_index} is outside the volume (0..{self.num_slices - 1})")
        slice_index = int(slice_index)
        expected = self.layout.from_frame(np.empty(self.frame_shape, bool)).shape
        mask = np.asarray(mask)
        if mask.shape != expected:
            raise InvalidPromptError(f"mask for slice {slice_index} has shape {mask.shape}, expected {expected}")
        if not mask.any():
            raise InvalidPromptError(f"mask for slice {slice_index} of object {object_id} is empty")
        frame_mask = self.layout.to_frame(mask)
        obj_idx = self._object_index(object_id)
        self._prompts.setdefault(int(object_id), {}).pop(slice_index, None)
        self._touch(object_id, slice_index)
        with self._model_lock, torch.inference_mode(), autocast(self.device):
            _, _, video_res = self.predictor.add_new_mask(
                self._state, slice_index, int(object_id), torch.from_numpy(np.ascontiguousarray(frame_mask != 0))
            )
        return self._preview(object_id, obj_idx, slice_index, video_res)

    def add_mask_volume(self, object_id: int, mask: np.ndarray) -> list[int]:
        """Every slice (along the session axis) with labelled voxels in ``mask`` becomes a mask prompt."""
        mask = np.asarray(mask)
        if mask.shape != self.shape:
            raise InvalidPromptError(f"mask volume has shape {mask.shape}, expected {self.shape}")
        other_axes = tuple(a for a in range(3) if a != self.layout.array_axis)
        slices = np.flatnonzero(mask.any(axis=other_axes))
        if len(slices) == 0:
            raise InvalidPromptError(f"mask volume for object {object_id} is empty")
        for s in slices:
            self.add_mask(object_id, int(s), self._cut(mask, int(s)))
        return [int(s) for s in slices]

    def _cut(self, volume: np.ndarray, slice_index: int) -> np.ndarray:
        """A slice in array orientation (what add_mask and previews use)."""
        return self.layout.from_frame(self.layout.frame(volume, slice_index))

    def clear_slice(self, object_id: int, slice_index: int) -> None:
        """Remove an object's prompts on one slice (its propagated mask stays until the next run)."""
        if int(object_id) not in self._state["obj_id_to_idx"]:
            raise InvalidPromptError(f"unknown object id {object_id}")
        self._prompts.get(int(object_id), {}).pop(int(slice_index), None)
        self._touch(object_id, slice_index)
        with self._model_lock:
            self.predictor.clear_all_prompts_in_frame(
                self._state, int(slice_index), int(object_id), need_output=False
            )

    def remove_object(self, object_id: int) -> None:
        if int(object_id) not in self._state["obj_id_to_idx"]:
            raise InvalidPromptError(f"unknown object id {object_id}")
        with self._model_lock:
            self.predictor.remove_object(self._state, int(object_id), need_output=False)
        self._prompts.pop(int(object_id), None)
        self._masks.pop(int(object_id), None)
        self._probabilities.pop(int(object_id), None)
        for book in (self._prompt_revisions, self._run_revisions, self._covered):
            book.pop(int(object_id), None)

    def reset(self) -> None:
        """Forget all prompts and results; cached slice features are kept."""
        with self._model_lock:
            self.predictor.reset_state(self._state)
        self._prompts.clear()
        self._masks.clear()
        self._probabilities.clear()
        for book in (self._prompt_revisions, self._run_revisions, self._covered):
            book.clear()
        self._runs = 0

    def close(self) -> None:
        """Release the cached slice features now (device memory) rather than when the session is
        garbage-collected; the session can still be used, re-encoding slices as needed."""
        self.stop_background_encoding()
        with self._model_lock:
            self.feature_cache.clear()
        release_free_host_memory()

    def _was_tracked(self, object_id: int, slice_index: int) -> bool:
        return self.predictor.was_tracked(self._state, int(object_id), slice_index)

    def _touch(self, object_id: int, slice_index: int) -> None:
        self._prompt_revisions.setdefault(int(object_id), {})[int(slice_index)] = next(self._revision)

    def _submit_points(self, object_id: int, slice_index: int, prompts: _SlicePrompts) -> SlicePreview:
        obj_idx = self._object_index(object_id)
        points = np.asarray(prompts.points, dtype=np.float32).reshape(-1, 2)
        labels = np.asarray(prompts.labels, dtype=np.int32)
        self._touch(object_id, slice_index)
        with self._model_lock, torch.inference_mode(), autocast(self.device):
            # The slice's whole prompt set is sent each time (box first, as SAM2 requires).
            _, _, video_res = self.predictor.add_new_points_or_box(
                self._state,
                slice_index,
                int(object_id),
                points=torch.from_numpy(points) if len(points) else None,
                labels=torch.from_numpy(labels) if len(points) else None,
                box=torch.tensor(prompts.box, dtype=torch.float32) if prompts.box is not None else None,
                clear_old_points=True,
            )
        return self._preview(object_id, obj_idx, slice_index, video_res)

    def _preview(self, object_id: int, obj_idx: int, slice_index: int, video_res: torch.Tensor) -> SlicePreview:
        frame_mask = (video_res[obj_idx, 0] > 0).to(torch.uint8).cpu().numpy()
        mask = self.layout.from_frame(frame_mask)
        return SlicePreview(int(object_id), slice_index, np.ascontiguousarray(mask))

    # ------------------------------------------------------------------ propagation
    def mask(self, object_id: int) -> np.ndarray:
        if int(object_id) not in self._masks:
            raise InvalidPromptError(f"object {object_id} has not been propagated")
        return self._masks[int(object_id)]

    def precompute_features(
        self, progress: Optional[ProgressCallback] = None, from_slice: Optional[int] = None
    ) -> None:
        """Encode every slice now, in slice order or outward from ``from_slice`` (see the Session
        protocol); ``progress(done, total)`` counts the slices that were still to encode."""
        if from_slice is not None and not 0 <= int(from_slice) < self.num_slices:
            raise InvalidPromptError(f"slice {from_slice} is outside the volume (0..{self.num_slices - 1})")
        order = range(self.num_slices) if from_slice is None else outward_order(int(from_slice), self.num_slices)
        todo = [i for i in order if i not in self.feature_cache]
        for start in range(0, len(todo), self.encode_batch_size):
            self._encode_batch(todo[start : start + self.encode_batch_size])
            if progress:
                progress(min(start + self.encode_batch_size, len(todo)), len(todo))
        release_free_host_memory()

    def _encode_batch(self, indices: list[int]) -> bool:
        """Encode the slices of ``indices`` not cached yet, under the model lock; False when the
        feature budget is full (they were encoded but not all could be kept)."""
        with self._model_lock, torch.inference_mode(), autocast(self.device):
            todo = [i for i in indices if i not in self.feature_cache]
            if not todo:
                return True
            before = self.feature_cache.stats.not_admitted
            self.predictor.encode_frames(self._state, todo)
            return self.feature_cache.stats.not_admitted == before

    def start_background_encoding(
        self, from_slice: Optional[int] = None, progress: Optional[ProgressCallback] = None
    ) -> BackgroundEncoding:
        """Encode slices in a background thread, outward from ``from_slice`` (default: the middle),
        until all are cached, the feature budget is full, or it is cancelled. Prompts, previews and
        propagation may run meanwhile: they wait at most one batch, and encode a slice they need
        themselves. Starting again cancels the previous run. ``progress(done, total)`` is called
        from the thread."""
        self.stop_background_encoding()
        start = self.num_slices // 2 if from_slice is None else int(from_slice)
        if not 0 <= start < self.num_slices:
            raise InvalidPromptError(f"slice {start} is outside the volume (0..{self.num_slices - 1})")
        self._background = BackgroundEncoding(
            outward_order(start, self.num_slices),
            pending=lambda i: i not in self.feature_cache,
            encode_batch=self._encode_batch,
            batch_size=self.encode_batch_size,
            progress=progress,
        )
        return self._background

    def stop_background_encoding(self) -> None:
        """Cancel the background encoding, if any, and wait for its batch in progress."""
        if self._background is not None:
            self._background.cancel(wait=True)
            self._background = None


if TYPE_CHECKING:

    def _conforms(session: SegmentationSession) -> Session:
        return session  # mypy: SegmentationSession implements the Session protocol
