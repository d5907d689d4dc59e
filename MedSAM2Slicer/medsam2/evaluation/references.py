"""Published Dice figures of the seed papers, shown beside a run whose protocol is theirs.

Only the protocol is the same: the data, preprocessing and weights may not be, so these are reference
points, not paired comparisons. Each figure is as the paper or its released example reports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medsam2.evaluation.settings import EvaluationSettings

MEDICAL_SAM2_BTCV = ("Medical-SAM2 paper (BTCV, 13 organs, per-slice Dice)", 0.890)
SEED_002_MASK = ("SAM 2 large, seed 002's BraTS example (mask prompt, volumetric Dice)", 0.893)
SEED_002_CLICKS = ("SAM 2 large, seed 002's BraTS example (5 clicks, volumetric Dice)", 0.880)


def published_means(settings: EvaluationSettings) -> list[tuple[str, float]]:
    """(source, mean Dice over structures) for the published results that used this run's protocol."""
    p = settings.protocol
    if settings.cvpr25 is not None:
        return []  # the CVPR 2025 section has its own table
    if p.per_slice:
        return [MEDICAL_SAM2_BTCV]
    seed_002 = p.slice_choice == "middle" and p.num_slices == 1 and p.rounds == 0 and settings.direction == "both"
    if seed_002 and p.prompt == "mask":
        return [SEED_002_MASK]
    if seed_002 and p.prompt == "points" and p.positive_clicks + p.negative_clicks == 5:
        return [SEED_002_CLICKS]
    return []
