"""The panel's MRML logic against Slicer's real MRML (PyPI ``slicer-core``): geometry under every
orientation and transform, the box, and what a write through the Segment Editor's logic changes.

Results are read back through Slicer's own code (``slicer.util.arrayFromSegmentBinaryLabelmap``).
"""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML for Python) is not installed")
vtk = pytest.importorskip("vtk", reason="vtk is not installed")

from slicer_scene import LPS, SHAPE, Scene, ijk_to_ras  # noqa: E402

from medsam2.errors import InvalidPromptError, InvalidVolumeError  # noqa: E402
from MedSAM2SlicerLib import geometry, prompts, segments  # noqa: E402
from MedSAM2SlicerLib.geometry import vtkMatrixFromArray  # noqa: E402
from MedSAM2SlicerLib.writer import SegmentWriter  # noqa: E402

TARGET_IJK = (7, 11, 13)


def _rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


# Every case is anisotropic. "lps": a DICOM-style axial CT. "oblique": tilted 20 degrees about a skew
# axis. "coronal": acquired coronally (the axial view cuts along j). "transformed": under a parent
# transform that rotates and translates.
CASES = {
    "lps": dict(matrix=ijk_to_ras(LPS, (0.7, 0.8, 2.5), (110.0, 95.0, -40.0)), axial_axis=2),
    "oblique": dict(
        matrix=ijk_to_ras(_rotation((1, 2, 3), 20) @ LPS, (0.7, 0.8, 2.5), (30.0, -12.0, 7.5)), axial_axis=2
    ),
    "coronal": dict(
        matrix=ijk_to_ras(np.array([[-1, 0, 0], [0, 0, 1], [0, -1, 0]]), (0.6, 3.0, 0.9), (20.0, -60.0, 80.0)),
        axial_axis=1,
    ),
    "transformed": dict(matrix=ijk_to_ras(LPS, (0.7, 0.8, 2.5), (110.0, 95.0, -40.0)), axial_axis=2, parent=True),
}
PARENT = np.eye(4)
PARENT[:3, :3] = _rotation((0, 0, 1), 15)
PARENT[:3, 3] = (5.0, -3.0, 12.0)


@pytest.fixture
def scene(monkeypatch):
    return Scene(monkeypatch)


def _volume(scene, case):
    volume = scene.add_volume(case["matrix"])
    if case.get("parent"):
        transform = scene.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        transform.SetMatrixTransformToParent(vtkMatrixFromArray(PARENT))
        volume.SetAndObserveTransformNodeID(transform.GetID())
    world = PARENT @ case["matrix"] if case.get("parent") else case["matrix"]
    return volume, world


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_click_is_the_voxel_under_it_and_a_write_lands_on_that_voxel(name, scene):
    volume, world = _volume(scene, CASES[name])
    click = world[:3, :3] @ np.array(TARGET_IJK, float) + world[:3, 3]
    points = scene.points_node()
    points.AddControlPoint(*click)
    assert geometry.voxelAxisForView(volume, "axial") == CASES[name]["axial_axis"]
    np.testing.assert_allclose(prompts.controlPointsIjk(volume, points), [TARGET_IJK], atol=1e-9)

    segmentation = segments.createSegmentationNode(volume)
    segment = segments.addSegment(segmentation, volume, "lesion")
    writer = SegmentWriter(scene.scene)
    axis = CASES[name]["axial_axis"]
    i, j, k = TARGET_IJK
    cut = np.zeros(np.delete(np.array(SHAPE), 2 - axis), np.uint8)
    index = [k, j, i]
    del index[2 - axis]
    cut[tuple(index)] = 1
    writer.writePreview(segmentation, segment, volume, axis, TARGET_IJK[axis], cut)
    read = scene.read(segmentation, segment, volume)
    assert list(zip(*np.nonzero(read))) == [(k, j, i)]
    # ...and the segment's labelmap lies on the volume's grid itself: nothing was resampled.
    internal = segmentation.GetBinaryLabelmapInternalRepresentation(segment)
    image_to_world, ijk = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    internal.GetImageToWorldMatrix(image_to_world)
    volume.GetIJKToRASMatrix(ijk)
    np.testing.assert_allclose(geometry.arrayFromVtkMatrix(image_to_world), geometry.arrayFromVtkMatrix(ijk), atol=1e-9)


