"""The CVPR 2025 "Foundation Models for Interactive 3D Biomedical Image Segmentation" protocol.

Followed from the challenge's published evaluation code (JunMa11/CVPR-MedSegFMCompetition,
``CVPR25_iter_eval.py``, its README and ``get_boxes.py``), step by step, per structure:

Step 0, the box. The object's slice range ``z_min..z_max`` along the slice axis and, on its middle
slice ``z_mid`` (the middle one of the slices where the object is present, ``present[len // 2]``), its
2D bounding box, each side moved outwards by ``int(shift * size / 256)`` pixels with ``shift`` drawn
uniformly from 0..5 and kept inside the slice (``get_boxes.py``). The challenge drew its boxes once,
with a global seed over a process pool, and ships them in its test files; here the same distribution
is drawn from the case's own generator (seed, case, label), so a box does not depend on the order of
evaluation. Some structures get no box (the challenge omits it "for some structures, such as
vessels"): step 0 then scores DSC = NSD = 0 and predicts nothing, as the challenge scores it.
For SAM2: the box on slice ``z_mid``, propagated both ways with ``z_min..z_max`` as the limits.

Steps 1-5, the clicks. The error is every voxel where prediction and ground truth differ; its largest
26-connected component (the first in raster order among equal sizes: scipy's labels are the same as
connected-components-3d's, which the tests check) gets one click at the voxel with the largest Euclidean
distance transform (in voxels, not mm) inside the component, computed on the component's bounding box
padded by 25 % of its size (at least one voxel) with zeros, so the component's own edge and the image's
edge both count as boundary. Regions above 60 M voxels are downsampled 2x (block maximum) for the
transform and upsampled back by repetition, as the challenge does. Ties are broken by
``np.random.seed(42)`` then ``np.random.choice`` over the tied voxels in ``np.argwhere`` order (a fresh
``RandomState(42)`` here, the same draw). A voxel in the ground truth gives a positive (foreground)
click, one outside it a negative (background) click. A perfect prediction gets no click and is kept as
it is. For SAM2: the click on the slice it falls in, added to that slice's earlier prompts, then the
whole object is propagated again (within the box's slice range, or the whole volume where there is no
box).

Scores. DSC and NSD (DeepMind surface Dice, ``nsd_surface``) at 2 mm after every step; NSD is set to
0 where DSC <= 0.2. DSC AUC and NSD AUC are ``scipy.integrate.cumulative_trapezoid`` over the five
click steps at x = 0..4 (the box step is left out, since the box is optional), so they range 0..4;
final DSC and NSD are those after the last step. The challenge scores a case, not a structure: its
DSC is the mean over the case's classes, and the 0.2 rule applies to that mean. Per-structure rows
apply the rule to the structure's own DSC (``nsd_challenge``); the case-level scores in the summary
follow the challenge exactly (:func:`case_scores`). Time: the challenge allows 90 s per class for all
six steps (click simulation excluded) and scores a case 0 when it takes longer; ``seconds`` here counts
the session's work (prompts and propagation) of the structure, so the first structure of a case also
pays for encoding the slices.

Known differences from the challenge's run: each structure is its own SAM2 object evaluated on its
own (the challenge's models predict all classes in one label map, so classes cannot overlap there);
the challenge's images were resampled and intensity-normalised by its organisers, which a dataset
given here is not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
from scipy import integrate, ndimage

from medsam2.datasets.prompts import case_rng, cut, slice_areas, widen
from medsam2.errors import InvalidPromptError
from medsam2.evaluation.columns import metric_columns
from medsam2.evaluation.cvpr25_protocol import (  # the protocol's constants, used throughout
    CLICKS,
    EDT_DOWNSAMPLE_VOXELS,
    NSD_DSC_THRESHOLD,
    OBJECT_ID,
    TIE_SEED,
    TIME_BUDGET_S_PER_CLASS,
    Cvpr25Protocol,
)
from medsam2.evaluation.metrics import slice_overlap
from medsam2.evaluation.protocols import SlicePrompt, apply_prompt
from medsam2.session import SegmentationSession

if TYPE_CHECKING:
    from medsam2.datasets.layouts import LabelSpec, LoadedCase
    from medsam2.evaluation.settings import EvaluationSettings

# ------------------------------------------------------------------------------------------- the box
@dataclass(frozen=True)
class ChallengeBox:
    z_min: int
    z_max: int
    z_mid: int
    row0: int
    col0: int
    row1: int
    col1: int  # inclusive pixel indices on slice z_mid

    def prompt(self, shape2d: tuple[int, int]) -> SlicePrompt:
        """As SAM2 takes it: a one-pixel-thin box is widened by one pixel (SAM2 takes no zero-area box)."""
        r0, r1 = widen(self.row0, self.row1, shape2d[0])
        c0, c1 = widen(self.col0, self.col1, shape2d[1])
        return SlicePrompt(self.z_mid, "box", box=(r0, c0, r1, c1))


def challenge_box(gt: np.ndarray, array_axis: int, rng: np.random.Generator) -> ChallengeBox:
    present = np.flatnonzero(slice_areas(gt, array_axis))
    if len(present) == 0:
        raise InvalidPromptError("the object is absent from the ground truth; nothing to prompt")
    z_mid = int(present[len(present) // 2])
    mid = cut(gt, array_axis, z_mid)
    rows, cols = np.flatnonzero(mid.any(axis=1)), np.flatnonzero(mid.any(axis=0))
    height, width = mid.shape
    shift = int(rng.integers(0, 6))
    dr, dc = int(shift * height / 256), int(shift * width / 256)
    return ChallengeBox(
        int(present[0]),
        int(present[-1]),
        z_mid,
        max(0, int(rows[0]) - dr),
        max(0, int(cols[0]) - dc),
        min(height - 1, int(rows[-1]) + dr),
        min(width - 1, int(cols[-1]) + dc),
    )


# ------------------------------------------------------------------------------------------ the clicks
@dataclass(frozen=True)
class Click:
    voxel: tuple[int, int, int]  # array index [k, j, i]
    positive: bool

    def prompt(self, array_axis: int) -> SlicePrompt:
        row, col = (self.voxel[a] for a in range(3) if a != array_axis)
        return SlicePrompt(self.voxel[array_axis], "points", points=((row, col),), labels=(int(self.positive),))


def _block_max(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, [(0, s % 2) for s in mask.shape])  # as skimage's block_reduce pads: zeros
    a, b, c = (s // 2 for s in padded.shape)
    return padded.reshape(a, 2, b, 2, c, 2).max(axis=(1, 3, 5))


def component_edt(component: np.ndarray) -> np.ndarray:
    """The distance transform (voxels) of one error component, on its padded bounding box."""
    coords = np.argwhere(component)
    lo, hi = coords.min(axis=0), coords.max(axis=0) + 1
    crop_shape = hi - lo
    pad = np.maximum((crop_shape * 0.25).astype(int), 1)
    crop = np.zeros(crop_shape + 2 * pad, dtype=np.uint8)
    inner = tuple(slice(int(p), int(p + s)) for p, s in zip(pad, crop_shape))
    crop[inner] = component[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))]
    large = crop.size > EDT_DOWNSAMPLE_VOXELS
    if large:
        crop = _block_max(crop)
    edt = ndimage.distance_transform_edt(crop)
    if large:
        edt = edt.repeat(2, axis=0).repeat(2, axis=1).repeat(2, axis=2)
    full = np.zeros(component.shape, dtype=edt.dtype)
    full[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))] = edt[inner]
    return full


def sample_coord(edt: np.ndarray) -> tuple[int, int, int]:
    """One of the voxels of largest value, chosen as the challenge's seeded draw chooses it."""
    tied = np.argwhere(edt == edt.max())
    chosen = tied[np.random.RandomState(TIE_SEED).choice(len(tied))]
    return int(chosen[0]), int(chosen[1]), int(chosen[2])


