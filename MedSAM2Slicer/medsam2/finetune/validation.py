"""Validation Dice on held-out cases with the evaluation harness's protocol and metrics.

3D mode: each structure of each validation case is prompted as :mod:`medsam2.evaluation` prompts it
(``evaluate_label``: simulated prompts on the chosen slice, propagation both ways through the whole
volume) and scored with volumetric Dice; one session per case, so slices are encoded once.
2D mode: up to ``max_slices`` slices per structure (spread over its extent, the protocol's "middle"
choice) each get a prompt on their own, and the mask the model returns for that slice is scored.
The score is the mean Dice over (case, structure) pairs where the structure is present; HD95 and NSD
(at the settings' tolerance) are kept beside it (``ValidationResult.metrics``), per slice in 2D mode.

``head_scores`` scores the training heads themselves on held-out clips (they are not part of the
exported model, so the validation above cannot see them): the boundary head's F1 against the
ground-truth boundary band, and the SRPP head's offset error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from medsam2.datasets.layouts import LabelSpec, LoadedCase
from medsam2.datasets.prompts import box_prompt, case_rng, choose_slices, click_prompt, cut
from medsam2.datasets.training import TrainingDataset
from medsam2.errors import InvalidPromptError
from medsam2.evaluation.metrics import compute_metrics
from medsam2.evaluation.runner import evaluate_label
from medsam2.evaluation.settings import EvaluationSettings
from medsam2.finetune.forward import FinetuneModel
from medsam2.finetune.sampler import ClipSampler
from medsam2.predictor import EngineVideoPredictor
from medsam2.session import SegmentationSession

OBJECT_ID = 1


@dataclass
class ValidationResult:
    scores: list[tuple[str, str, float]] = field(default_factory=list)  # (case, structure, Dice)
    metrics: list[dict[str, float]] = field(default_factory=list)  # dice, hd95, nsd of each score

    def mean_of(self, name: str) -> float:
        values = [m[name] for m in self.metrics]
        return float(np.mean(values)) if values else float("nan")

    @property
    def count(self) -> int:
        return len(self.scores)

    @property
    def total(self) -> float:
        return float(sum(s for _, _, s in self.scores))

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")


def validate(
    predictor: EngineVideoPredictor,
    dataset: TrainingDataset,
    case_ids: Sequence[str],
    settings: EvaluationSettings,
    mode: str = "3d",
    max_slices: int = 5,
    progress: Optional[Callable[[int, int], None]] = None,
) -> ValidationResult:
    """Dice of ``predictor`` on ``case_ids`` (the caller sets eval mode)."""
    result = ValidationResult()
    for n, case_id in enumerate(case_ids, 1):
        case = dataset.load(dataset.record(case_id))
        session = SegmentationSession(
            predictor, case.image, case.geometry, axis=settings.axis, intensity=settings.intensity
        )
        for name, mask in case.structures.items():
            if not mask.any():
                continue
            try:
                if mode == "3d":
                    loaded = LoadedCase(case_id, case.image, mask.astype(np.int32), case.geometry)
                    rows, _, _ = evaluate_label(session, loaded, LabelSpec(name, (1,)), settings)
                    # MONAI's voxel surfaces, as _slice_metrics scores 2D mode
                    last = rows[-1]
                    scored = {
                        "dice": float(last["dice"]),
                        "hd95": float(last["hd95_monai"]),
                        "nsd": float(last["nsd_monai"]),
                    }
                else:
                    scored = _slice_metrics(session, case_id, name, mask, case.geometry.spacing, settings, max_slices)
            except InvalidPromptError:
                continue  # a degenerate object (e.g. one pixel wide): not scored, as the evaluation does
            result.scores.append((case_id, name, scored["dice"]))
            result.metrics.append(scored)
        if progress:
            progress(n, len(case_ids))
    return result


def _slice_metrics(
    session: SegmentationSession,
    case_id: str,
    name: str,
    mask: np.ndarray,
    spacing: Sequence[float],
    settings: EvaluationSettings,
    max_slices: int,
) -> dict[str, float]:
    protocol = settings.protocol
    axis = session.layout.array_axis
    # ITK-order spacing of the slice: the volume's, less the cut axis (array axes run the other way)
    in_plane = tuple(float(v) for v in np.delete(np.asarray(spacing, dtype=float)[::-1], axis)[::-1])
    rng = case_rng(protocol.seed, case_id, name)
    scores = []
    for s in choose_slices(mask, axis, "middle", max_slices, rng):
        gt2d = cut(mask, axis, s)
        session.reset()
        if protocol.prompt == "points":
            points, labels = click_prompt(gt2d, protocol.positive_clicks, protocol.negative_clicks, rng)
            pts = np.asarray(points, dtype=float)
            preview = session.add_points(OBJECT_ID, _ijk(axis, s, pts[:, 0], pts[:, 1]), list(labels))
        else:
            r0, c0, r1, c1 = box_prompt(gt2d, protocol.box_jitter, rng)
            a, b = _ijk(axis, s, np.array([r0, r1], dtype=float), np.array([c0, c1], dtype=float))
            preview = session.add_box(OBJECT_ID, a, b)
        metrics = compute_metrics(preview.mask, gt2d, in_plane, settings.tolerance_mm)
        scores.append((metrics.dice, metrics.hd95, metrics.nsd))
    dice_, hd95, nsd = (float(v) for v in np.mean(np.asarray(scores, dtype=float), axis=0))
    return {"dice": dice_, "hd95": hd95, "nsd": nsd}


def _ijk(array_axis: int, slice_index: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(row, col) on a slice cut along ``array_axis`` -> voxel (i, j, k), as the session takes them."""
    index = np.zeros((len(rows), 3), dtype=float)
    rest = [a for a in range(3) if a != array_axis]
    index[:, array_axis] = slice_index
    index[:, rest[0]] = rows
    index[:, rest[1]] = cols
    return index[:, ::-1]


