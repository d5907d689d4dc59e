"""Prompts simulated from the ground truth, as the seed papers evaluate: seeded and documented.

Slices are cut along the session's array axis (``SegmentationSession.layout.array_axis``) and handled
in array orientation (rows and columns as numpy cuts them; the session does any display flip).

Which slices (``slice_choice``), among the slices where the object is present:
  ``middle``   the slice nearest the middle of the object's extent (first to last labelled slice);
               with ``num_slices = n`` the slices nearest n evenly spaced points of that extent
               (at fractions 1/(n+1), ..., n/(n+1));
  ``largest``  the n slices with the largest object area (ties: the lower slice);
  ``random``   n distinct object slices drawn with the case's random generator.
What prompt (``prompt``) on each of those slices:
  ``mask``     the full ground-truth mask of the slice (seed 002's mask prompt);
  ``box``      its tight bounding box (inclusive pixel indices); ``box_jitter`` moves each side by a
               uniform integer in [-jitter, jitter] pixels, kept inside the slice and at least one
               pixel wide (a one-pixel-thin object's box is widened by one pixel, since SAM2 takes no
               zero-area box);
  ``points``   ``positive_clicks`` clicks inside the object - the first at its interior-most pixel
               (largest distance to the object's edge, as interactive benchmarks place it), the rest
               uniformly at random among the other object pixels - and ``negative_clicks`` uniformly
               at random among background pixels within the object's box enlarged by
               ``NEGATIVE_MARGIN_PX`` (a negative click far from the object says nothing).
Interactive rounds (``rounds``): after each propagation the slice with the most wrong voxels (false
negatives plus false positives; ties: the lower slice) gets one click at the interior-most pixel of
its largest error region (8-connected; missed region -> positive click, leaked region -> negative),
added to that slice's earlier prompts, and the volume is propagated again. An error the model left
unchanged is clicked at its next most central pixel, not twice on the same pixel.

Randomness comes only from :func:`case_rng`, seeded by (seed, case id, label name), so a case gives
the same prompts whatever order, process or GPU evaluates it.

Medical-SAM2's per-slice protocol (``medical_sam2_plan``), reproduced on request: the object's
labelled slices (first to last) are cut to their first quarter; a tight box is given on every second
slice of that range (slices where the object is absent get no prompt here; their code adds an empty
mask, which the engine refuses); the range is propagated forward, and the score is the mean of
per-slice Dice with slices empty in both counting 1. It is optimistic next to volumetric Dice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Optional

import numpy as np
from scipy import ndimage

from medsam2.api import Session
from medsam2.datasets.prompts import (
    SLICE_CHOICES,
    box_prompt,
    choose_slices,
    click_prompt,
    cut,
    interior_pixel,
    slice_areas,
)
from medsam2.errors import InvalidPromptError

PROMPT_KINDS = ("mask", "box", "points")


@dataclass(frozen=True)
class PromptProtocol:
    slice_choice: str = "middle"
    prompt: str = "mask"
    num_slices: int = 1
    box_jitter: int = 0
    positive_clicks: int = 1
    negative_clicks: int = 0
    rounds: int = 0
    seed: int = 0
    per_slice: bool = False  # Medical-SAM2's protocol instead of the above (see the module notes)
    per_slice_every: int = 2
    per_slice_fraction: float = 0.25

    def __post_init__(self) -> None:
        if self.slice_choice not in SLICE_CHOICES:
            raise InvalidPromptError(
                f"slice choice must be one of {', '.join(SLICE_CHOICES)}, got {self.slice_choice!r}"
            )
        if self.prompt not in PROMPT_KINDS:
            raise InvalidPromptError(f"prompt must be one of {', '.join(PROMPT_KINDS)}, got {self.prompt!r}")
        if self.num_slices < 1:
            raise InvalidPromptError(f"number of prompted slices must be at least 1, got {self.num_slices}")
        if self.box_jitter < 0 or self.negative_clicks < 0 or self.rounds < 0:
            raise InvalidPromptError("box jitter, negative clicks and rounds cannot be negative")
        if self.prompt == "points" and self.positive_clicks < 1:
            raise InvalidPromptError("a click prompt needs at least one positive click")
        if self.per_slice_every < 1 or not 0 < self.per_slice_fraction <= 1:
            raise InvalidPromptError("per-slice protocol needs every >= 1 and a fraction in (0, 1]")

    def describe(self) -> str:
        if self.per_slice:
            return (
                f"Medical-SAM2 per-slice protocol: tight box every {self.per_slice_every} slices over "
                f"the first {self.per_slice_fraction:g} of the labelled slices, mean per-slice Dice "
                "(empty slices score 1)"
            )
        what = {
            "mask": "ground-truth mask",
            "box": "bounding box" + (f" (jitter {self.box_jitter} px)" if self.box_jitter else ""),
            "points": f"{self.positive_clicks} positive"
            + (f" + {self.negative_clicks} negative" if self.negative_clicks else "")
            + " click(s)",
        }[self.prompt]
        where = {"middle": "middle", "largest": "largest-area", "random": "random"}[self.slice_choice]
        slices = "slice" if self.num_slices == 1 else f"{self.num_slices} slices"
        text = f"{what} on the {where} {slices} of each object (seed {self.seed})"
        if self.rounds:
            text += f", {self.rounds} corrective click round(s)"
        return text


@dataclass(frozen=True)
class SlicePrompt:
    """One slice's simulated prompt, in array orientation (rows, columns of the numpy cut)."""

    slice_index: int
    kind: str  # "mask" | "box" | "points"
    mask: Optional[np.ndarray] = None
    box: Optional[tuple[int, int, int, int]] = None  # row0, col0, row1, col1 (inclusive)
    points: tuple[tuple[int, int], ...] = ()  # (row, col)
    labels: tuple[int, ...] = ()  # 1 positive, 0 negative

    def describe(self) -> str:
        if self.kind == "mask":
            return f"mask@{self.slice_index}"
        if self.kind == "box":
            assert self.box is not None
            return f"box@{self.slice_index}({self.box[0]},{self.box[1]},{self.box[2]},{self.box[3]})"
        clicks = " ".join(f"{'+' if lab else '-'}({r},{c})" for (r, c), lab in zip(self.points, self.labels))
        return f"points@{self.slice_index}[{clicks}]"