def error_click(prediction: np.ndarray, gt: np.ndarray) -> Optional[Click]:
    """The next click (see the module notes), or None when the prediction is exact."""
    pred, truth = prediction != 0, gt != 0
    error = pred != truth
    if not error.any():
        return None
    components, _ = ndimage.label(error, structure=np.ones((3, 3, 3), dtype=bool))  # 26-connected
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    largest = components == int(np.argmax(sizes))
    edt = component_edt(largest) * largest
    if not edt.any():  # only the 2x-downsampled transform can miss a tiny component
        edt = largest.astype(float)
    voxel = sample_coord(edt)
    return Click(voxel, bool(truth[voxel]))


# ------------------------------------------------------------------------------------------- scores
def challenge_nsd(dsc: float, nsd: float) -> float:
    return float(nsd) if dsc > NSD_DSC_THRESHOLD else 0.0


def auc(scores: Sequence[float], clicks: int = CLICKS) -> float:
    """Area under the click curve: the last ``clicks`` scores at x = 0..clicks-1, trapezoids."""
    values = np.asarray(scores, dtype=float)[-clicks:]
    return float(integrate.cumulative_trapezoid(values, np.arange(clicks))[-1])


@dataclass(frozen=True)
class CaseScore:
    case: str
    classes: int
    dsc: tuple[float, ...]  # per step, mean over the case's classes
    nsd: tuple[float, ...]  # per step, 0 where that step's mean DSC <= 0.2
    dsc_auc: float
    nsd_auc: float
    seconds: float
    budget_s: float

    @property
    def within_budget(self) -> bool:
        return self.seconds <= self.budget_s


def case_scores(rows: Sequence[dict[str, Any]], clicks: int = CLICKS) -> list[CaseScore]:
    """The challenge's per-case scores from the per-structure step rows (status ok)."""
    by_case: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for row in rows:
        if row.get("status") == "ok":
            by_case.setdefault(str(row["case"]), {}).setdefault(str(row["label"]), {})[int(row["round"])] = row
    out = []
    for case, labels in by_case.items():
        steps = range(clicks + 1)
        complete = {k: v for k, v in labels.items() if all(s in v for s in steps)}
        if not complete:
            continue
        dsc = [float(np.mean([float(v[s]["dice"]) for v in complete.values()])) for s in steps]
        nsd = [
            challenge_nsd(dsc[s], float(np.mean([float(v[s]["nsd_surface"]) for v in complete.values()])))
            for s in steps
        ]
        seconds = float(sum(float(v[clicks]["seconds"]) for v in complete.values()))
        out.append(
            CaseScore(
                case, len(complete), tuple(dsc), tuple(nsd), auc(dsc, clicks), auc(nsd, clicks),
                seconds, TIME_BUDGET_S_PER_CLASS * len(complete),
            )  # fmt: skip
        )
    return out


