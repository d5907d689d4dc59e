"""Behaviour of the propagation engine: geometry, intensity, prompts, propagation, errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from conftest import always_absent
from medsam2 import (
    DeviceUnavailableError,
    IntensityPreparation,
    InvalidPromptError,
    InvalidVolumeError,
    MemoryBudgetError,
    PropagationCancelled,
    SegmentationSession,
    VolumeGeometry,
    parse_intensity,
)
from medsam2.devices import resolve_device
from medsam2.geometry import SliceLayout
from medsam2.preparation import SlicePreparer, intensity_bounds


def blob_volume(shape=(12, 40, 36), dtype=np.float32, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vol = rng.normal(0, 10, size=shape)
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    vol += 200 * (((k - shape[0] / 2) / 5) ** 2 + ((j - 20) / 8) ** 2 + ((i - 18) / 7) ** 2 < 1)
    return vol.astype(dtype)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / max(1, np.logical_or(a, b).sum()))


# ---------------------------------------------------------------- geometry
def test_ras_ijk_round_trip_oblique_anisotropic():
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    geom = VolumeGeometry(spacing=(0.7, 0.8, 3.0), origin=(10.0, -20.0, 5.0), direction=tuple(rot.ravel()))
    ijk = np.array([[0, 0, 0], [3, 4, 5], [10.5, 2.25, 7]])
    ras = geom.ijk_to_ras(ijk)
    # voxel (0,0,0) is the origin, flipped from LPS to RAS
    assert np.allclose(ras[0], [-10.0, 20.0, 5.0])
    assert np.allclose(geom.ras_to_ijk(ras), ijk)
    again = VolumeGeometry.from_ijk_to_ras_matrix(geom.ijk_to_ras_matrix())
    assert np.allclose(again.spacing, geom.spacing) and np.allclose(again.direction, geom.direction)
    assert np.allclose(again.origin, geom.origin)


def test_view_axis_follows_acquisition_plane():
    axial = VolumeGeometry()
    assert axial.voxel_axis_for_view("axial") == 2
    assert axial.voxel_axis_for_view("coronal") == 1
    assert axial.voxel_axis_for_view("sagittal") == 0
    # a coronal acquisition: k runs anterior-posterior, j runs inferior-superior
    coronal = VolumeGeometry(direction=(1, 0, 0, 0, 0, 1, 0, -1, 0))
    assert coronal.voxel_axis_for_view("axial") == 1
    assert coronal.voxel_axis_for_view("coronal") == 2
    with pytest.raises(InvalidVolumeError, match="unknown view"):
        axial.voxel_axis_for_view("oblique")


def test_slice_layout_views_write_through_and_flip_superior_up():
    vol = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    layout = SliceLayout.for_axis(1, VolumeGeometry())  # coronal slice of an axial acquisition
    assert layout.flip_rows  # k points superior: flipped so the head is at the top
    frame = layout.frame(vol, 1)
    assert frame.shape == (2, 4) and np.array_equal(frame[0], vol[1, 1])  # top row = highest k
    frame[...] = -1
    assert (vol[:, 1, :] == -1).all()
    slice_index, xy = layout.ijk_to_frame(np.array([[3, 1, 0]]), vol.shape)
    assert slice_index[0] == 1 and np.allclose(xy[0], [3, 1])  # k=0 is the bottom row (row 1)


@pytest.mark.parametrize("storage", ["flipped_i_j", "transposed_i_j"])
def test_the_same_anatomy_stored_differently_gives_the_same_segmentation(tiny_predictor, storage):
    """A NIfTI written in RAS order and a DICOM-ordered copy of it must segment identically: frames are
    cut in display orientation, not in storage order."""
    a = blob_volume(shape=(10, 36, 36))
    a[:, 5:12, 20:30] += 150  # something asymmetric, so a flip would show
    geom_a = VolumeGeometry(spacing=(0.9, 0.9, 2.0), origin=(-10.0, 5.0, 3.0))
    if storage == "flipped_i_j":
        b = np.ascontiguousarray(a[:, ::-1, ::-1])
        corner = geom_a.ijk_to_lps_matrix() @ [35, 35, 0, 1]
        geom_b = VolumeGeometry(geom_a.spacing, tuple(corner[:3]), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
        to_a = lambda m: m[:, ::-1, ::-1]  # noqa: E731
    else:
        b = np.ascontiguousarray(a.transpose(0, 2, 1))
        geom_b = VolumeGeometry(geom_a.spacing, geom_a.origin, (0, 1, 0, 1, 0, 0, 0, 0, 1))
        to_a = lambda m: m.transpose(0, 2, 1)  # noqa: E731
    click_lps = geom_a.ijk_to_lps_matrix() @ [24, 8, 5, 1]
    results = []
    for vol, geom in ((a, geom_a), (b, geom_b)):
        s = SegmentationSession(tiny_predictor, vol, geom)
        assert s.layout.frame(vol, 5).shape == (36, 36)
        s.add_points(1, geom.lps_to_ijk([click_lps[:3]]), [1])
        results.append(s.propagate().masks[1])
    assert np.array_equal(to_a(results[1]), results[0])
    assert 0 < results[0].sum() < results[0].size


def test_invalid_geometry():
    with pytest.raises(InvalidVolumeError, match="spacing"):
        VolumeGeometry(spacing=(1, 0, 1))
    with pytest.raises(InvalidVolumeError, match="orthonormal"):
        VolumeGeometry(direction=(1, 0, 0, 0, 2, 0, 0, 0, 1))


# ---------------------------------------------------------------- intensity
def test_window_presets_and_parsing():
    assert parse_intensity("abdomen") == IntensityPreparation(mode="window", width=400, level=40)
    assert parse_intensity("1500,-600") == IntensityPreparation.window_preset("lung")
    assert parse_intensity("mri").mode == "percentile"
    assert parse_intensity("percentile:1,99").upper_percentile == 99
    for bad in ("abdomen2", "400,", "percentile:1", "0,40"):
        with pytest.raises(InvalidVolumeError):
            parse_intensity(bad)


def test_ct_window_in_torch_keeps_dtype_and_maps_hounsfield():
    hu = torch.tensor([[[-1000, -160, 40, 240, 3000]]], dtype=torch.int16)  # one 1x5 slice
    prep = SlicePreparer(hu, IntensityPreparation.window_preset("abdomen"), image_size=64)
    assert prep.frames.dtype == torch.int16  # no float copy of the whole volume
    unit = prep.unit_intensity([0])
    assert unit.dtype == torch.float32
    assert torch.allclose(unit[0, 0], torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    batch = prep([0])
    assert batch.shape == (1, 3, 64, 64) and batch.dtype == torch.float32


def test_mri_percentiles_ignore_and_keep_background():
    vol = torch.zeros(4, 10, 10)
    vol[:, 2:8, 2:8] = torch.arange(1, 4 * 36 + 1, dtype=torch.float32).reshape(4, 6, 6)
    lo, hi = intensity_bounds(vol, IntensityPreparation.mri(0.0, 100.0))
    assert (lo, hi) == (1.0, 144.0)  # zeros excluded
    prep = SlicePreparer(vol, IntensityPreparation.mri(0.0, 100.0), image_size=64)
    unit = prep.unit_intensity([0])
    assert unit[0, 0, 0] == 0 and unit[0, 2, 2] == 0  # background and the minimum both black
    assert unit[0, 7, 7] > 0


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "volume, message",
    [
        (np.full((4, 8, 8), np.nan, dtype=np.float32), "NaN"),
        (np.where(np.eye(8)[None] > 0, np.inf, 0.0).repeat(3, 0), "NaN or infinite"),
        (np.zeros((2, 3, 8, 8)), "4D"),
        (np.zeros((0, 8, 8)), "zero-size"),
        (np.full((3, 8, 8), 7.0), "constant intensity"),
        (np.array([["a"]]), "not numeric"),
    ],
)
def test_bad_volumes_are_refused_with_a_clear_error(tiny_predictor, volume, message):
    with pytest.raises(InvalidVolumeError, match=message):
        SegmentationSession(tiny_predictor, volume)


def test_volume_over_memory_budget(tiny_predictor):
    with pytest.raises(MemoryBudgetError, match="over the memory budget"):
        SegmentationSession(tiny_predictor, blob_volume(), memory_budget_bytes=1000)


def test_bad_prompts(tiny_predictor):
    s = SegmentationSession(tiny_predictor, blob_volume())
    with pytest.raises(InvalidPromptError, match="outside the volume"):
        s.add_points(1, [[18, 20, 12]], [1])  # k = 12 is past the last slice (11)
    with pytest.raises(InvalidPromptError, match="non-empty"):
        s.add_points(1, np.zeros((0, 3)), [])
    with pytest.raises(InvalidPromptError, match="zero area"):
        s.add_box(1, [5, 5, 6], [5, 30, 6])
    with pytest.raises(InvalidPromptError, match="different slices"):
        s.add_points(1, [[18, 20, 5], [18, 20, 7]], [1, 1])
    with pytest.raises(InvalidPromptError, match="only negative"):
        s.add_points(1, [[18, 20, 6]], [0])
    with pytest.raises(InvalidPromptError, match="empty"):
        s.add_mask(1, 6, np.zeros((40, 36), bool))
    with pytest.raises(InvalidPromptError, match="shape"):
        s.add_mask(1, 6, np.ones((36, 40), bool))
    with pytest.raises(InvalidPromptError, match="no prompts"):
        s.propagate()
    s.add_points(1, [[18, 20, 6]], [1])
    with pytest.raises(InvalidPromptError, match="direction"):
        s.propagate(direction="sideways")
    with pytest.raises(InvalidPromptError, match="slice range"):
        s.propagate(slice_range=(5, 40))
    with pytest.raises(InvalidPromptError, match="no prompt between"):
        s.propagate(slice_range=(8, 11))


def test_devices():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(DeviceUnavailableError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError, match="CUDA is not available"):
            resolve_device("cuda")


# ---------------------------------------------------------------- propagation
@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.float64, np.uint8])
def test_any_numeric_dtype(tiny_predictor, dtype):
    vol = blob_volume(dtype=np.float32)
    vol = np.clip(vol - vol.min(), 0, 250).astype(dtype)
    s = SegmentationSession(tiny_predictor, vol)
    s.add_points(1, [[18, 20, 6]], [1])
    result = s.propagate()
    assert result.masks[1].shape == vol.shape and result.masks[1].dtype == np.uint8
    assert result.propagated[1] == (0, vol.shape[0] - 1)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_mask_prompt_lands_on_the_right_slice_along_any_axis(tiny_predictor, axis):
    vol = blob_volume(shape=(24, 32, 28))
    s = SegmentationSession(tiny_predictor, vol, axis=axis)
    slice_index = 10
    frame = s._cut(np.zeros(vol.shape, np.uint8), slice_index)
    painted = np.zeros(frame.shape, bool)
    painted[2 : frame.shape[0] // 2, 3 : frame.shape[1] // 2] = True  # off-centre, so a flip would show
    preview = s.add_mask(5, slice_index, painted)
    assert iou(preview.mask, painted) > 0.8
    result = s.propagate(direction="forward", slice_range=(slice_index, slice_index))
    mask = result.masks[5]
    assert iou(s._cut(mask, slice_index), painted) > 0.8
    other = np.delete(mask, slice_index, axis=2 - axis)
    assert other.sum() == 0  # only that slice was propagated


def test_two_d_image_mode(tiny_predictor):
    image = blob_volume(shape=(1, 40, 36))[0]
    s = SegmentationSession(tiny_predictor, image)
    s.add_box(1, [10, 12, 0], [26, 28, 0])
    result = s.propagate()
    assert result.masks[1].shape == (1, 40, 36)
    assert result.propagated[1] == (0, 0)


def test_refinement_reuses_features_and_keeps_other_objects(tiny_predictor):
    vol = blob_volume()
    s = SegmentationSession(tiny_predictor, vol)
    s.add_points(1, [[18, 20, 6]], [1])
    s.add_box(2, [2, 2, 4], [12, 14, 4])
    first = s.propagate()
    assert s.cache_stats.encoded == vol.shape[0]  # every slice encoded exactly once
    other_before = first.masks[2].copy()
    s.add_points(1, [[18, 24, 9]], [0])
    s.propagate(object_ids=[1])
    assert s.cache_stats.encoded == vol.shape[0]  # no slice encoded again
    assert np.array_equal(s.mask(2), other_before)  # object 2 untouched


def test_slice_range_replaces_only_that_range(tiny_predictor):
    vol = blob_volume()
    s = SegmentationSession(tiny_predictor, vol)
    s.add_points(1, [[18, 20, 6]], [1])
    before = s.propagate().masks[1].copy()
    preview = s.add_points(1, [[12, 14, 8], [20, 22, 8]], [1, 0])
    after = s.propagate(slice_range=(7, 10)).masks[1]
    assert np.array_equal(after[:7], before[:7]) and np.array_equal(after[11:], before[11:])
    # the corrected slice keeps what the radiologist saw after the click
    assert np.array_equal(after[8], preview.mask)


def test_correction_survives_a_full_repropagation(tiny_predictor):
    s = SegmentationSession(tiny_predictor, blob_volume())
    s.add_points(1, [[18, 20, 6]], [1])
    s.propagate()
    preview = s.add_points(1, [[10, 10, 9], [18, 20, 9]], [0, 1])
    assert np.array_equal(s.propagate().masks[1][9], preview.mask)


def test_memory_budget_limits_the_cache_not_the_result(tiny_predictor):
    vol = blob_volume()
    roomy = SegmentationSession(tiny_predictor, vol)
    roomy.add_points(1, [[18, 20, 6]], [1])
    expected = roomy.propagate().masks[1]
    per_slice = roomy.feature_cache.bytes_used // vol.shape[0]
    tight = SegmentationSession(tiny_predictor, vol, memory_budget_bytes=vol.size * 4 + 3 * per_slice)
    tight.add_points(1, [[18, 20, 6]], [1])
    assert np.array_equal(tight.propagate().masks[1], expected)
    assert len(tight.feature_cache) == 3 and tight.cache_stats.not_admitted > 0


def test_progress_and_cancel_keep_the_previous_result(tiny_predictor):
    vol = blob_volume()
    s = SegmentationSession(tiny_predictor, vol)
    s.add_points(1, [[18, 20, 6]], [1])
    calls: list[tuple[int, int]] = []
    previous = s.propagate(progress=lambda d, t: calls.append((d, t))).masks[1].copy()
    assert calls[-1][0] == calls[-1][1] and [c[0] for c in calls] == list(range(1, len(calls) + 1))

    stop = threading.Event()
    seen: list[int] = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        if done == 3:
            stop.set()

    s.add_points(1, [[25, 25, 6]], [0])
    with pytest.raises(PropagationCancelled):
        s.propagate(progress=progress, cancel=stop)
    assert max(seen) == 3  # honoured before the next slice
    assert np.array_equal(s.mask(1), previous)
    assert s.propagate().masks[1].shape == vol.shape  # the session still works


def test_probabilities_match_masks(tiny_predictor):
    s = SegmentationSession(tiny_predictor, blob_volume())
    s.add_points(1, [[18, 20, 6]], [1])
    result = s.propagate(probabilities=True)
    prob = result.probabilities[1]
    assert prob.dtype == np.float32 and 0 <= prob.min() and prob.max() <= 1
    assert np.array_equal(prob > 0.5, result.masks[1] > 0)


def test_stop_when_absent_ends_a_direction(tiny_predictor):
    # A model whose object-score head always says "absent" on tracked slices; the prompted slice
    # (a mask prompt) is present by construction.
    absent = always_absent(tiny_predictor)
    vol = blob_volume(shape=(16, 40, 36))
    painted = np.zeros((40, 36), bool)
    painted[12:28, 10:26] = True

    full = SegmentationSession(absent, vol)
    full.add_mask(1, 8, painted)
    everything = full.propagate()
    assert not np.isnan(everything.object_scores[1]).any()  # every slice visited

    s = SegmentationSession(absent, vol)
    s.add_mask(1, 8, painted)
    result = s.propagate(stop_when_absent=2)
    visited = ~np.isnan(result.object_scores[1])
    assert np.flatnonzero(visited).tolist() == [6, 7, 8, 9, 10]  # two absent slices each way, then stop
    assert sorted(result.stopped_early[1]) == ["backward", "forward"]
    assert result.masks[1][:6].sum() == 0 and result.masks[1][11:].sum() == 0
    assert result.masks[1][8].sum() > 0


def test_object_with_all_prompts_cleared_is_a_clear_error(tiny_predictor):
    s = SegmentationSession(tiny_predictor, blob_volume())
    s.add_points(1, [[18, 20, 6]], [1])
    s.add_points(2, [[10, 10, 4]], [1])
    s.clear_slice(2, 4)
    with pytest.raises(InvalidPromptError, match="object id 2"):
        s.propagate()
    s.remove_object(2)
    result = s.propagate()  # object 1 still propagates once 2 is gone
    assert s.object_ids == [1] and result.propagated[1] == (0, 11)


def test_largest_component_removes_islands_only_in_the_run(tiny_predictor):
    from medsam2.propagation import _keep_largest_component

    mask = np.zeros((10, 20, 20), np.uint8)
    mask[2:8, 5:15, 5:15] = 1  # the object
    mask[3, 1:3, 1:3] = 1  # an island inside the propagated slices
    mask[9, 18:20, 18:20] = 1  # an island outside them (an earlier run's result)
    layout = SliceLayout.for_axis(2, VolumeGeometry())
    _keep_largest_component(mask, layout, (0, 8))
    assert mask[3, 1:3, 1:3].sum() == 0 and mask[9, 18:20, 18:20].sum() == 4
    assert mask[2:8, 5:15, 5:15].all()

    s = SegmentationSession(tiny_predictor, blob_volume())
    s.add_points(1, [[18, 20, 6]], [1])
    result = s.propagate(largest_component=True)
    from scipy import ndimage

    assert ndimage.label(result.masks[1])[1] <= 1