@dataclass
class HeadScores:
    """The heads on held-out clips: boundary F1 (prediction > 0.5 against the ground-truth band, pooled
    over every pixel of every scored frame) with the F1 of calling every pixel an edge (what a thin
    structure's band gives for nothing), and SRPP's mean squared offset error with its zero-offset
    baseline (what predicting 0 for every pair scores on the same clips)."""

    boundary_f1: Optional[float] = None
    boundary_precision: Optional[float] = None
    boundary_recall: Optional[float] = None
    boundary_f1_all_edge: Optional[float] = None
    srpp_mse: Optional[float] = None
    srpp_zero_mse: Optional[float] = None


def head_scores(model: FinetuneModel, sampler: ClipSampler, batches: int) -> HeadScores:
    """Run ``batches`` clips of ``sampler`` (validation cases) through ``model`` in eval mode."""
    was_training = model.training
    model.train(False)
    model.keep_head_outputs = True
    model.head_outputs = {"bd": [], "srpp": []}
    try:
        with torch.no_grad():
            for _ in range(batches):
                model(sampler.next_batch())
        outputs = model.head_outputs
    finally:
        model.keep_head_outputs = False
        model.head_outputs = {"bd": [], "srpp": []}
        model.train(was_training)
    scores = HeadScores()
    if outputs["bd"]:
        tp = fp = fn = 0.0
        for logits, band in outputs["bd"]:
            pred, truth = logits > 0, band > 0.5
            tp += float((pred & truth).sum())
            fp += float((pred & ~truth).sum())
            fn += float((~pred & truth).sum())
        scores.boundary_precision = tp / (tp + fp) if tp + fp else 0.0
        scores.boundary_recall = tp / (tp + fn) if tp + fn else 0.0
        denominator = 2 * tp + fp + fn
        scores.boundary_f1 = 2 * tp / denominator if denominator else 1.0
        positives = tp + fn
        pixels = sum(float(band.numel()) for _, band in outputs["bd"])
        scores.boundary_f1_all_edge = 2 * positives / (positives + pixels) if pixels else 0.0
    if outputs["srpp"]:
        predicted = torch.cat([p for p, _ in outputs["srpp"]]).float()
        true = torch.cat([t for _, t in outputs["srpp"]]).float()
        scores.srpp_mse = float(((predicted - true) ** 2).mean())
        scores.srpp_zero_mse = float((true**2).mean())
    return scores


def reduce_validation(result: ValidationResult) -> tuple[float, int]:
    """(mean Dice, count) over every process of a torchrun job (this process's alone otherwise)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return result.mean, result.count
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    sums = torch.tensor([result.total, float(result.count)], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    total, count = float(sums[0]), int(sums[1])
    return (total / count if count else float("nan")), count