# ------------------------------------------------------------------------------------------- the run
def evaluate_label(
    session: SegmentationSession,
    case: LoadedCase,
    spec: LabelSpec,
    settings: EvaluationSettings,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Optional[np.ndarray]]:
    """The box step and the click steps for one structure of one case (the session is reset first)."""
    protocol = settings.cvpr25 or Cvpr25Protocol()
    gt = spec.mask(case.label) != 0
    base = {"case": case.case_id, "label": spec.name, "values": " ".join(map(str, spec.values))}
    if not gt.any():
        return [{**base, "round": 0, "status": "absent"}], [], None
    axis = session.layout.array_axis
    spacing = case.geometry.spacing
    session.reset()

    rows: list[dict[str, Any]] = []
    slice_rows: list[dict[str, Any]] = []
    prediction = np.zeros(gt.shape, np.uint8)
    slice_range: Optional[tuple[int, int]] = None
    busy = 0.0  # the session's time: prompts and propagation, not click simulation or metrics
    dsc_steps: list[float] = []
    nsd_steps: list[float] = []
    prompted: list[int] = []

    def propagate() -> np.ndarray:
        # mode="full": the challenge re-propagates the whole volume after every click; a local
        # correction (the interactive default) would change what its numbers mean.
        result = session.propagate(
            "both", slice_range=slice_range, stop_when_absent=settings.stop_when_absent, mode="full"
        )
        return np.asarray(result.masks[OBJECT_ID]).copy()

    for step in range(protocol.clicks + 1):
        # The click is simulated before the clock starts: the challenge times only the model's run.
        click = error_click(prediction, gt) if step > 0 else None
        started = time.perf_counter()
        if step == 0:
            if protocol.uses_box(spec.name):
                box = challenge_box(gt, axis, case_rng(protocol.box_seed, case.case_id, spec.name))
                slice_range = (box.z_min, box.z_max)
                prompt = box.prompt(cut(gt, axis, box.z_mid).shape)
                apply_prompt(session, OBJECT_ID, prompt)
                prediction = propagate()
                kind, what = "box", f"{prompt.describe()} slices {box.z_min}-{box.z_max}"
            else:
                kind, what = "no box", "none (no box for this structure: scored 0, as the challenge does)"
        else:
            if click is None:
                kind, what = "no error", "none (prediction is exact)"
            else:
                prompt = click.prompt(axis)
                apply_prompt(session, OBJECT_ID, prompt)
                prediction = propagate()
                kind, what = "click", prompt.describe()
        if kind in ("box", "click"):
            prompted.append(prompt.slice_index)
        step_seconds = time.perf_counter() - started
        busy += step_seconds
        values = metric_columns(prediction, gt, spacing, settings.tolerance_mm)  # all zeros after "no box"
        nsd = challenge_nsd(values["dice"], values["nsd_surface"])
        dsc_steps.append(float(values["dice"]))
        nsd_steps.append(nsd)
        last = step == protocol.clicks
        rows.append(
            {
                **base,
                "round": step,
                "status": "ok",
                **values,
                "prompted_slices": " ".join(map(str, sorted(set(prompted)))),
                "prompt": what,
                "seconds": round(busy, 3),
                "step": kind,
                "click": (
                    f"{'+' if click.positive else '-'}({click.voxel[0]},{click.voxel[1]},{click.voxel[2]})"
                    if click is not None
                    else ""
                ),
                "nsd_challenge": nsd,
                "step_seconds": round(step_seconds, 3),
                "dsc_auc": auc(dsc_steps, protocol.clicks) if last else "",
                "nsd_auc": auc(nsd_steps, protocol.clicks) if last else "",
                "within_budget": (busy <= TIME_BUDGET_S_PER_CLASS) if last else "",
            }
        )
        if not prompted:  # nothing predicted yet (no box): no propagation to follow along the slices
            continue
        overlap = slice_overlap(prediction, gt, axis)
        per_slice = overlap.dice()
        nearest = np.asarray(sorted(set(prompted)))
        for n in np.flatnonzero((overlap.gt + overlap.pred) > 0):
            offset = int(n) - int(nearest[np.argmin(np.abs(nearest - int(n)))])
            slice_rows.append(
                {
                    "case": case.case_id, "label": spec.name, "round": step, "slice": int(n), "offset": offset,
                    "gt_voxels": int(overlap.gt[n]), "pred_voxels": int(overlap.pred[n]),
                    "intersection": int(overlap.intersection[n]), "dice": float(per_slice[n]),
                }  # fmt: skip
            )
    return rows, slice_rows, prediction
