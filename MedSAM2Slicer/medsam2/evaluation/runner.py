"""Evaluate a predictor on every case of a dataset: simulated prompts, propagation, metrics, files.

Output files: :mod:`medsam2.evaluation.outputs`.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from medsam2.datasets.layouts import CaseRecord, EvaluationDataset, LabelSpec, LoadedCase
from medsam2.datasets.prompts import case_rng
from medsam2.distributed import RankInfo, barrier, rank_info
from medsam2.errors import InvalidPromptError, MedSAM2Error
from medsam2.evaluation.columns import METRIC_COLUMNS, metric_columns
from medsam2.evaluation.metrics import slice_overlap
from medsam2.evaluation.outputs import SLICE_FIELDS, case_csv, case_fields, case_finished, error_file, slices_csv
from medsam2.evaluation.protocols import (
    SlicePrompt,
    apply_prompt,
    correction_click,
    medical_sam2_plan,
    simulate_prompts,
)
from medsam2.evaluation.report import write_report
from medsam2.evaluation.settings import EvaluationSettings
from medsam2.geometry import VolumeGeometry
from medsam2.io.atomic import write_atomic, write_text_atomic
from medsam2.io.tables import safe_name, write_csv_atomic
from medsam2.predictor import EngineVideoPredictor
from medsam2.session import SegmentationSession

OBJECT_ID = 1
Log = Callable[[str], None]


def cases_for_rank(cases: list[CaseRecord], rank: int, world_size: int) -> list[CaseRecord]:
    return [case for i, case in enumerate(cases) if i % world_size == rank]


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
        from medsam2.evaluation.cvpr25 import evaluate_label as evaluate_cvpr25

        return evaluate_cvpr25(session, case, spec, settings)
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
            # mode="full": the published protocols re-propagate the whole volume after each
            # corrective click; local corrections (the interactive default) are benchmarked apart.
            result = session.propagate(
                direction, slice_range=slice_range, stop_when_absent=settings.stop_when_absent, mode="full"
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
        barrier(info, barrier_timeout_s)
    if info.rank == 0:
        run.report = write_report(out, dataset, cases, settings, model=model, weights_random=weights_random)
    return run