def test_slice_axis_follows_the_view_and_reformatted_normals(scene):
    coronal = scene.add_volume(CASES["coronal"]["matrix"])
    assert [geometry.voxelAxisForView(coronal, v) for v in ("axial", "coronal", "sagittal")] == [1, 2, 0]
    slice_node = scene.scene.AddNewNodeByClass("vtkMRMLSliceNode")
    slice_to_ras = np.eye(4)
    slice_to_ras[:3, :3] = _rotation((1, 0, 0), 30)  # tilted 30 degrees from axial: still axial
    world = CASES["coronal"]["matrix"]
    slice_to_ras[:3, 3] = world[:3, :3] @ np.array([5.0, 17.0, 9.0]) + world[:3, 3]
    slice_node.GetSliceToRAS().DeepCopy(vtkMatrixFromArray(slice_to_ras))
    slice_node.UpdateMatrices()
    assert geometry.sliceAxisForSliceNode(coronal, slice_node) == 1
    assert geometry.sliceIndexForSliceNode(coronal, slice_node, 1) == 17


def test_a_box_is_complete_after_its_second_corner_and_covers_inclusive_voxels(scene):
    matrix = CASES["lps"]["matrix"]
    volume = scene.add_volume(matrix)
    roi = scene.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    # Corners exactly on the voxel edges of i 4..20, j 6..30, on slice k = 9.
    lo = matrix[:3, :3] @ np.array([3.5, 5.5, 9.0]) + matrix[:3, 3]
    hi = matrix[:3, :3] @ np.array([20.5, 30.5, 9.0]) + matrix[:3, 3]
    roi.AddControlPoint(*lo)
    assert not prompts.boxIsComplete(volume, roi, 2) and prompts.roiBoxIjk(volume, roi, 2) is None
    roi.AddControlPoint(*hi)
    assert roi.GetNumberOfControlPoints() == 1, "Slicer replaces the two corners by the centre"
    assert prompts.boxIsComplete(volume, roi, 2)
    a, b = prompts.roiBoxIjk(volume, roi, axis=2)
    np.testing.assert_allclose(a, [4, 6, 9])
    np.testing.assert_allclose(b, [20, 30, 9])
    # Slicer pads the thin side to the smallest in-plane one (here 17.5 mm, thicker than the 2.5 mm
    # slice), so the ROI's own shape cannot tell its axis: the view it was drawn in does.
    size = np.abs(hi - lo)
    assert roi.GetSize()[2] == pytest.approx(min(size[0], size[1]))


def test_user_errors_are_one_clear_line(scene):
    volume = scene.add_volume(CASES["lps"]["matrix"])
    empty = scene.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InvalidVolumeError, match="volume 'empty' has no voxels loaded"):
        segments.createSegmentationNode(empty)
    outside = scene.points_node("far")
    outside.AddControlPoint(1000.0, 1000.0, 1000.0)
    with pytest.raises(InvalidPromptError, match="a point of 'far' at RAS .* is outside volume 'CT'"):
        prompts.controlPointsIjk(volume, outside)
    grid = scene.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    volume.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(InvalidVolumeError, match="under the non-linear transform 'warp'; harden"):
        geometry.volumeGeometry(volume)
    volume.SetAndObserveTransformNodeID(None)
    segmentation = segments.createSegmentationNode(volume)
    segment = segments.addSegment(segmentation, volume, "liver")
    with pytest.raises(InvalidPromptError, match="segment 'liver' is empty on slice 3; paint it"):
        segments.segmentSliceMask(segmentation, segment, volume, 2, 3)


