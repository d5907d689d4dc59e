"""Prompts simulated from a ground-truth mask: which slices, and the box or clicks on a slice.

Shared by the evaluation (:mod:`medsam2.evaluation.protocols` documents the protocols built from these)
and by fine-tuning (:mod:`medsam2.finetune.sampler`), so training and evaluation prompt alike.
Slices are in array orientation (rows and columns as numpy cuts them); randomness comes only from
the generator passed in (:func:`case_rng` for the evaluation), so results do not depend on the order,
process or GPU that computes them.
"""

from __future__ import annotations

import zlib
from typing import Iterable

import numpy as np
from scipy import ndimage

from medsam2.errors import InvalidPromptError

SLICE_CHOICES = ("middle", "largest", "random")
# A negative click far from the object says nothing: they are drawn within the box enlarged by this.
NEGATIVE_MARGIN_PX = 10


def case_rng(seed: int, case_id: str, label_name: str) -> np.random.Generator:
    """The generator for one (case, label): independent of evaluation order and of the process."""
    return np.random.default_rng([int(seed), zlib.crc32(case_id.encode()), zlib.crc32(label_name.encode())])


def cut(volume: np.ndarray, array_axis: int, index: int) -> np.ndarray:
    return np.take(volume, index, axis=array_axis)


def slice_areas(mask: np.ndarray, array_axis: int) -> np.ndarray:
    other = tuple(a for a in range(mask.ndim) if a != array_axis)
    return np.count_nonzero(mask, axis=other)


def choose_slices(
    mask: np.ndarray, array_axis: int, choice: str, count: int, rng: np.random.Generator
) -> list[int]:
    """Slices to prompt (sorted); see the module notes. Fewer than ``count`` when the object is thinner."""
    areas = slice_areas(mask, array_axis)
    present = np.flatnonzero(areas)
    if len(present) == 0:
        raise InvalidPromptError("the object is absent from the ground truth; nothing to prompt")
    count = min(count, len(present))
    if choice == "largest":
        order = np.lexsort((np.arange(len(areas)), -areas))  # largest first, then lower slice
        return sorted(int(s) for s in order[:count])
    if choice == "random":
        return sorted(int(s) for s in rng.choice(present, size=count, replace=False))
    if choice != "middle":
        raise InvalidPromptError(f"slice choice must be one of {', '.join(SLICE_CHOICES)}, got {choice!r}")
    lo, hi = int(present[0]), int(present[-1])
    chosen: list[int] = []
    for m in range(count):
        target = lo + (hi - lo) * (m + 1) / (count + 1)
        free = np.array([s for s in present if s not in chosen])
        # Nearest object slice to the target; ties go to the lower slice (argmin's first hit).
        chosen.append(int(free[np.argmin(np.abs(free - target))]))
    return sorted(chosen)


def interior_pixel(region: np.ndarray, exclude: Iterable[tuple[int, int]] = ()) -> tuple[int, int]:
    """The pixel of a 2D region farthest from its edge (first in raster order among equals), avoiding
    the ``exclude`` pixels while the region has others."""
    padded = np.pad(region != 0, 1)  # the slice's edge counts as the region's edge
    dist = ndimage.distance_transform_edt(padded)[1:-1, 1:-1]
    for row, col in exclude:
        if dist[row, col] > 0 and np.count_nonzero(dist > 0) > 1:
            dist[row, col] = 0
    best = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(best[0]), int(best[1])


def bounding_box(mask2d: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask2d.any(axis=1))
    cols = np.flatnonzero(mask2d.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])


def widen(lo: int, hi: int, size: int) -> tuple[int, int]:
    if hi > lo:
        return lo, hi
    if size < 2:
        raise InvalidPromptError("a box needs a slice at least two pixels wide")
    return (lo, lo + 1) if lo + 1 < size else (lo - 1, lo)


def box_prompt(mask2d: np.ndarray, jitter: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    r0, c0, r1, c1 = bounding_box(mask2d)
    if jitter:
        r0, c0, r1, c1 = (
            int(v) + int(d) for v, d in zip((r0, c0, r1, c1), rng.integers(-jitter, jitter + 1, 4))
        )
    rows, cols = mask2d.shape
    r0, r1 = sorted((int(np.clip(r0, 0, rows - 1)), int(np.clip(r1, 0, rows - 1))))
    c0, c1 = sorted((int(np.clip(c0, 0, cols - 1)), int(np.clip(c1, 0, cols - 1))))
    r0, r1 = widen(r0, r1, rows)
    c0, c1 = widen(c0, c1, cols)
    return r0, c0, r1, c1


def click_prompt(
    mask2d: np.ndarray, positive: int, negative: int, rng: np.random.Generator
) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
    obj = mask2d != 0
    first = interior_pixel(obj)
    points = [first]
    others = np.argwhere(obj)
    others = others[~((others[:, 0] == first[0]) & (others[:, 1] == first[1]))]
    take = min(positive - 1, len(others))
    if take > 0:
        points += [(int(r), int(c)) for r, c in others[rng.choice(len(others), size=take, replace=False)]]
    labels = [1] * len(points)
    if negative:
        r0, c0, r1, c1 = bounding_box(obj)
        near = np.zeros_like(obj)
        near[
            max(r0 - NEGATIVE_MARGIN_PX, 0) : r1 + NEGATIVE_MARGIN_PX + 1,
            max(c0 - NEGATIVE_MARGIN_PX, 0) : c1 + NEGATIVE_MARGIN_PX + 1,
        ] = True
        candidates = np.argwhere(near & ~obj)
        if len(candidates) == 0:
            candidates = np.argwhere(~obj)
        take = min(negative, len(candidates))
        if take > 0:
            points += [
                (int(r), int(c)) for r, c in candidates[rng.choice(len(candidates), size=take, replace=False)]
            ]
            labels += [0] * take
    return tuple(points), tuple(labels)


