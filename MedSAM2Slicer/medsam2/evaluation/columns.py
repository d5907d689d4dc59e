"""The metric columns of every case CSV and summary, each named after the surface definition it uses.

``dice``, ``iou``       volumetric overlap
``nsd_monai``           NSD on boundary voxels, distances between voxel centres (MONAI; seed 002)
``nsd_surface``         NSD on DeepMind's surfels, area-weighted (surface-distance; CVPR 2025, FLARE)
``hd95_monai``          95th-percentile Hausdorff distance (mm) on the boundary voxels of ``nsd_monai``
``hd95_surface``        area-weighted 95th-percentile Hausdorff distance (mm) on the surfels of
                        ``nsd_surface`` (surface-distance's ``compute_robust_hausdorff``)
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from medsam2.evaluation.metrics import compute_metrics
from medsam2.evaluation.surface_dice import surface_metrics

METRIC_COLUMNS = ("dice", "iou", "nsd_monai", "nsd_surface", "hd95_monai", "hd95_surface")
COLUMN_TITLES = {
    "dice": "Dice",
    "iou": "IoU",
    "nsd_monai": "NSD (MONAI voxels)",
    "nsd_surface": "NSD (surfels)",
    "hd95_monai": "HD95 voxels (mm)",
    "hd95_surface": "HD95 surfels (mm)",
}


def is_distance(column: str) -> bool:
    return column.startswith("hd95")


def metric_columns(
    prediction: np.ndarray,
    ground_truth: np.ndarray,
    spacing: Optional[Sequence[float]],
    tolerance_mm: float,
) -> dict[str, Any]:
    """All metric columns plus the voxel counts, for one prediction against its ground truth."""
    m = compute_metrics(prediction, ground_truth, spacing, tolerance_mm)
    s = surface_metrics(prediction, ground_truth, spacing, tolerance_mm)
    return {
        "dice": m.dice,
        "iou": m.iou,
        "nsd_monai": m.nsd,
        "nsd_surface": s.nsd_surface,
        "hd95_monai": m.hd95,
        "hd95_surface": s.hd95_surface,
        "gt_voxels": m.gt_voxels,
        "pred_voxels": m.pred_voxels,
    }