def simulate_prompts(
    gt: np.ndarray, array_axis: int, protocol: PromptProtocol, rng: np.random.Generator
) -> list[SlicePrompt]:
    """The initial prompts for one object (``gt`` boolean ``[k, j, i]``)."""
    prompts = []
    for s in choose_slices(gt, array_axis, protocol.slice_choice, protocol.num_slices, rng):
        mask2d = cut(gt, array_axis, s)
        if protocol.prompt == "mask":
            prompts.append(SlicePrompt(s, "mask", mask=mask2d.astype(np.uint8)))
        elif protocol.prompt == "box":
            prompts.append(SlicePrompt(s, "box", box=box_prompt(mask2d, protocol.box_jitter, rng)))
        else:
            points, labels = click_prompt(mask2d, protocol.positive_clicks, protocol.negative_clicks, rng)
            prompts.append(SlicePrompt(s, "points", points=points, labels=labels))
    return prompts


def correction_click(
    prediction: np.ndarray,
    gt: np.ndarray,
    array_axis: int,
    clicked: Collection[tuple[int, int, int]] = (),
) -> Optional[SlicePrompt]:
    """The next interactive click (see the module notes), or None when the prediction is perfect.

    ``clicked`` holds earlier (slice, row, col) clicks: an error the model did not fix is clicked
    again at its next most central pixel rather than on the very same pixel."""
    pred = prediction != 0
    gt = gt != 0
    errors = slice_areas(pred ^ gt, array_axis)
    if not errors.any():
        return None
    s = int(np.argmax(errors))
    missed = cut(gt, array_axis, s) & ~cut(pred, array_axis, s)
    leaked = cut(pred, array_axis, s) & ~cut(gt, array_axis, s)
    best: Optional[tuple[int, np.ndarray, int]] = None  # (size, region, label)
    for region_mask, label in ((missed, 1), (leaked, 0)):
        components, n = ndimage.label(region_mask, structure=np.ones((3, 3), dtype=bool))
        if n == 0:
            continue
        sizes = np.bincount(components.ravel())[1:]
        largest = int(np.argmax(sizes)) + 1
        if best is None or sizes[largest - 1] > best[0]:
            best = (int(sizes[largest - 1]), components == largest, label)
    assert best is not None
    earlier = [(r, c) for (k, r, c) in clicked if k == s]
    return SlicePrompt(s, "points", points=(interior_pixel(best[1], earlier),), labels=(best[2],))


@dataclass(frozen=True)
class PerSlicePlan:
    slice_range: tuple[int, int]  # inclusive, along the array axis
    prompts: list[SlicePrompt]


def medical_sam2_plan(
    gt: np.ndarray, array_axis: int, every: int = 2, fraction: float = 0.25
) -> PerSlicePlan:
    """Medical-SAM2's evaluation: see the module notes."""
    present = np.flatnonzero(slice_areas(gt, array_axis))
    if len(present) == 0:
        raise InvalidPromptError("the object is absent from the ground truth; nothing to prompt")
    lo, hi = int(present[0]), int(present[-1])
    length = max(int((hi - lo + 1) * fraction), 1)
    last = lo + length - 1
    prompts = []
    for s in range(lo, last + 1, every):
        mask2d = cut(gt, array_axis, s)
        if mask2d.any():
            prompts.append(SlicePrompt(s, "box", box=box_prompt(mask2d, 0, np.random.default_rng(0))))
    return PerSlicePlan((lo, last), prompts)


def _to_ijk(array_axis: int, slice_index: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(row, col) of a slice cut along ``array_axis`` -> voxel (i, j, k) the session takes."""
    index = np.zeros((len(rows), 3), dtype=float)
    rest = [a for a in range(3) if a != array_axis]
    index[:, array_axis] = slice_index
    index[:, rest[0]] = rows
    index[:, rest[1]] = cols
    return index[:, ::-1]  # array [k, j, i] order -> (i, j, k)


def apply_prompt(session: Session, object_id: int, prompt: SlicePrompt) -> None:
    """Give one simulated prompt to the session (clicks add to the slice's earlier prompts)."""
    axis = session.layout.array_axis
    if prompt.kind == "mask":
        assert prompt.mask is not None
        session.add_mask(object_id, prompt.slice_index, prompt.mask)
    elif prompt.kind == "box":
        assert prompt.box is not None
        r0, c0, r1, c1 = prompt.box
        a, b = _to_ijk(axis, prompt.slice_index, np.array([r0, r1]), np.array([c0, c1]))
        session.add_box(object_id, a, b)
    else:
        pts = np.asarray(prompt.points, dtype=float).reshape(-1, 2)
        session.add_points(
            object_id, _to_ijk(axis, prompt.slice_index, pts[:, 0], pts[:, 1]), list(prompt.labels)
        )
