"""Evaluate a predictor on every case of a dataset: simulated prompts, propagation, metrics, files.

Output folder
-------------
``run.json``                    what was evaluated and how (a resumed run must match it)
``cases/<case>.csv``            one row per label and interaction round (written last: its presence
                                marks the case finished, and a resumed run skips it)
``cases/<case>.slices.csv``     per-slice voxel counts and Dice along the propagation, every round
``cases/<case>.error.txt``      why a case could not be evaluated (retried by a resumed run)
``predictions/<case>/<label>.nii.gz``  final masks, when asked for
plus the merged tables, summary and plots that :mod:`.report` writes.

Case rows: ``round`` 0 is the propagation from the simulated prompts, round r the one after the r-th
corrective click; ``status`` is ok, absent (the label is not in this case's ground truth: nothing to
prompt, not scored) or failed: <reason>; ``prompt`` lists what that round added; ``seconds`` counts
from the label's first prompt (the first label of a case also pays for encoding the slices);
``per_slice_dice`` is filled by the Medical-SAM2 protocol only. Metrics of that protocol are computed
on its slice range; otherwise on the whole volume. Slice rows exist where the ground truth or the
prediction is non-empty; ``offset`` is the signed distance in slices to the nearest prompted slice.
Metric columns (``dice``, ``iou``, ``nsd_monai``, ``nsd_surface``, ``hd95_monai``, ``hd95_surface``)
name the surface each uses: see :mod:`.columns`. With ``settings.cvpr25`` the rows are the CVPR 2025
protocol's steps instead (round 0 the box, round r the r-th click) with its extra columns: see
:mod:`.cvpr25`.

Several GPUs
------------
Under ``torchrun --nproc_per_node N`` every process reads RANK / WORLD_SIZE / LOCAL_RANK, evaluates
the cases whose index i has ``i % WORLD_SIZE == RANK`` into the shared folder, waits for the others at
a gloo barrier (no tensors travel, so no NCCL is needed) and rank 0 merges the files. Called with an
explicit ``rank``/``world_size`` (no torchrun), there is no barrier: rank 0 merges whatever cases are
finished and names the missing ones; run rank 0 last, or run again to re-merge.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from ..errors import InvalidPromptError, MedSAM2Error
from ..geometry import VolumeGeometry
from ..predictor import EngineVideoPredictor
from ..session import DIRECTIONS, SegmentationSession
from .columns import METRIC_COLUMNS, metric_columns
from .cvpr25 import EXTRA_FIELDS as CVPR25_FIELDS
from .cvpr25 import Cvpr25Protocol
from .datasets import CaseRecord, EvaluationDataset, LabelSpec, LoadedCase
from .files import read_csv, safe_name, write_atomic, write_csv_atomic, write_text_atomic
from .metrics import slice_overlap
from .protocols import (
    PromptProtocol,
    SlicePrompt,
    apply_prompt,
    case_rng,
    correction_click,
    medical_sam2_plan,
    simulate_prompts,
)

CASE_FIELDS = (
    "case", "label", "values", "round", "status", *METRIC_COLUMNS, "gt_voxels", "pred_voxels",
    "per_slice_dice", "prompted_slices", "prompt", "seconds",
)  # fmt: skip
SLICE_FIELDS = (
    "case",
    "label",
    "round",
    "slice",
    "offset",
    "gt_voxels",
    "pred_voxels",
    "intersection",
    "dice",
)
OBJECT_ID = 1
Log = Callable[[str], None]


@dataclass(frozen=True)
class EvaluationSettings:
    protocol: PromptProtocol = field(default_factory=PromptProtocol)
    direction: str = "both"
    stop_when_absent: Optional[int] = None
    axis: str = "axial"
    intensity: Optional[str] = None  # parse_intensity text ("abdomen", "400,40", "mri"); None: min-max
    tolerance_mm: float = 1.0
    memory_budget_bytes: Optional[int] = None
    save_predictions: bool = False
    cvpr25: Optional[Cvpr25Protocol] = None  # the CVPR 2025 interactive protocol instead of ``protocol``

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise InvalidPromptError(
                f"direction must be one of {', '.join(DIRECTIONS)}, got {self.direction!r}"
            )
        if self.stop_when_absent is not None and self.stop_when_absent < 1:
            raise InvalidPromptError(
                f"stop-when-absent must be at least 1 slice, got {self.stop_when_absent}"
            )
        if not self.tolerance_mm >= 0:
            raise InvalidPromptError(
                f"NSD tolerance must be a non-negative number of mm, got {self.tolerance_mm}"
            )
        if self.protocol.per_slice and self.protocol.rounds:
            raise InvalidPromptError(
                "the Medical-SAM2 per-slice protocol has no interaction rounds; use --rounds 0"
            )
        if self.cvpr25 is not None and (self.protocol.per_slice or self.protocol.rounds):
            raise InvalidPromptError("the CVPR 2025 protocol sets its own prompts; drop the other protocol options")

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("memory_budget_bytes")  # changes nothing in the results; free to differ on resume
        out.pop("save_predictions")
        if out["cvpr25"] is None:
            out.pop("cvpr25")  # results folders written before the protocol existed stay resumable
        return out


def case_fields(settings: EvaluationSettings) -> tuple[str, ...]:
    return CASE_FIELDS + (CVPR25_FIELDS if settings.cvpr25 is not None else ())


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    launched: bool  # started by torchrun (a process group can be formed)


def rank_info() -> RankInfo:
    """This process's place among torchrun's processes (rank 0 of 1 when not launched by it)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise MedSAM2Error(
            "RANK / WORLD_SIZE / LOCAL_RANK must be integers (as torchrun sets them)"
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise MedSAM2Error(f"rank {rank} is outside a world of {world} processes")
    return RankInfo(rank, world, local, world > 1 and "MASTER_ADDR" in os.environ)


def cases_for_rank(cases: list[CaseRecord], rank: int, world_size: int) -> list[CaseRecord]:
    return [case for i, case in enumerate(cases) if i % world_size == rank]


def case_csv(out_dir: Path, case_id: str) -> Path:
    return out_dir / "cases" / f"{safe_name(case_id)}.csv"


def slices_csv(out_dir: Path, case_id: str) -> Path:
    return out_dir / "cases" / f"{safe_name(case_id)}.slices.csv"


def error_file(out_dir: Path, case_id: str) -> Path:
    return out_dir / "cases" / f"{safe_name(case_id)}.error.txt"


def case_finished(out_dir: Path, case_id: str) -> bool:
    """A case is finished when its CSV holds rows for it (files are only ever written whole)."""
    path = case_csv(out_dir, case_id)
    if not path.is_file():
        return False
    try:
        rows = read_csv(path)
    except (OSError, ValueError):
        return False
    return bool(rows) and all(row.get("case") == case_id for row in rows)


@dataclass
class CaseResult:
    rows: list[dict[str, Any]]
    slice_rows: list[dict[str, Any]]
    predictions: dict[str, np.ndarray]  # label name -> final uint8 mask
    geometry: Optional[VolumeGeometry] = None


def _nearest_offsets(num_slices: int, prompted: list[int]) -> np.ndarray:
    """Signed distance (in slices) of every slice to the nearest prompted slice."""
    s = np.arange(num_slices)[:, None]
    diffs = s - np.asarray(prompted)[None, :]
    return diffs[np.arange(num_slices), np.argmin(np.abs(diffs), axis=1)]


def _restrict(volume: np.ndarray, axis: int, slice_range: Optional[tuple[int, int]]) -> np.ndarray:
    if slice_range is None:
        return volume
    lo, hi = slice_range
    return np.take(volume, np.arange(lo, hi + 1), axis=axis)


def evaluate_label(
    session: SegmentationSession,
    case: LoadedCase,
    spec: LabelSpec,
    settings: EvaluationSettings,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Optional[np.ndarray]]:
    """All rounds for one structure of one case; the session is reset first (its features stay)."""
    if settings.cvpr25 is not None:
        from . import cvpr25

        return cvpr25.evaluate_label(session, case, spec, settings)
    gt = spec.mask(case.label)
    base = {"case": case.case_id, "label": spec.name, "values": " ".join(map(str, spec.values))}
    if not gt.any():
        return [{**base, "round": 0, "status": "absent"}], [], None

    protocol = settings.protocol
    axis = session.layout.array_axis
    session.reset()
    slice_range: Optional[tuple[int, int]] = None
    direction = settings.direction
    if protocol.per_slice:
        plan = medical_sam2_plan(gt, axis, protocol.per_slice_every, protocol.per_slice_fraction)
        prompts, slice_range, direction = plan.prompts, plan.slice_range, "forward"
    else:
        prompts = simulate_prompts(gt, axis, protocol, case_rng(protocol.seed, case.case_id, spec.name))
    prompted = sorted({p.slice_index for p in prompts})
    offsets = _nearest_offsets(session.num_slices, prompted)
    gt_scored = _restrict(gt, axis, slice_range)

    rows: list[dict[str, Any]] = []
    slice_rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    step: list[SlicePrompt] = prompts
    prediction: Optional[np.ndarray] = None
    clicked: set[tuple[int, int, int]] = set()
    for round_index in range(protocol.rounds + 1):
        if round_index > 0:
            assert prediction is not None
            click = correction_click(prediction, gt, axis, clicked)
            step = [click] if click is not None else []
            if click is not None:
                clicked.add((click.slice_index, *click.points[0]))
        for prompt in step:
            apply_prompt(session, OBJECT_ID, prompt)
        if step or prediction is None:
            result = session.propagate(
                direction, slice_range=slice_range, stop_when_absent=settings.stop_when_absent
            )
            prediction = result.masks[OBJECT_ID].copy()
        scored = _restrict(prediction, axis, slice_range)
        metrics = metric_columns(scored, gt_scored, case.geometry.spacing, settings.tolerance_mm)
        overlap = slice_overlap(scored, gt_scored, axis)
        rows.append(
            {
                **base,
                "round": round_index,
                "status": "ok",
                **metrics,
                "per_slice_dice": float(np.mean(overlap.dice(empty_value=1.0)))
                if protocol.per_slice
                else None,
                "prompted_slices": " ".join(map(str, prompted)),
                "prompt": "; ".join(p.describe() for p in step) if step else "none (prediction is exact)",
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
        first = slice_range[0] if slice_range else 0
        per_slice = overlap.dice()
        for n in np.flatnonzero((overlap.gt + overlap.pred) > 0):
            s = int(n) + first
            slice_rows.append(
                {
                    "case": case.case_id,
                    "label": spec.name,
                    "round": round_index,
                    "slice": s,
                    "offset": int(offsets[s]),
                    "gt_voxels": int(overlap.gt[n]),
                    "pred_voxels": int(overlap.pred[n]),
                    "intersection": int(overlap.intersection[n]),
                    "dice": float(per_slice[n]),
                }
            )
    return rows, slice_rows, prediction


def evaluate_case(
    predictor: EngineVideoPredictor,
    dataset: EvaluationDataset,
    record: CaseRecord,
    settings: EvaluationSettings,
) -> CaseResult:
    """One case: one session (slice features encoded once, shared by all its labels)."""
    case = dataset.load(record)
    session = SegmentationSession(
        predictor,
        case.image,
        case.geometry,
        axis=settings.axis,
        intensity=settings.intensity,
        memory_budget_bytes=settings.memory_budget_bytes,
    )
    result = CaseResult([], [], {}, case.geometry)
    for spec in dataset.labels_for(case):
        try:
            rows, slice_rows, prediction = evaluate_label(session, case, spec, settings)
        except InvalidPromptError as exc:  # e.g. a degenerate object; the other labels still count
            rows, slice_rows, prediction = (
                [{"case": case.case_id, "label": spec.name, "round": 0, "status": f"failed: {exc}"}],
                [],
                None,
            )
        result.rows += rows
        result.slice_rows += slice_rows
        if prediction is not None:
            result.predictions[spec.name] = prediction
    return result


def _save_predictions(
    out_dir: Path, case_id: str, masks: dict[str, np.ndarray], geometry: VolumeGeometry
) -> None:
    import SimpleITK as sitk

    for name, mask in masks.items():
        image = sitk.GetImageFromArray(mask.astype(np.uint8))
        image.SetSpacing(geometry.spacing)
        image.SetOrigin(geometry.origin)
        image.SetDirection(geometry.direction)
        path = out_dir / "predictions" / safe_name(case_id) / f"{safe_name(name)}.nii.gz"

        def write(tmp: Path, img: Any = image) -> None:
            sitk.WriteImage(img, str(tmp), True)  # compressed

        write_atomic(path, write)


def _check_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    manifest = json.loads(json.dumps(manifest))  # as a reader sees it: tuples become lists
    path = out_dir / "run.json"
    if path.is_file():
        try:
            existing = json.loads(path.read_text())
        except ValueError:
            existing = None
        if existing != manifest:
            differing = sorted(
                k for k in set(manifest) | set(existing or {}) if (existing or {}).get(k) != manifest.get(k)
            )
            what = ", ".join(differing) or "unreadable run.json"
            raise MedSAM2Error(
                f"{out_dir} holds results of a different evaluation ({what} differ); "
                "choose another output folder to keep both"
            )
    else:
        write_text_atomic(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _barrier(info: RankInfo, timeout_s: float) -> None:
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        # gloo: the ranks exchange nothing but "done", and gloo works with or without GPUs.
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
        created = True
    try:
        dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()


@dataclass
class EvaluationRun:
    rank: int
    world_size: int
    evaluated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    report: Optional[Any] = None  # report.ReportPaths on the merging rank


def evaluate_dataset(
    dataset: EvaluationDataset,
    predictor: EngineVideoPredictor,
    out_dir: Union[str, os.PathLike],
    settings: Optional[EvaluationSettings] = None,
    *,
    model: str = "",
    weights_random: bool = False,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    limit: Optional[int] = None,
    log: Optional[Log] = None,
    barrier_timeout_s: float = 7 * 24 * 3600.0,
) -> EvaluationRun:
    """Evaluate this process's share of the cases, skipping finished ones; rank 0 writes the report.

    ``model`` describes the weights (name, checkpoint) for run.json and the summary; ``weights_random``
    says they are random (a test model), which the summary's first line then says. ``rank`` and
    ``world_size`` default to torchrun's environment variables; ``limit`` takes the first cases only.
    """
    from .report import write_report

    settings = settings or EvaluationSettings()
    say: Log = log or (lambda _msg: None)
    if rank is None and world_size is None:
        info = rank_info()
    else:
        world = int(world_size if world_size is not None else 1)
        r = int(rank if rank is not None else 0)
        if world < 1 or not 0 <= r < world:
            raise MedSAM2Error(f"rank {r} is outside a world of {world} processes")
        info = RankInfo(r, world, r, False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cases = dataset.cases[:limit] if limit else list(dataset.cases)
    manifest: dict[str, Any] = {
        "dataset": str(dataset.root.resolve()),
        "layout": dataset.layout,
        "labels": [[s.name, list(s.values)] for s in dataset.labels] if dataset.labels is not None else "all",
        "settings": settings.as_json(),
        "model": model,
        # Case files of an older layout (before the columns named their surface) cannot be merged.
        "metric_columns": list(METRIC_COLUMNS),
    }
    if weights_random:
        manifest["random_weights"] = True
    _check_manifest(out, manifest)

    run = EvaluationRun(info.rank, info.world_size)
    mine = cases_for_rank(cases, info.rank, info.world_size)
    for n, record in enumerate(mine, 1):
        if case_finished(out, record.case_id):
            run.skipped.append(record.case_id)
            say(f"[{n}/{len(mine)}] {record.case_id}: finished earlier, skipped")
            continue
        started = time.perf_counter()
        try:
            result = evaluate_case(predictor, dataset, record, settings)
        except MedSAM2Error as exc:  # unreadable file, memory budget...: record, go on, retry on resume
            run.failed[record.case_id] = str(exc)
            write_text_atomic(error_file(out, record.case_id), str(exc) + "\n")
            say(f"[{n}/{len(mine)}] {record.case_id}: failed: {exc}")
            continue
        if settings.save_predictions and result.predictions and result.geometry is not None:
            _save_predictions(out, record.case_id, result.predictions, result.geometry)
        write_csv_atomic(slices_csv(out, record.case_id), result.slice_rows, SLICE_FIELDS)
        write_csv_atomic(case_csv(out, record.case_id), result.rows, case_fields(settings))  # last: marks it finished
        error_file(out, record.case_id).unlink(missing_ok=True)
        run.evaluated.append(record.case_id)
        finals = {r["label"]: r.get("dice") for r in result.rows}
        shown = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} -" for k, v in finals.items())
        say(f"[{n}/{len(mine)}] {record.case_id}: Dice {shown} ({time.perf_counter() - started:.1f} s)")

    if info.launched:
        _barrier(info, barrier_timeout_s)
    if info.rank == 0:
        run.report = write_report(out, dataset, cases, settings, model=model, weights_random=weights_random)
    return run