def _writer_case(scene):
    volume = scene.add_volume(CASES["oblique"]["matrix"])
    segmentation = segments.createSegmentationNode(volume)
    first = segments.addSegment(segmentation, volume, "first")
    second = segments.addSegment(segmentation, volume, "second")
    writer = SegmentWriter(scene.scene)
    return volume, segmentation, first, second, writer


def test_a_slab_write_changes_those_slices_only(scene):
    volume, segmentation, first, _second, writer = _writer_case(scene)
    everywhere = np.ones(SHAPE, np.uint8)
    writer.writePropagation(segmentation, first, volume, 2, 0, SHAPE[0] - 1, everywhere)
    new = np.zeros((5, SHAPE[1], SHAPE[2]), np.uint8)
    new[:, 3:9, 4:12] = 1
    writer.writePropagation(segmentation, first, volume, 2, 8, 12, new)
    read = scene.read(segmentation, first, volume)
    np.testing.assert_array_equal(read[8:13], new)
    assert read[:8].all() and read[13:].all()


def test_overwrite_mode_decides_whether_a_new_segment_takes_voxels_of_another(scene):
    volume, segmentation, first, second, writer = _writer_case(scene)
    block = np.zeros(SHAPE, np.uint8)
    block[:, 10:30, 10:26] = 1
    writer.writePropagation(segmentation, first, volume, 2, 0, SHAPE[0] - 1, block)
    shifted = np.roll(block, 8, axis=2)
    writer.editorNode.SetOverwriteMode(writer.editorNode.OverwriteNone)
    writer.writePropagation(segmentation, second, volume, 2, 0, SHAPE[0] - 1, shifted)
    np.testing.assert_array_equal(scene.read(segmentation, first, volume), block)
    np.testing.assert_array_equal(scene.read(segmentation, second, volume), shifted)
    writer.undo()
    writer.editorNode.SetOverwriteMode(writer.editorNode.OverwriteAllSegments)
    writer.writePropagation(segmentation, second, volume, 2, 0, SHAPE[0] - 1, shifted)
    np.testing.assert_array_equal(scene.read(segmentation, first, volume), block & ~shifted.astype(bool))


def test_editable_area_and_intensity_range_limit_what_the_model_writes(scene):
    volume, segmentation, first, second, writer = _writer_case(scene)
    block = np.zeros(SHAPE, np.uint8)
    block[:, 10:30, 10:26] = 1
    writer.writePropagation(segmentation, first, volume, 2, 0, SHAPE[0] - 1, block)
    node = writer.editorNode
    node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
    writer.writePropagation(segmentation, second, volume, 2, 0, SHAPE[0] - 1, np.ones(SHAPE, np.uint8))
    np.testing.assert_array_equal(scene.read(segmentation, second, volume), 1 - block)
    writer.undo()
    node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere)
    node.SetSourceVolumeIntensityMask(True)
    node.SetSourceVolumeIntensityMaskRange(100, 300)  # the bright blob only
    writer.writePropagation(segmentation, second, volume, 2, 0, SHAPE[0] - 1, np.ones(SHAPE, np.uint8))
    voxels = slicer.util.arrayFromVolume(volume)
    np.testing.assert_array_equal(
        scene.read(segmentation, second, volume), ((voxels >= 100) & (voxels <= 300)).astype(np.uint8)
    )


def test_one_undo_state_per_round_of_previews_and_propagation(scene):
    volume, segmentation, first, _second, writer = _writer_case(scene)
    cut = np.zeros((SHAPE[1], SHAPE[2]), np.uint8)
    cut[5:9, 5:9] = 1
    for s in (3, 4, 5):  # three previews...
        writer.writePreview(segmentation, first, volume, 2, s, cut)
    slab = np.ones((4, SHAPE[1], SHAPE[2]), np.uint8)
    writer.writePropagation(segmentation, first, volume, 2, 2, 5, slab)  # ...and their propagation
    after = scene.read(segmentation, first, volume)
    assert writer.undo() and not scene.read(segmentation, first, volume).any()
    assert not writer.canUndo(), "previews saved no state of their own"
    assert writer.redo()
    np.testing.assert_array_equal(scene.read(segmentation, first, volume), after)
