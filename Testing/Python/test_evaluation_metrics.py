"""Evaluation metrics against hand-computed values, a brute-force reference written here, MONAI and
DeepMind's surface-distance.

MONAI uses the same definitions as ours (surface = mask voxels with a face neighbour outside, the
image's outside counting as background; distances between voxel centres; HD95 = max of the two directed
95th percentiles; NSD counts surface voxels), so all four metrics must agree to 1e-6.

DeepMind's surface-distance places the surface on the voxel faces ("surfels" on the grid of voxel
corners) and weights each surfel by its area. Its distances therefore differ from ours by up to one
voxel diagonal, which is the agreement asked of HD95. Its NSD weights by area where ours counts
voxels, so it cannot agree to a fixed tolerance; it must lie between our NSD at tolerance - diagonal
and at tolerance + diagonal (the face/centre offset), up to a small slack for the area weighting.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage

from medsam2.errors import InvalidVolumeError
from medsam2.evaluation import metrics as M

# The reference libraries' own deprecation notices (scipy namespaces, MONAI arguments) are not ours.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*namespace is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning"),
]


# ------------------------------------------------------------------------------------------ helpers
def blob(shape, rng, threshold=0.1, sigma=2.0):
    """A smooth random object (random noise blurred and thresholded): realistic surfaces."""
    return ndimage.gaussian_filter(rng.standard_normal(shape), sigma) > threshold


def brute_force(pred, gt, spacing, tolerance):
    """Reference written without distance transforms or erosion: explicit neighbour checks and all
    pairwise distances between surface voxel centres (small masks only)."""
    array_spacing = np.asarray(spacing, dtype=float)[::-1]

    def surface(mask):
        points = []
        for idx in zip(*np.nonzero(mask)):
            for axis, step in itertools.product(range(mask.ndim), (-1, 1)):
                n = list(idx)
                n[axis] += step
                if not 0 <= n[axis] < mask.shape[axis] or not mask[tuple(n)]:
                    points.append(idx)
                    break
        return np.asarray(points, dtype=float) * array_spacing

    a, b = surface(pred), surface(gt)
    pairwise = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    a_to_b, b_to_a = pairwise.min(axis=1), pairwise.min(axis=0)
    hd95 = max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95))
    nsd = ((a_to_b <= tolerance).sum() + (b_to_a <= tolerance).sum()) / (len(a) + len(b))
    inter = np.logical_and(pred, gt).sum()
    return {
        "dice": 2 * inter / (pred.sum() + gt.sum()),
        "iou": inter / np.logical_or(pred, gt).sum(),
        "hd95": hd95,
        "nsd": nsd,
    }


def edge_case_pairs():
    """(name, pred, gt, spacing (i, j, k)) covering anisotropy, single voxels and the image border."""
    rng = np.random.default_rng(7)
    cases = []
    for n in range(4):
        shape = tuple(int(s) for s in rng.integers(9, 16, 3))
        cases.append((f"random{n}", blob(shape, rng), blob(shape, rng), tuple(rng.uniform(0.4, 3.0, 3))))
    single = np.zeros((7, 8, 9), bool)
    single[3, 4, 5] = True
    moved = np.zeros_like(single)
    moved[4, 4, 7] = True
    cases.append(("single voxel vs itself", single, single.copy(), (0.7, 1.0, 2.5)))
    cases.append(("single voxel vs another", single, moved, (0.7, 1.0, 2.5)))
    border = np.zeros((8, 9, 10), bool)
    border[:4, :, :5] = True  # touches five faces of the image
    border_pred = np.zeros_like(border)
    border_pred[:5, 1:, :4] = True
    cases.append(("touching the border", border_pred, border, (1.0, 0.5, 3.0)))
    whole = np.ones((5, 6, 7), bool)
    part = whole.copy()
    part[:, :, 5:] = False
    cases.append(("whole image", part, whole, (1.2, 0.8, 2.0)))
    return cases


EDGE_CASES = edge_case_pairs()


# ----------------------------------------------------------------------------------- exact values
def test_shifted_cube_with_anisotropic_spacing_has_hand_computed_metrics():
    gt = np.zeros((10, 10, 10), bool)
    gt[2:6, 2:6, 2:6] = True
    pred = np.zeros_like(gt)
    pred[3:7, 2:6, 2:6] = True  # one slice up along k, where voxels are 2 mm apart
    spacing = (1.0, 1.0, 2.0)  # (i, j, k), as VolumeGeometry stores it
    m = M.compute_metrics(pred, gt, spacing, tolerance_mm=1.0)
    assert m.dice == pytest.approx(0.75, abs=1e-12)  # 2 * 48 / (64 + 64)
    assert m.iou == pytest.approx(0.6, abs=1e-12)  # 48 / 80
    # 56 surface voxels each: 36 shared, 4 at 1 mm (the new cap's centre sees the side), 16 at 2 mm.
    assert m.hd95 == pytest.approx(2.0, abs=1e-12)
    assert m.nsd == pytest.approx(80 / 112, abs=1e-12)
    assert M.normalized_surface_dice(pred, gt, spacing, 0.5) == pytest.approx(72 / 112, abs=1e-12)
    assert M.normalized_surface_dice(pred, gt, spacing, 2.0) == 1.0
    assert (m.gt_voxels, m.pred_voxels) == (64, 64)
    # The same shift along i (1 mm apart) halves the distances: spacing is read in ITK order.
    pred_i = np.zeros_like(gt)
    pred_i[2:6, 2:6, 3:7] = True
    assert M.hausdorff_distance(pred_i, gt, spacing) == pytest.approx(1.0, abs=1e-12)


def test_identical_masks_are_perfect():
    rng = np.random.default_rng(3)
    mask = blob((12, 13, 14), rng)
    m = M.compute_metrics(mask, mask.copy(), (0.5, 0.9, 3.0), tolerance_mm=0.0)
    assert (m.dice, m.iou, m.nsd, m.hd95) == (1.0, 1.0, 1.0, 0.0)


def test_empty_masks_follow_the_documented_convention():
    shape, spacing = (4, 5, 6), (1.0, 2.0, 3.0)
    empty = np.zeros(shape, bool)
    full = np.zeros(shape, bool)
    full[1:3, 1:4, 2:5] = True
    both = M.compute_metrics(empty, empty, spacing)
    assert (both.dice, both.iou, both.nsd, both.hd95) == (1.0, 1.0, 1.0, 0.0)
    diagonal = np.sqrt((6 * 1.0) ** 2 + (5 * 2.0) ** 2 + (4 * 3.0) ** 2)
    for pred, gt in ((empty, full), (full, empty)):
        m = M.compute_metrics(pred, gt, spacing)
        assert (m.dice, m.iou, m.nsd) == (0.0, 0.0, 0.0)
        assert m.hd95 == pytest.approx(diagonal)
        assert M.hausdorff_distance(pred, gt, spacing) == pytest.approx(diagonal)
        assert M.normalized_surface_dice(pred, gt, spacing) == 0.0
    assert M.dice(empty, empty) == 1.0 and M.iou(empty, empty) == 1.0
    with pytest.raises(InvalidVolumeError, match="non-empty"):
        M.surface_distances(empty, full, spacing)


def test_bad_inputs_are_one_line_errors():
    a = np.zeros((3, 4, 5), bool)
    with pytest.raises(InvalidVolumeError, match="shape"):
        M.compute_metrics(a, np.zeros((3, 4, 6), bool))
    with pytest.raises(InvalidVolumeError, match="spacing"):
        M.compute_metrics(a, a, (1.0, 0.0, 1.0))
    with pytest.raises(InvalidVolumeError, match="spacing"):
        M.compute_metrics(a, a, (1.0, 1.0))
    with pytest.raises(InvalidVolumeError, match="tolerance"):
        M.compute_metrics(a, a, tolerance_mm=-1.0)


def test_surface_includes_the_image_border():
    mask = np.ones((3, 3, 3), bool)
    surface = M.surface_voxels(mask)
    assert surface.sum() == 26 and not surface[1, 1, 1]  # only the centre is inside


def test_per_slice_overlap_and_dice():
    gt = np.zeros((4, 5, 5), bool)
    pred = np.zeros_like(gt)
    gt[1, 1:3, 1:3] = True  # 4 voxels
    pred[1, 1:3, 1:2] = True  # 2 voxels, both inside
    pred[2, 0, 0] = True  # a leak onto a slice without the object
    overlap = M.slice_overlap(pred, gt, array_axis=0)
    assert overlap.gt.tolist() == [0, 4, 0, 0]
    assert overlap.pred.tolist() == [0, 2, 1, 0]
    assert overlap.intersection.tolist() == [0, 2, 0, 0]
    d = overlap.dice()
    assert np.isnan(d[0]) and np.isnan(d[3])
    assert d[1] == pytest.approx(2 * 2 / 6) and d[2] == 0.0
    assert overlap.dice(empty_value=1.0).tolist() == pytest.approx([1.0, 4 / 6, 0.0, 1.0])
    # along another axis the counts follow that axis
    assert M.slice_overlap(pred, gt, array_axis=2).gt.tolist() == [0, 2, 2, 0, 0]


# ------------------------------------------------------------------------------ brute-force reference
@pytest.mark.parametrize("name,pred,gt,spacing", EDGE_CASES, ids=[c[0] for c in EDGE_CASES])
def test_matches_brute_force_reference(name, pred, gt, spacing):
    for tolerance in (0.0, 1.0, 2.5):
        ours = M.compute_metrics(pred, gt, spacing, tolerance_mm=tolerance)
        ref = brute_force(pred, gt, spacing, tolerance)
        for key in ("dice", "iou", "hd95", "nsd"):
            assert getattr(ours, key) == pytest.approx(ref[key], abs=1e-9), (name, key, tolerance)


def test_two_dimensional_masks_work_with_two_spacings():
    rng = np.random.default_rng(11)
    a, b = blob((20, 24), rng), blob((20, 24), rng)
    ours = M.compute_metrics(a, b, (0.6, 1.7), tolerance_mm=1.0)
    ref = brute_force(a, b, (0.6, 1.7), 1.0)
    assert ours.hd95 == pytest.approx(ref["hd95"], abs=1e-9)
    assert ours.nsd == pytest.approx(ref["nsd"], abs=1e-9)


# -------------------------------------------------------------------------------------------- MONAI
@pytest.mark.parametrize("name,pred,gt,spacing", EDGE_CASES, ids=[c[0] for c in EDGE_CASES])
def test_matches_monai(name, pred, gt, spacing):
    monai_metrics = pytest.importorskip("monai.metrics", reason="MONAI (test extra) is not installed")
    import torch

    p = torch.from_numpy(pred)[None, None].float()
    g = torch.from_numpy(gt)[None, None].float()
    array_spacing = list(spacing[::-1])  # MONAI takes spacing per array axis
    tolerance = 1.5
    ours = M.compute_metrics(pred, gt, spacing, tolerance_mm=tolerance)
    assert ours.dice == pytest.approx(
        monai_metrics.compute_dice(p, g, include_background=True).item(), abs=1e-6
    )
    assert ours.iou == pytest.approx(
        monai_metrics.compute_iou(p, g, include_background=True).item(), abs=1e-6
    )
    hd = monai_metrics.compute_hausdorff_distance(p, g, percentile=95, spacing=array_spacing).item()
    assert ours.hd95 == pytest.approx(hd, rel=1e-6, abs=1e-6)  # MONAI returns float32
    nsd = monai_metrics.compute_surface_dice(
        p, g, [tolerance], spacing=array_spacing, include_background=True
    ).item()
    assert ours.nsd == pytest.approx(nsd, abs=1e-6)


# ------------------------------------------------------------------------ DeepMind surface-distance
@pytest.mark.parametrize("name,pred,gt,spacing", EDGE_CASES, ids=[c[0] for c in EDGE_CASES])
def test_agrees_with_deepmind_surface_distance(name, pred, gt, spacing):
    sd = pytest.importorskip("surface_distance", reason="surface-distance (test extra) is not installed")
    array_spacing = tuple(spacing[::-1])
    diagonal = float(np.linalg.norm(spacing))
    distances = sd.compute_surface_distances(gt, pred, array_spacing)
    ours = M.compute_metrics(pred, gt, spacing)
    assert ours.dice == pytest.approx(sd.compute_dice_coefficient(gt, pred), abs=1e-6)
    assert abs(ours.hd95 - sd.compute_robust_hausdorff(distances, 95)) <= diagonal + 1e-9
    for tolerance in (1.0, 3.0):
        theirs = sd.compute_surface_dice_at_tolerance(distances, tolerance)
        low = M.normalized_surface_dice(pred, gt, spacing, max(tolerance - diagonal, 0.0))
        high = M.normalized_surface_dice(pred, gt, spacing, tolerance + diagonal)
        assert low - 0.02 <= theirs <= high + 0.02, (name, tolerance, low, theirs, high)


def test_random_blobs_agree_with_deepmind_within_a_voxel_diagonal():
    sd = pytest.importorskip("surface_distance", reason="surface-distance (test extra) is not installed")
    rng = np.random.default_rng(2024)
    for _ in range(12):
        shape = tuple(int(s) for s in rng.integers(10, 22, 3))
        a, b = blob(shape, rng, 0.05), blob(shape, rng, 0.05)
        if not a.any() or not b.any():
            continue
        spacing = tuple(rng.uniform(0.5, 3.0, 3))
        distances = sd.compute_surface_distances(b, a, tuple(spacing[::-1]))
        assert abs(M.hausdorff_distance(a, b, spacing) - sd.compute_robust_hausdorff(distances, 95)) <= float(
            np.linalg.norm(spacing)
        )
        assert M.dice(a, b) == pytest.approx(sd.compute_dice_coefficient(b, a), abs=1e-6)


def test_identical_and_distant_objects_agree_with_deepmind_nsd():
    sd = pytest.importorskip("surface_distance", reason="surface-distance (test extra) is not installed")
    a = np.zeros((10, 30, 12), bool)
    a[3:7, 2:8, 3:9] = True
    far = np.zeros_like(a)
    far[3:7, 20:27, 3:9] = True
    spacing = (0.8, 1.0, 2.0)
    same = sd.compute_surface_distances(a, a.copy(), spacing[::-1])
    apart = sd.compute_surface_distances(a, far, spacing[::-1])
    assert M.normalized_surface_dice(a, a.copy(), spacing, 1.0) == sd.compute_surface_dice_at_tolerance(
        same, 1.0
    )
    assert M.normalized_surface_dice(far, a, spacing, 2.0) == sd.compute_surface_dice_at_tolerance(apart, 2.0)


def test_empty_masks_where_deepmind_differs(monkeypatch):
    """Where a mask is empty surface-distance returns inf (HD) and NaN (NSD, 0/0): our documented
    convention replaces those with finite, rankable values; the rest of the result agrees."""
    sd = pytest.importorskip("surface_distance", reason="surface-distance (test extra) is not installed")
    monkeypatch.setattr(np, "Inf", np.inf, raising=False)  # surface-distance 0.1 predates numpy 2
    empty = np.zeros((5, 6, 7), bool)
    full = np.zeros_like(empty)
    full[1:4, 2:5, 2:6] = True
    distances = sd.compute_surface_distances(full, empty, (2.0, 1.0, 1.0))
    assert np.isinf(sd.compute_robust_hausdorff(distances, 95))
    assert M.hausdorff_distance(empty, full, (1.0, 1.0, 2.0)) == pytest.approx(
        M.image_diagonal_mm(empty.shape, (1.0, 1.0, 2.0))
    )
    assert sd.compute_dice_coefficient(full, empty) == M.dice(empty, full) == 0.0
    assert (
        sd.compute_surface_dice_at_tolerance(distances, 1.0) == M.normalized_surface_dice(empty, full) == 0.0
    )
