"""Surface Dice and Hausdorff distance on DeepMind's surfel surface (``nsd_surface``, ``hd95_surface``).

Two NSD definitions are in use, and the evaluation reports both, each under its own name:

``nsd_monai``   (:mod:`.metrics`) counts boundary *voxels* (a voxel with a face neighbour outside the
                mask) with distances between voxel centres, every boundary voxel weighing the same.
                MONAI's ``compute_surface_dice``; what seed 002 reports.
``nsd_surface`` (this module) places the surface on the voxel-*corner* grid: every 2x2x2 neighbourhood
                whose voxels are neither all inside nor all outside holds a surface element ("surfel")
                whose area in mm^2 comes from the marching-cubes triangles of that neighbourhood. The
                share of both surfaces' *area* within the tolerance of the other surface is the score.
                DeepMind's ``surface-distance`` (``compute_surface_dice_at_tolerance``); what the
                CVPR 2025 interactive 3D challenge (its ``SurfaceDice.py`` is a copy of it) and FLARE
                report. On thin or small objects the two differ by up to about 0.6.

The surfel areas per neighbourhood code (256 codes, scaled by the voxel spacing) come from the
``surface-distance`` package itself (``lookup_tables.create_table_neighbour_code_to_surface_area``), so
the marching-cubes triangulation is exactly the reference's; the rest (cropping, neighbourhood codes,
distance maps, area-weighted sums, the area-weighted percentile) is computed here, vectorised, and is
checked against the package's ``compute_surface_distances`` in the tests.

Masks are ``[k, j, i]`` arrays and ``spacing`` is in ITK order ``(si, sj, sk)``, as in :mod:`.metrics`.
The outside of the array counts as background. Empty masks follow :mod:`.metrics`: both empty give
NSD 1 and HD 0; exactly one empty gives NSD 0 and HD the image diagonal (the package itself returns
NaN and inf there, and with numpy >= 2 fails, since it uses ``np.Inf``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from medsam2.errors import InvalidVolumeError, MedSAM2Error
from medsam2.evaluation.metrics import array_spacing, as_bool_pair, checked_pair, image_diagonal_mm

# Weight of each voxel of a 2x2x2 neighbourhood in its code: the package's encoding kernel, written as
# the bit of offset (d0, d1, d2) so that codes index its area table the same way.
_BITS = {(d0, d1, d2): 1 << (7 - (4 * d0 + 2 * d1 + d2)) for d0 in (0, 1) for d1 in (0, 1) for d2 in (0, 1)}


@lru_cache(maxsize=32)
def _area_table(array_spacing: tuple[float, float, float]) -> np.ndarray:
    try:
        from surface_distance import lookup_tables
    except ImportError:
        raise MedSAM2Error(
            "nsd_surface needs the surface-distance package (pip install surface-distance)"
        ) from None
    return np.asarray(lookup_tables.create_table_neighbour_code_to_surface_area(array_spacing), dtype=float)


@dataclass(frozen=True)
class SurfelDistances:
    """Distances (mm) from every surfel of one surface to the other surface, with the surfel areas."""

    gt_to_pred: np.ndarray
    gt_areas: np.ndarray
    pred_to_gt: np.ndarray
    pred_areas: np.ndarray


def _codes(mask: np.ndarray) -> np.ndarray:
    """Neighbourhood code of every voxel corner: corner c sits between voxels c-1 and c on each axis."""
    padded = np.pad(mask.astype(np.uint8), 1)
    n0, n1, n2 = (s - 1 for s in padded.shape)
    code = np.zeros((n0, n1, n2), dtype=np.int32)
    for (d0, d1, d2), bit in _BITS.items():
        code += bit * padded[d0 : d0 + n0, d1 : d1 + n1, d2 : d2 + n2]
    return code


def surfel_distances(
    prediction: np.ndarray, ground_truth: np.ndarray, spacing: Optional[Sequence[float]] = None
) -> SurfelDistances:
    """Both directed surfel distances; both masks must be non-empty 3D masks."""
    pred, gt = as_bool_pair(prediction, ground_truth)
    if pred.ndim != 3:
        raise InvalidVolumeError(f"surface Dice is defined here for 3D masks, got {pred.ndim}D")
    if not pred.any() or not gt.any():
        raise InvalidVolumeError("surfel distances need two non-empty masks")
    sampling = array_spacing(spacing, 3)
    union = pred | gt
    box = []
    for axis in range(3):
        idx = np.flatnonzero(union.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    # Only corners of the joint bounding box (plus the ring of corners around it) can hold surfels,
    # and the distance between two surfels does not depend on anything outside it.
    code_gt, code_pred = _codes(gt[tuple(box)]), _codes(pred[tuple(box)])
    surf_gt = (code_gt != 0) & (code_gt != 255)
    surf_pred = (code_pred != 0) & (code_pred != 255)
    areas = _area_table(tuple(float(s) for s in sampling))
    to_gt = ndimage.distance_transform_edt(~surf_gt, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~surf_pred, sampling=sampling)
    return SurfelDistances(
        gt_to_pred=np.asarray(to_pred[surf_gt], dtype=float),
        gt_areas=areas[code_gt[surf_gt]],
        pred_to_gt=np.asarray(to_gt[surf_pred], dtype=float),
        pred_areas=areas[code_pred[surf_pred]],
    )


def _surface_dice(d: SurfelDistances, tolerance_mm: float) -> float:
    within = float(d.gt_areas[d.gt_to_pred <= tolerance_mm].sum()) + float(
        d.pred_areas[d.pred_to_gt <= tolerance_mm].sum()
    )
    return within / (float(d.gt_areas.sum()) + float(d.pred_areas.sum()))


def _area_percentile(distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
    """The package's robust Hausdorff: the smallest distance whose cumulative area share reaches
    ``percent`` (surfels sorted by distance, then area, as its sort of (distance, area) pairs)."""
    order = np.lexsort((areas, distances))
    cumulative = np.cumsum(areas[order]) / np.sum(areas)
    idx = int(np.searchsorted(cumulative, percent / 100.0))
    return float(distances[order][min(idx, len(distances) - 1)])


@dataclass(frozen=True)
class SurfaceMetrics:
    nsd_surface: float
    hd95_surface: float  # mm


def surface_metrics(
    prediction: np.ndarray,
    ground_truth: np.ndarray,
    spacing: Optional[Sequence[float]] = None,
    tolerance_mm: float = 1.0,
    percent: float = 95.0,
) -> SurfaceMetrics:
    """Surface Dice at ``tolerance_mm`` and the area-weighted ``percent`` Hausdorff distance."""
    pred, gt = checked_pair(prediction, ground_truth, spacing, tolerance_mm)
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return SurfaceMetrics(1.0, 0.0)
    if not has_pred or not has_gt:
        return SurfaceMetrics(0.0, image_diagonal_mm(pred.shape, spacing))
    d = surfel_distances(pred, gt, spacing)
    hd = max(
        _area_percentile(d.gt_to_pred, d.gt_areas, percent),
        _area_percentile(d.pred_to_gt, d.pred_areas, percent),
    )
    return SurfaceMetrics(_surface_dice(d, tolerance_mm), hd)


def surface_dice(
    prediction: np.ndarray,
    ground_truth: np.ndarray,
    spacing: Optional[Sequence[float]] = None,
    tolerance_mm: float = 1.0,
) -> float:
    """``nsd_surface`` alone (see the module notes)."""
    return surface_metrics(prediction, ground_truth, spacing, tolerance_mm).nsd_surface
