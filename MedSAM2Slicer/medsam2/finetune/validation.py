"""Validation Dice on held-out cases with the evaluation harness's protocol and metrics.

3D mode: each structure of each validation case is prompted as :mod:`medsam2.evaluation` prompts it
(``evaluate_label``: simulated prompts on the chosen slice, propagation both ways through the whole
volume) and scored with volumetric Dice; one session per case, so slices are encoded once.
2D mode: up to ``max_slices`` slices per structure (spread over its extent, the protocol's "middle"
choice) each get a prompt on their own, and the mask the model returns for that slice is scored.
The score is the mean Dice over (case, structure) pairs where the structure is present.
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
from medsam2.evaluation.metrics import dice
from medsam2.evaluation.runner import evaluate_label
from medsam2.evaluation.settings import EvaluationSettings
from medsam2.predictor import EngineVideoPredictor
from medsam2.session import SegmentationSession

OBJECT_ID = 1


@dataclass
class ValidationResult:
    scores: list[tuple[str, str, float]] = field(default_factory=list)  # (case, structure, Dice)

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
                    score = float(rows[-1]["dice"])
                else:
                    score = _slice_dice(session, case_id, name, mask, settings, max_slices)
            except InvalidPromptError:
                continue  # a degenerate object (e.g. one pixel wide): not scored, as the evaluation does
            result.scores.append((case_id, name, score))
        if progress:
            progress(n, len(case_ids))
    return result


def _slice_dice(
    session: SegmentationSession,
    case_id: str,
    name: str,
    mask: np.ndarray,
    settings: EvaluationSettings,
    max_slices: int,
) -> float:
    protocol = settings.protocol
    axis = session.layout.array_axis
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
        scores.append(dice(preview.mask, gt2d))
    return float(np.mean(scores))


def _ijk(array_axis: int, slice_index: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(row, col) on a slice cut along ``array_axis`` -> voxel (i, j, k), as the session takes them."""
    index = np.zeros((len(rows), 3), dtype=float)
    rest = [a for a in range(3) if a != array_axis]
    index[:, array_axis] = slice_index
    index[:, rest[0]] = rows
    index[:, rest[1]] = cols
    return index[:, ::-1]


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
