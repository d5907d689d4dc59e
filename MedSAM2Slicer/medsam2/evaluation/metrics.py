"""Segmentation metrics in physical units: Dice, IoU, normalised surface Dice (NSD) and HD95.

Conventions
-----------
- Masks are boolean-like arrays of the same shape. For volumes they are indexed ``[k, j, i]`` (as
  SimpleITK and the engine give them) while ``spacing`` is in ITK order, fastest axis first, exactly
  as :class:`medsam2.geometry.VolumeGeometry` stores it: ``(si, sj, sk)`` in millimetres. It is
  reversed here, once, to match the array axes; any dimensionality works (2D slices take ``(si, sj)``).
- The surface of a mask is the set of its voxels that have at least one face neighbour (6-connectivity
  in 3D) outside the mask; the outside of the array counts as background, so an object touching the
  border of the image has a surface there (it ends at the edge of the scan).
- Surface distances are Euclidean distances in millimetres between the centres of surface voxels,
  from every surface voxel of one mask to the nearest surface voxel of the other (MONAI's definition).
- HD95 is the larger of the two directed 95th percentiles (linear interpolation) of those distances.
- NSD at tolerance ``tau`` mm is the fraction of surface voxels of both masks that lie within ``tau``
  of the other mask's surface: (|{a: d(a, B) <= tau}| + |{b: d(b, A) <= tau}|) / (|dA| + |dB|).

Empty masks (documented behaviour, used everywhere in the evaluation)
----------------------------------------------------------------------
- both empty ("nothing to find, nothing found"): Dice = IoU = NSD = 1, HD95 = 0;
- exactly one empty (a missed object or a pure false positive): Dice = IoU = NSD = 0 and HD95 = the
  length of the image's diagonal in mm (the largest distance the image can hold), as the BraTS
  challenge scores it, so such a case counts as the worst result instead of dropping out of the mean.

Only numpy and scipy: the metrics run wherever the engine runs, without MONAI.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from medsam2.errors import InvalidVolumeError

METRIC_NAMES = ("dice", "iou", "nsd", "hd95")


@dataclass(frozen=True)
class SegmentationMetrics:
    dice: float
    iou: float
    nsd: float  # at ``tolerance_mm``
    hd95: float  # millimetres
    tolerance_mm: float
    gt_voxels: int
    pred_voxels: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def as_bool_pair(prediction: np.ndarray, ground_truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(prediction) != 0
    gt = np.asarray(ground_truth) != 0
    if pred.shape != gt.shape:
        raise InvalidVolumeError(f"prediction has shape {pred.shape} but ground truth has shape {gt.shape}")
    if pred.ndim == 0:
        raise InvalidVolumeError("masks must have at least one dimension")
    return pred, gt


def array_spacing(spacing: Optional[Sequence[float]], ndim: int) -> np.ndarray:
    """ITK-order spacing (fastest axis first) -> per array axis."""
    if spacing is None:
        return np.ones(ndim)
    s = np.asarray(spacing, dtype=float).reshape(-1)
    if s.shape != (ndim,) or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise InvalidVolumeError(
            f"spacing must be {ndim} positive numbers for a {ndim}D mask, got {tuple(s)}"
        )
    return s[::-1].copy()


def dice(prediction: np.ndarray, ground_truth: np.ndarray) -> float:
    """2|P & G| / (|P| + |G|); 1 when both are empty."""
    pred, gt = as_bool_pair(prediction, ground_truth)
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, gt).sum()) / total


def iou(prediction: np.ndarray, ground_truth: np.ndarray) -> float:
    """|P & G| / |P | G|; 1 when both are empty."""
    pred, gt = as_bool_pair(prediction, ground_truth)
    union = int(np.logical_or(pred, gt).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(pred, gt).sum()) / union


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (outside the array counts as outside)."""
    m = np.asarray(mask) != 0
    # border_value=0: erosion treats beyond-the-array as background, so edge voxels are surface.
    interior = ndimage.binary_erosion(
        m, structure=ndimage.generate_binary_structure(m.ndim, 1), border_value=0
    )
    return m & ~interior


def _crop_to_union(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to their joint bounding box plus one voxel (where the image allows).

    Distances only involve voxels inside that box, and the one-voxel margin keeps the surface test
    exact: a voxel on the crop's edge is then either background or on the image's own edge.
    Cropping keeps the distance transform small when a small organ sits in a large CT.
    """
    union = pred | gt
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        idx = np.flatnonzero(union.any(axis=other))
        lo, hi = max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, union.shape[axis])
        slices.append(slice(lo, hi))
    box = tuple(slices)
    return pred[box], gt[box]


def surface_distances(
    prediction: np.ndarray, ground_truth: np.ndarray, spacing: Optional[Sequence[float]] = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each prediction surface voxel to the ground-truth surface, and back.

    Both masks must be non-empty (the empty cases are defined by the callers, see the module notes).
    """
    pred, gt = as_bool_pair(prediction, ground_truth)
    if not pred.any() or not gt.any():
        raise InvalidVolumeError("surface distances need two non-empty masks")
    sampling = array_spacing(spacing, pred.ndim)
    pred, gt = _crop_to_union(pred, gt)
    pred_surface, gt_surface = surface_voxels(pred), surface_voxels(gt)
    # distance_transform_edt gives, for every voxel, the distance to the nearest zero: zeros placed on
    # one surface give distances to that surface, honouring anisotropic spacing through ``sampling``.
    to_gt = ndimage.distance_transform_edt(~gt_surface, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sampling)
    return np.asarray(to_gt[pred_surface], dtype=float), np.asarray(to_pred[gt_surface], dtype=float)


def image_diagonal_mm(shape: Sequence[int], spacing: Optional[Sequence[float]] = None) -> float:
    """Length of the image's diagonal in mm: the distance reported for a missed or phantom object."""
    sampling = array_spacing(spacing, len(shape))
    return float(np.sqrt(np.sum((np.asarray(shape, dtype=float) * sampling) ** 2)))


def hausdorff_distance(
    prediction: np.ndarray,
    ground_truth: np.ndarray,
    spacing: Optional[Sequence[float]] = None,
    percentile: float = 95.0,
) -> float:
    """Symmetric percentile Hausdorff distance in mm (HD95 by default); see the module notes for empties."""
    pred, gt = as_bool_pair(prediction, ground_truth)
    array_spacing(spacing, pred.ndim)  # a bad spacing is an error even where no distance is needed
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return 0.0
    if not has_pred or not has_gt:
        return image_diagonal_mm(pred.shape, spacing)
    to_gt, to_pred = surface_distances(pred, gt, spacing)
    return float(max(np.percentile(to_gt, percentile), np.percentile(to_pred, percentile)))


def checked_pair(
    prediction: np.ndarray, ground_truth: np.ndarray, spacing: Optional[Sequence[float]], tolerance_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """The masks as a boolean pair of one shape, after checking the NSD tolerance and the spacing:
    what every surface metric checks first."""
    if not tolerance_mm >= 0:
        raise InvalidVolumeError(f"NSD tolerance must be a non-negative number of mm, got {tolerance_mm}")
    pred, gt = as_bool_pair(prediction, ground_truth)
    array_spacing(spacing, pred.ndim)
    return pred, gt


def normalized_surface_dice(
    prediction: np.ndarray,
    ground_truth: np.ndarray,
    spacing: Optional[Sequence[float]] = None,
    tolerance_mm: float = 1.0,
) -> float:
    """NSD: share of both surfaces within ``tolerance_mm`` of the other; see the module notes for empties."""
    pred, gt = checked_pair(prediction, ground_truth, spacing, tolerance_mm)
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return 1.0
    if not has_pred or not has_gt:
        return 0.0
    to_gt, to_pred = surface_distances(pred, gt, spacing)
    within = int((to_gt <= tolerance_mm).sum()) + int((to_pred <= tolerance_mm).sum())
    return within / (len(to_gt) + len(to_pred))


def compute_metrics(
    prediction: np.ndarray,
    ground_truth: np.ndarray,
    spacing: Optional[Sequence[float]] = None,
    tolerance_mm: float = 1.0,
) -> SegmentationMetrics:
    """All four metrics, sharing one pair of distance transforms."""
    pred, gt = checked_pair(prediction, ground_truth, spacing, tolerance_mm)
    n_pred, n_gt = int(pred.sum()), int(gt.sum())
    if n_pred and n_gt:
        to_gt, to_pred = surface_distances(pred, gt, spacing)
        hd95 = float(max(np.percentile(to_gt, 95.0), np.percentile(to_pred, 95.0)))
        within = int((to_gt <= tolerance_mm).sum()) + int((to_pred <= tolerance_mm).sum())
        nsd = within / (len(to_gt) + len(to_pred))
    elif n_pred or n_gt:
        hd95, nsd = image_diagonal_mm(pred.shape, spacing), 0.0
    else:
        hd95, nsd = 0.0, 1.0
    return SegmentationMetrics(
        dice=dice(pred, gt),
        iou=iou(pred, gt),
        nsd=float(nsd),
        hd95=hd95,
        tolerance_mm=float(tolerance_mm),
        gt_voxels=n_gt,
        pred_voxels=n_pred,
    )


@dataclass(frozen=True)
class SliceOverlap:
    """Voxel counts per slice along one array axis: the raw material of per-slice Dice."""

    gt: np.ndarray  # int64 per slice
    pred: np.ndarray
    intersection: np.ndarray

    def dice(self, empty_value: float = float("nan")) -> np.ndarray:
        """Dice per slice; ``empty_value`` where both are empty (NaN: not informative; Medical-SAM2's
        per-slice protocol scores those slices 1)."""
        total = self.gt + self.pred
        out = np.full(len(total), float(empty_value))
        nonzero = total > 0
        out[nonzero] = 2.0 * self.intersection[nonzero] / total[nonzero]
        return out


def slice_overlap(prediction: np.ndarray, ground_truth: np.ndarray, array_axis: int = 0) -> SliceOverlap:
    pred, gt = as_bool_pair(prediction, ground_truth)
    if not 0 <= array_axis < pred.ndim:
        raise InvalidVolumeError(f"slice axis {array_axis} is not an axis of a {pred.ndim}D mask")
    other = tuple(a for a in range(pred.ndim) if a != array_axis)
    return SliceOverlap(
        gt=gt.sum(axis=other).astype(np.int64),
        pred=pred.sum(axis=other).astype(np.int64),
        intersection=np.logical_and(pred, gt).sum(axis=other).astype(np.int64),
    )
