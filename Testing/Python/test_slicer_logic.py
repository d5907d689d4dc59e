"""The Slicer module's logic against Slicer's real MRML (PyPI ``slicer-core``): geometry, writing rules,
undo, the background worker, export, first-use dependencies and the panel's files.

Results are read back through Slicer's own code paths (``slicer.util.arrayFromSegmentBinaryLabelmap``,
which exports through vtkSlicerSegmentationsModuleLogic onto the reference volume), not through the
logic under test. The model is SAM2 tiny with random weights at 128 px: its masks are arbitrary, so
tests check where masks go and what is left untouched, never how good they are.
"""

from __future__ import annotations

import ast
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import threading
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML for Python) is not installed")
vtk = pytest.importorskip("vtk", reason="vtk is not installed")
from vtk.util import numpy_support  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "MedSAM2Slicer"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from MedSAM2SlicerLib import dependencies  # noqa: E402
from MedSAM2SlicerLib.engine_client import (  # noqa: E402
    LocalEngineClient,
    PromptBundle,
    PropagationOutcome,
    SessionOptions,
)
from MedSAM2SlicerLib.logic import MedSAM2SlicerLogic, PropagationRequest, vtkMatrixFromArray  # noqa: E402
from MedSAM2SlicerLib.worker import BackgroundWorker, WorkerState, WorkerStateError  # noqa: E402

SHAPE = (24, 40, 36)  # [k, j, i]
TARGET_IJK = (7, 11, 13)  # (i, j, k) of the voxel the user clicks

# --------------------------------------------------------------------------- geometry cases


def _rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def _ijk_to_ras(columns, spacing, origin):
    m = np.eye(4)
    m[:3, :3] = np.asarray(columns, float) @ np.diag(spacing)
    m[:3, 3] = origin
    return m


# Every case is anisotropic. "lps": a DICOM-style axial CT (i towards the patient's left, j towards
# posterior: IJKToRAS has negative x and y). "oblique": the same, tilted 20 degrees about a skew axis.
# "coronal": acquired coronally (k runs posterior -> anterior, j runs superior -> inferior), so the
# axial view cuts along j. "transformed": the lps volume under a rotating+translating parent transform.
LPS = np.diag([-1.0, -1.0, 1.0])
CASES = {
    "lps": dict(matrix=_ijk_to_ras(LPS, (0.7, 0.8, 2.5), (110.0, 95.0, -40.0)), axial_axis=2),
    "oblique": dict(
        matrix=_ijk_to_ras(_rotation((1, 2, 3), 20) @ LPS, (0.7, 0.8, 2.5), (30.0, -12.0, 7.5)), axial_axis=2
    ),
    "coronal": dict(
        matrix=_ijk_to_ras(
            np.array([[-1, 0, 0], [0, 0, 1], [0, -1, 0]]), (0.6, 3.0, 0.9), (20.0, -60.0, 80.0)
        ),
        axial_axis=1,
    ),
    "transformed": dict(
        matrix=_ijk_to_ras(LPS, (0.7, 0.8, 2.5), (110.0, 95.0, -40.0)), axial_axis=2, parent=True
    ),
}
PARENT = np.eye(4)
PARENT[:3, :3] = _rotation((0, 0, 1), 15)
PARENT[:3, 3] = (5.0, -3.0, 12.0)
MARKUP_PARENT = np.eye(4)
MARKUP_PARENT[:3, :3] = _rotation((1, 1, 0), -40)
MARKUP_PARENT[:3, 3] = (-7.0, 2.0, 30.0)


def _register_converters():
    # Slicer registers these at start-up; a bare slicer-core process must do it once.
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    for rule in (
        slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
        slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
        slicer.vtkClosedSurfaceToFractionalLabelmapConversionRule,
        slicer.vtkFractionalLabelmapToClosedSurfaceConversionRule,
    ):
        factory.RegisterConverterRule(rule())


_register_converters()


class Scene:
    """A fresh MRML scene plus what ``slicer.util``'s segment helpers expect (``slicer.mrmlScene``,
    ``slicer.modules.segmentations.logic()``), so results can be read back through Slicer's own code."""

    def __init__(self, monkeypatch):
        self.scene = slicer.vtkMRMLScene()
        self.segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
        self.segmentations_logic.SetMRMLScene(self.scene)
        monkeypatch.setattr(slicer, "mrmlScene", self.scene, raising=False)
        modules = types.SimpleNamespace(
            segmentations=types.SimpleNamespace(logic=lambda: self.segmentations_logic)
        )
        monkeypatch.setattr(slicer, "modules", modules, raising=False)

    def add_volume(self, ijk_to_ras, name="CT", shape=SHAPE, parent=None):
        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        image = vtk.vtkImageData()
        image.SetDimensions(shape[2], shape[1], shape[0])
        image.AllocateScalars(vtk.VTK_SHORT, 1)
        voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape)
        k, j, i = np.indices(shape)
        blob = ((k - 12) / 7.0) ** 2 + ((j - 18) / 10.0) ** 2 + ((i - 15) / 9.0) ** 2 < 1
        voxels[:] = np.where(blob, 180, -90) + np.random.default_rng(1).integers(-20, 20, shape)
        node.SetAndObserveImageData(image)
        node.SetIJKToRASMatrix(vtkMatrixFromArray(ijk_to_ras))
        if parent is not None:
            node.SetAndObserveTransformNodeID(self.add_transform(parent).GetID())
        return node

    def add_transform(self, matrix):
        node = self.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        node.SetMatrixTransformToParent(vtkMatrixFromArray(matrix))
        return node

    def add_points(self, points_ras, name="positive", parent=None):
        node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        to_local = np.linalg.inv(parent) if parent is not None else np.eye(4)
        for p in np.atleast_2d(points_ras):
            local = to_local[:3, :3] @ p + to_local[:3, 3]
            node.AddControlPoint(vtk.vtkVector3d(*local))
        if parent is not None:
            node.SetAndObserveTransformNodeID(self.add_transform(parent).GetID())
        return node

    def paint(self, segmentation, segment_id, volume, array):
        """Put voxels into a segment the way a Segment Editor import does (not through the logic)."""
        labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        image = vtk.vtkImageData()
        image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(array.shape)[:] = array
        labelmap.SetAndObserveImageData(image)
        matrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(matrix)
        labelmap.SetIJKToRASMatrix(matrix)
        labelmap.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        assert self.segmentations_logic.ImportLabelmapToSegmentationNode(labelmap, segmentation, ids)
        self.scene.RemoveNode(labelmap)

    @staticmethod
    def read(segmentation, segment_id, volume):
        """The segment on the volume's grid, through Slicer's own export (independent of the logic)."""
        return (slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume) > 0).astype(
            np.uint8
        )


def _world_matrix(case):
    return PARENT @ case["matrix"] if case.get("parent") else case["matrix"]


# --------------------------------------------------------------------------- engine fixtures


@pytest.fixture(scope="module")
def predictor():
    from medsam2.models.build import build_predictor

    return build_predictor("configs/sam2.1/sam2.1_hiera_t.yaml", image_size=128, seed=0)


class RecordingEngine(LocalEngineClient):
    """The real in-process engine, remembering what the logic sent it."""

    def __init__(self, predictor):
        super().__init__(predictor_loader=lambda model, device, progress: predictor)
        self.sent = []
        self.progress_hook = None

    def add_prompts(self, session_id, object_id, prompts):
        self.sent.append((object_id, prompts))
        return super().add_prompts(session_id, object_id, prompts)

    def propagate(self, session_id, object_ids, *args, progress=None, **kwargs):
        hook = self.progress_hook

        def report(done, total):
            if progress:
                progress(done, total)
            if hook:
                hook(done, total)

        return super().propagate(session_id, object_ids, *args, progress=report, **kwargs)


@pytest.fixture
def engine(predictor):
    return RecordingEngine(predictor)


@pytest.fixture
def scene(monkeypatch):
    return Scene(monkeypatch)


def _options(axis):
    return SessionOptions(model="test-random-weights", device="cpu", intensity="minmax", axis=axis)


def _run(logic, run):
    """Run a prepared job on the real worker thread and deliver its events as the widget's QTimer would."""
    results, failures = [], []
    worker = BackgroundWorker(on_result=results.append, on_failure=failures.append)
    worker.start(run)
    assert worker.wait(300), "worker thread did not finish"
    worker.drain()
    written = logic.applyRun(run, results[0]) if results else None
    return worker, written, failures


def _slab(array, axis, lo, hi):
    index = [slice(None)] * 3
    index[2 - axis] = slice(lo, hi + 1)
    return array[tuple(index)]


def _outside(array, axis, lo, hi):
    moved = np.moveaxis(array, 2 - axis, 0)
    return np.concatenate([moved[:lo], moved[hi + 1 :]])


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("name", sorted(CASES))
def test_click_in_ras_reaches_the_engine_as_the_exact_voxel(name, scene, engine):
    case = CASES[name]
    volume = scene.add_volume(case["matrix"], parent=PARENT if case.get("parent") else None)
    world = _world_matrix(case)
    click_ras = world[:3, :3] @ np.array(TARGET_IJK, float) + world[:3, 3]
    # The markup sits under its own (different) transform: only its world position may count.
    points = scene.add_points(click_ras, parent=MARKUP_PARENT if case.get("parent") else None)
    logic = MedSAM2SlicerLogic(engine)

    axis = logic.voxelAxisForView(volume, "axial")
    assert axis == case["axial_axis"]
    ijk = logic.controlPointsIjk(volume, points)
    np.testing.assert_allclose(ijk, [TARGET_IJK], atol=1e-9)
    if not case.get("parent"):  # Slicer's own RAS -> IJK agrees
        ras_to_ijk = vtk.vtkMatrix4x4()
        volume.GetRASToIJKMatrix(ras_to_ijk)
        np.testing.assert_allclose(ras_to_ijk.MultiplyPoint((*click_ras, 1.0))[:3], TARGET_IJK, atol=1e-9)

    segmentation = logic.createSegmentationNode(volume)
    segment = logic.addSegment(segmentation, volume, "lesion")
    prompts = logic.collectPrompts(volume, axis, positiveNode=points)
    run = logic.prepareRun(volume, segmentation, segment, _options(axis), prompts, PropagationRequest())
    worker, written, failures = _run(logic, run)
    assert worker.state == WorkerState.DONE, failures

    object_id, sent = engine.sent[0]
    np.testing.assert_allclose(sent.points_ijk, [TARGET_IJK], atol=1e-9)
    np.testing.assert_array_equal(sent.labels, [1])
    session = engine.session(run.handle.sessionId)
    assert session.layout.voxel_axis == axis
    assert written == (0, SHAPE[2 - axis] - 1)  # both directions over the whole volume

    # The segment holds exactly the engine's mask, voxel for voxel, read back by Slicer's own export.
    np.testing.assert_array_equal(
        scene.read(segmentation, segment, volume), engine.fetch_mask(run.handle.sessionId, object_id)
    )
    # ... and its labelmap lies on the volume's grid itself: nothing was resampled.
    internal = segmentation.GetBinaryLabelmapInternalRepresentation(segment)
    image_to_world = vtk.vtkMatrix4x4()
    internal.GetImageToWorldMatrix(image_to_world)
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk_to_ras)
    np.testing.assert_allclose(
        [[image_to_world.GetElement(r, c) for c in range(4)] for r in range(4)],
        [[ijk_to_ras.GetElement(r, c) for c in range(4)] for r in range(4)],
        atol=1e-9,
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_voxel_written_is_the_voxel_under_the_click(name, scene):
    case = CASES[name]
    volume = scene.add_volume(case["matrix"], parent=PARENT if case.get("parent") else None)
    world = _world_matrix(case)
    click_ras = world[:3, :3] @ np.array(TARGET_IJK, float) + world[:3, 3]
    logic = MedSAM2SlicerLogic(engine=LocalEngineClient(predictor_loader=lambda *a: None))
    segmentation = logic.createSegmentationNode(volume)
    segment = logic.addSegment(segmentation, volume)
    i, j, k = (int(v) for v in np.round(logic.controlPointsIjk(volume, scene.add_points(click_ras))[0]))
    mask = np.zeros(SHAPE, np.uint8)
    mask[k, j, i] = 1
    axis = logic.voxelAxisForView(volume, "axial")
    assert logic.writeSegmentRange(segmentation, segment, volume, mask, axis, 0, SHAPE[2 - axis] - 1)

    read = scene.read(segmentation, segment, volume)
    assert list(zip(*np.nonzero(read))) == [(TARGET_IJK[2], TARGET_IJK[1], TARGET_IJK[0])]
    # The written voxel's centre, through the volume's matrix and transforms, is where the user clicked.
    k2, j2, i2 = np.argwhere(read)[0]
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(volume.GetParentTransformNode(), None, transform)
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk_to_ras)
    local = ijk_to_ras.MultiplyPoint((float(i2), float(j2), float(k2), 1.0))[:3]
    np.testing.assert_allclose(transform.TransformPoint(local), click_ras, atol=1e-6)


def test_slice_axis_follows_the_view_and_reformatted_normals(scene):
    logic = MedSAM2SlicerLogic(engine=LocalEngineClient(predictor_loader=lambda *a: None))
    coronal = scene.add_volume(CASES["coronal"]["matrix"])
    assert [logic.voxelAxisForView(coronal, v) for v in ("axial", "coronal", "sagittal")] == [1, 2, 0]
    oblique = scene.add_volume(CASES["oblique"]["matrix"])
    assert [logic.voxelAxisForView(oblique, v) for v in ("axial", "coronal", "sagittal")] == [2, 1, 0]
    # A reformatted view whose normal is tilted 30 degrees from superior still cuts axially.
    slice_node = scene.scene.AddNewNodeByClass("vtkMRMLSliceNode")
    slice_to_ras = np.eye(4)
    slice_to_ras[:3, :3] = _rotation((1, 0, 0), 30)
    volume_world = CASES["coronal"]["matrix"]
    centre_ijk = np.array([5.0, 17.0, 9.0])
    slice_to_ras[:3, 3] = volume_world[:3, :3] @ centre_ijk + volume_world[:3, 3]
    slice_node.GetSliceToRAS().DeepCopy(vtkMatrixFromArray(slice_to_ras))
    slice_node.UpdateMatrices()
    assert logic.sliceAxisForSliceNode(coronal, slice_node) == 1
    assert logic.sliceIndexForSliceNode(coronal, slice_node, 1) == 17


def test_box_roi_becomes_inclusive_voxel_corners_on_its_slice(scene):
    logic = MedSAM2SlicerLogic(engine=LocalEngineClient(predictor_loader=lambda *a: None))
    matrix = CASES["lps"]["matrix"]
    volume = scene.add_volume(matrix)
    roi = scene.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    # Edges exactly on the voxel edges of i 4..20, j 6..30, on slice k = 9 (thin along k).
    lo = matrix[:3, :3] @ np.array([3.5, 5.5, 9.0]) + matrix[:3, 3]
    hi = matrix[:3, :3] @ np.array([20.5, 30.5, 9.0]) + matrix[:3, 3]
    roi.SetCenter(*((lo + hi) / 2))
    roi.SetSize(*np.abs(hi - lo))
    a, b = logic.roiBoxIjk(volume, roi, axis=2)
    np.testing.assert_allclose(a, [4, 6, 9])
    np.testing.assert_allclose(b, [20, 30, 9])
    assert logic.voxelAxisForRoi(volume, roi) == 2  # thin along k: drawn in an axial view

    # The same box drawn in a coronal view of the coronally acquired volume: thin along its k axis.
    coronal = scene.add_volume(CASES["coronal"]["matrix"])
    roi.SetSize(30.0, 0.0, 40.0)
    assert logic.voxelAxisForRoi(coronal, roi) == 2
    roi.SetSize(30.0, 40.0, 0.0)  # axial
    assert logic.voxelAxisForRoi(coronal, roi) == 1


# --------------------------------------------------------------------------- writing rules


VIEWS = [("lps", "axial"), ("lps", "sagittal"), ("coronal", "axial"), ("oblique", "coronal")]


@pytest.mark.parametrize("name,view", VIEWS)
def test_painted_slice_as_mask_prompt_lands_in_place(name, view, scene, engine):
    case = CASES[name]
    volume = scene.add_volume(case["matrix"])
    logic = MedSAM2SlicerLogic(engine)
    segmentation = logic.createSegmentationNode(volume)
    segment = logic.addSegment(segmentation, volume, "organ")
    axis = logic.voxelAxisForView(volume, view)
    s = SHAPE[2 - axis] // 2
    painted = np.zeros(SHAPE, np.uint8)
    frame = np.moveaxis(painted, 2 - axis, 0)[s]
    rows, cols = frame.shape
    frame[rows // 4 : 3 * rows // 4, cols // 4 : cols // 2] = 1  # an L: a flip or transpose would not match
    frame[rows // 4 : rows // 2, cols // 2 : 3 * cols // 4] = 1
    scene.paint(segmentation, segment, volume, painted)

    mask = logic.segmentSliceMask(segmentation, segment, volume, axis, s)
    np.testing.assert_array_equal(mask, frame)
    prompts = logic.collectPrompts(volume, axis, maskSlices={s: mask})
    # A few slices around the painted one are enough to check placement (and keep the test quick).
    request = PropagationRequest(sliceRange=(s - 3, s + 3))
    run = logic.prepareRun(volume, segmentation, segment, _options(axis), prompts, request)
    worker, written, failures = _run(logic, run)
    assert worker.state == WorkerState.DONE, failures
    assert written == (s - 3, s + 3)

    result = np.moveaxis(scene.read(segmentation, segment, volume), 2 - axis, 0)[s]
    engine_slice = np.moveaxis(engine.fetch_mask(run.handle.sessionId, run.objectId), 2 - axis, 0)[s]
    np.testing.assert_array_equal(result, engine_slice)
    overlap = np.logical_and(result, frame).sum() / np.logical_or(result, frame).sum()
    assert overlap > 0.9, f"mask prompt came back misplaced (IoU {overlap:.2f})"


def test_refinement_replaces_only_the_propagated_range(scene, engine):
    volume = scene.add_volume(CASES["oblique"]["matrix"])
    logic = MedSAM2SlicerLogic(engine)
    segmentation = logic.createSegmentationNode(volume)
    segment = logic.addSegment(segmentation, volume)
    old = np.zeros(SHAPE, np.uint8)
    old[:, 2:6, 30:34] = 1  # earlier content on every slice, away from where the model will draw
    scene.paint(segmentation, segment, volume, old)
    axis = 2
    world = CASES["oblique"]["matrix"]
    click = world[:3, :3] @ np.array([15.0, 18.0, 10.0]) + world[:3, 3]
    prompts = logic.collectPrompts(volume, axis, positiveNode=scene.add_points(click))

    run = logic.prepareRun(
        volume, segmentation, segment, _options(axis), prompts, PropagationRequest(sliceRange=(6, 15))
    )
    worker, written, failures = _run(logic, run)
    assert worker.state == WorkerState.DONE, failures
    assert written == (6, 15)
    after_first = scene.read(segmentation, segment, volume)
    np.testing.assert_array_equal(_outside(after_first, axis, 6, 15), _outside(old, axis, 6, 15))
    np.testing.assert_array_equal(
        _slab(after_first, axis, 6, 15),
        _slab(engine.fetch_mask(run.handle.sessionId, run.objectId), axis, 6, 15),
    )

    # A correction on slice 13, propagated forward to slice 19, owns slices 10..19 only (forward from the
    # object's first prompted slice in range); everything else stays as the first run left it.
    click2 = world[:3, :3] @ np.array([20.0, 25.0, 13.0]) + world[:3, 3]
    negative = scene.add_points(click2, name="negative")
    prompts2 = logic.collectPrompts(volume, axis, negativeNode=negative)
    run2 = logic.prepareRun(
        volume, segmentation, segment, _options(axis), prompts2, PropagationRequest("forward", (10, 19))
    )
    assert run2.volume is None, "the engine session (and its feature cache) should be reused"
    worker, written2, failures = _run(logic, run2)
    assert worker.state == WorkerState.DONE, failures
    assert written2 == (10, 19)
    after_second = scene.read(segmentation, segment, volume)
    np.testing.assert_array_equal(_outside(after_second, axis, 10, 19), _outside(after_first, axis, 10, 19))
    np.testing.assert_array_equal(
        _slab(after_second, axis, 10, 19),
        _slab(engine.fetch_mask(run2.handle.sessionId, run2.objectId), axis, 10, 19),
    )


def test_propagating_one_segment_never_changes_another(scene, engine):
    volume = scene.add_volume(CASES["lps"]["matrix"])
    logic = MedSAM2SlicerLogic(engine)
    segmentation = logic.createSegmentationNode(volume)
    finished = logic.addSegment(segmentation, volume, "liver")
    target = logic.addSegment(segmentation, volume, "tumour")
    liver = np.zeros(SHAPE, np.uint8)
    liver[4:20, 8:32, 6:30] = 1  # a large finished segment under where the new one will be drawn
    scene.paint(segmentation, finished, volume, liver)
    before = scene.read(segmentation, finished, volume)
    np.testing.assert_array_equal(before, liver)

    painted = np.zeros(SHAPE, np.uint8)
    painted[12, 14:26, 12:24] = 1  # overlaps the liver
    scene.paint(segmentation, target, volume, painted)
    np.testing.assert_array_equal(scene.read(segmentation, finished, volume), liver)
    mask = logic.segmentSliceMask(segmentation, target, volume, 2, 12)
    run = logic.prepareRun(
        volume, segmentation, target, _options(2), PromptBundle(masks={12: mask}), PropagationRequest()
    )
    worker, _, failures = _run(logic, run)
    assert worker.state == WorkerState.DONE, failures
    new = scene.read(segmentation, target, volume)
    assert np.logical_and(new, liver).any(), "test needs the new segment to overlap the finished one"
    np.testing.assert_array_equal(scene.read(segmentation, finished, volume), liver)
    assert run.objectId != logic.objectIdFor(segmentation, finished)


def test_segments_sharing_a_labelmap_layer_are_read_and_written_separately(scene):
    volume = scene.add_volume(CASES["coronal"]["matrix"])
    logic = MedSAM2SlicerLogic(engine=LocalEngineClient(predictor_loader=lambda *a: None))
    segmentation = logic.createSegmentationNode(volume)
    first, second = logic.addSegment(segmentation, volume), logic.addSegment(segmentation, volume)
    a = np.zeros(SHAPE, np.uint8)
    a[2:10, 5:15, 5:15] = 1
    b = np.zeros(SHAPE, np.uint8)
    b[12:20, 20:30, 20:30] = 1
    scene.paint(segmentation, first, volume, a)
    scene.paint(segmentation, second, volume, b)
    layers = segmentation.GetSegmentation()
    layers.CollapseBinaryLabelmaps(False)  # what Slicer does to save memory: one layer, two label values
    assert layers.GetLayerIndex(first) == layers.GetLayerIndex(second), (
        "disjoint segments should share a layer"
    )
    np.testing.assert_array_equal(logic.segmentArray(segmentation, first, volume), a)
    np.testing.assert_array_equal(logic.segmentArray(segmentation, second, volume), b)
    np.testing.assert_array_equal(logic.segmentSliceMask(segmentation, second, volume, 2, 15), b[15])

    c = np.zeros(SHAPE, np.uint8)
    c[:, 30:35, 0:4] = 1  # replaces the second segment everywhere
    logic.writeSegmentRange(segmentation, second, volume, c, 1, 0, SHAPE[1] - 1)
    np.testing.assert_array_equal(scene.read(segmentation, second, volume), c)
    np.testing.assert_array_equal(scene.read(segmentation, first, volume), a)


def test_undo_restores_the_segment_before_each_propagation(scene, engine):
    volume = scene.add_volume(CASES["lps"]["matrix"])
    logic = MedSAM2SlicerLogic(engine)
    segmentation = logic.createSegmentationNode(volume)
    segment = logic.addSegment(segmentation, volume)
    other = logic.addSegment(segmentation, volume)
    original = np.zeros(SHAPE, np.uint8)
    original[3:21, 5:9, 5:9] = 1
    scene.paint(segmentation, segment, volume, original)
    other_content = np.zeros(SHAPE, np.uint8)
    other_content[:, 30:35, 2:6] = 1
    scene.paint(segmentation, other, volume, other_content)

    painted = np.zeros(SHAPE, np.uint8)
    painted[10, 12:28, 10:26] = 1
    scene.paint(segmentation, segment, volume, np.maximum(original, painted))
    before_first = scene.read(segmentation, segment, volume)
    mask = logic.segmentSliceMask(segmentation, segment, volume, 2, 10)
    run = logic.prepareRun(
        volume, segmentation, segment, _options(2), PromptBundle(masks={10: mask}), PropagationRequest()
    )
    assert _run(logic, run)[0].state == WorkerState.DONE
    after_first = scene.read(segmentation, segment, volume)
    assert not np.array_equal(after_first, before_first)

    # A second step: a preview of a click, then a propagation. One undo removes both.
    world = CASES["lps"]["matrix"]
    click = world[:3, :3] @ np.array([18.0, 20.0, 16.0]) + world[:3, 3]
    prompts = logic.collectPrompts(volume, 2, positiveNode=scene.add_points(click))
    preview = logic.prepareRun(volume, segmentation, segment, _options(2), prompts, None)
    assert _run(logic, preview)[0].state == WorkerState.DONE
    run2 = logic.prepareRun(
        volume, segmentation, segment, _options(2), PromptBundle(), PropagationRequest("forward")
    )
    assert _run(logic, run2)[0].state == WorkerState.DONE
    after_second = scene.read(segmentation, segment, volume)

    assert logic.undo(segmentation)
    np.testing.assert_array_equal(scene.read(segmentation, segment, volume), after_first)
    assert logic.undo(segmentation)
    np.testing.assert_array_equal(scene.read(segmentation, segment, volume), before_first)
    assert not logic.undo(segmentation)
    assert logic.redo(segmentation)
    np.testing.assert_array_equal(scene.read(segmentation, segment, volume), after_first)
    assert logic.redo(segmentation)
    np.testing.assert_array_equal(scene.read(segmentation, segment, volume), after_second)
    np.testing.assert_array_equal(scene.read(segmentation, other, volume), other_content)


# --------------------------------------------------------------------------- worker, cancel, failure


def test_cancel_mid_propagation_leaves_the_segment_unchanged(scene, engine):
    volume = scene.add_volume(CASES["lps"]["matrix"])
    logic = MedSAM2SlicerLogic(engine)
    segmentation = logic.createSegmentationNode(volume)
    segment = logic.addSegment(segmentation, volume)
    content = np.zeros(SHAPE, np.uint8)
    content[8:16, 10:30, 10:30] = 1
    scene.paint(segmentation, segment, volume, content)
    mask = logic.segmentSliceMask(segmentation, segment, volume, 2, 12)

    reached, proceed = threading.Event(), threading.Event()

    def hold_after_third_slice(done, total):
        if done == 3:
            reached.set()
            proceed.wait(60)

    engine.progress_hook = hold_after_third_slice
    results, states = [], []
    worker = BackgroundWorker(on_result=results.append, on_state=states.append)
    run = logic.prepareRun(
        volume, segmentation, segment, _options(2), PromptBundle(masks={12: mask}), PropagationRequest()
    )
    worker.start(run)
    assert reached.wait(120)
    worker.drain()
    assert worker.state == WorkerState.PROPAGATING and worker.progress[0] == 3
    assert worker.cancel()
    assert worker.state == WorkerState.CANCELLING
    proceed.set()
    assert worker.wait(120)
    assert not worker.drain()
    assert worker.state == WorkerState.CANCELLED
    assert results == []
    assert states == [
        WorkerState.PREPARING,
        WorkerState.PROPAGATING,
        WorkerState.CANCELLING,
        WorkerState.CANCELLED,
    ]
    np.testing.assert_array_equal(scene.read(segmentation, segment, volume), content)
    assert not logic.canUndo(segmentation)


def test_a_failed_run_reports_one_line_and_leaves_the_segment_unchanged(scene, engine):
    volume = scene.add_volume(CASES["lps"]["matrix"])
    logic = MedSAM2SlicerLogic(engine)
    segmentation = logic.createSegmentationNode(volume)
    segment = logic.addSegment(segmentation, volume)
    content = np.zeros(SHAPE, np.uint8)
    content[8:16, 10:30, 10:30] = 1
    scene.paint(segmentation, segment, volume, content)

    def fail_midway(done, total):
        if done == 5:
            raise RuntimeError("CUDA error: device-side assert triggered\nlong trace")

    engine.progress_hook = fail_midway
    mask = logic.segmentSliceMask(segmentation, segment, volume, 2, 12)
    run = logic.prepareRun(
        volume, segmentation, segment, _options(2), PromptBundle(masks={12: mask}), PropagationRequest()
    )
    worker, written, failures = _run(logic, run)
    assert worker.state == WorkerState.FAILED
    assert failures == ["unexpected error (RuntimeError): CUDA error: device-side assert triggered"]
    assert written is None
    np.testing.assert_array_equal(scene.read(segmentation, segment, volume), content)


def test_engine_errors_reach_the_panel_as_their_own_one_line_message(scene, engine):
    volume = scene.add_volume(CASES["lps"]["matrix"])
    logic = MedSAM2SlicerLogic(engine)
    segmentation = logic.createSegmentationNode(volume)
    segment = logic.addSegment(segmentation, volume)
    world = CASES["lps"]["matrix"]
    negative_only = scene.add_points(
        world[:3, :3] @ np.array([5.0, 5.0, 5.0]) + world[:3, 3], name="negative"
    )
    prompts = logic.collectPrompts(volume, 2, negativeNode=negative_only)
    run = logic.prepareRun(volume, segmentation, segment, _options(2), prompts, PropagationRequest())
    worker, _, failures = _run(logic, run)
    assert worker.state == WorkerState.FAILED
    assert failures == [
        f"slice 5 of object {run.objectId} has only negative points and no mask to correct; "
        "add a positive point or a box"
    ]


def test_worker_state_machine():
    events = []
    worker = BackgroundWorker(on_state=events.append, on_progress=lambda d, t: events.append((d, t)))
    assert worker.state == WorkerState.IDLE and not worker.cancel()
    gate = threading.Event()

    def job(context):
        context.phase(WorkerState.PROPAGATING)
        for n in range(1, 4):
            context.progress(n, 3)
        gate.wait(30)
        return "result"

    worker.start(job)
    with pytest.raises(WorkerStateError):
        worker.start(job)
    gate.set()
    assert worker.wait(30)
    assert not worker.drain()
    # Progress is coalesced to the latest value before the result is delivered.
    assert events == [WorkerState.PREPARING, WorkerState.PROPAGATING, (3, 3), WorkerState.DONE]
    assert worker.result == "result"

    # A result that arrives after Cancel is discarded.
    gate2 = threading.Event()
    worker.start(lambda context: gate2.wait(30) and "late")
    worker.cancel()
    gate2.set()
    worker.wait(30)
    worker.drain()
    assert worker.state == WorkerState.CANCELLED and worker.result is None
    worker.reset()
    assert worker.state == WorkerState.IDLE
    with pytest.raises(WorkerStateError):
        worker._set_state(WorkerState.DONE)  # idle -> done skips the run


def test_cancel_before_the_job_starts_working(scene, engine):
    volume = scene.add_volume(CASES["lps"]["matrix"])
    logic = MedSAM2SlicerLogic(engine)
    segmentation = logic.createSegmentationNode(volume)
    segment = logic.addSegment(segmentation, volume)
    world = CASES["lps"]["matrix"]
    prompts = logic.collectPrompts(
        volume, 2, positiveNode=scene.add_points(world[:3, :3] @ [10, 12, 8] + world[:3, 3])
    )
    run = logic.prepareRun(volume, segmentation, segment, _options(2), prompts, PropagationRequest())
    gate = threading.Event()
    worker = BackgroundWorker()
    worker.start(lambda context: (gate.wait(30), run(context))[1])
    worker.cancel()
    gate.set()
    assert worker.wait(120)
    worker.drain()
    assert worker.state == WorkerState.CANCELLED
    assert engine.sent == [], "a cancelled run must not send prompts"
    assert not scene.read(segmentation, segment, volume).any()


# --------------------------------------------------------------------------- logic edge cases


def test_written_range_covers_the_rest_of_a_direction_that_stopped():
    logic = MedSAM2SlicerLogic(engine=LocalEngineClient(predictor_loader=lambda *a: None))
    outcome = PropagationOutcome(
        masks={1: np.zeros(SHAPE, np.uint8)},
        propagated={1: (8, 14)},
        stopped_early={1: ["forward"]},
        axis=2,
        num_slices=24,
    )
    assert logic.writtenRange(outcome, 1, PropagationRequest()) == (8, 23)
    assert logic.writtenRange(outcome, 1, PropagationRequest(sliceRange=(4, 18))) == (8, 18)
    outcome.stopped_early = {1: ["forward", "backward"]}
    assert logic.writtenRange(outcome, 1, PropagationRequest(sliceRange=(4, 18))) == (4, 18)
    outcome.stopped_early = {}
    assert logic.writtenRange(outcome, 1, PropagationRequest()) == (8, 14)


def test_user_errors_are_one_clear_line(scene):
    from medsam2.errors import MedSAM2Error

    logic = MedSAM2SlicerLogic(engine=LocalEngineClient(predictor_loader=lambda *a: None))
    volume = scene.add_volume(CASES["lps"]["matrix"])
    segmentation = logic.createSegmentationNode(volume)
    segment = logic.addSegment(segmentation, volume, "empty")

    outside = scene.add_points([500.0, 500.0, 500.0])
    with pytest.raises(
        MedSAM2Error, match=r"^a point of 'positive' at RAS \(500.0, 500.0, 500.0\) is outside volume 'CT'"
    ):
        logic.controlPointsIjk(volume, outside)
    with pytest.raises(MedSAM2Error, match="segment 'empty' is empty on slice 3; paint it"):
        logic.segmentSliceMask(segmentation, segment, volume, 2, 3)
    with pytest.raises(MedSAM2Error, match="no prompts"):
        logic.prepareRun(volume, segmentation, segment, _options(2), PromptBundle(), PropagationRequest())

    grid = scene.scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    volume.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(MedSAM2Error, match="non-linear transform .*harden the transform"):
        logic.volumeGeometry(volume)
    for message in ("no source volume selected",):
        with pytest.raises(MedSAM2Error, match=message):
            logic.volumeGeometry(None)


def test_new_segments_get_distinct_colours_and_a_terminology(scene):
    logic = MedSAM2SlicerLogic(engine=LocalEngineClient(predictor_loader=lambda *a: None))
    volume = scene.add_volume(CASES["lps"]["matrix"])
    segmentation = logic.createSegmentationNode(volume)
    ids = [logic.addSegment(segmentation, volume) for _ in range(3)]
    segments = [segmentation.GetSegmentation().GetSegment(i) for i in ids]
    assert len({tuple(s.GetColor()) for s in segments}) == 3
    assert all("SCT^85756007^Tissue" in s.GetTerminology() for s in segments)
    assert [s.GetName() for s in segments] == ["Segment_1", "Segment_2", "Segment_3"]


def test_export_to_seg_nrrd_reads_back_with_names_colours_and_voxels(scene, tmp_path, monkeypatch):
    volume = scene.add_volume(CASES["oblique"]["matrix"])
    logic = MedSAM2SlicerLogic(engine=LocalEngineClient(predictor_loader=lambda *a: None))
    segmentation = logic.createSegmentationNode(volume)
    liver = logic.addSegment(segmentation, volume, "liver", color=(0.8, 0.3, 0.2))
    lesion = logic.addSegment(segmentation, volume, "lesion", color=(0.1, 0.7, 0.9))
    a = np.zeros(SHAPE, np.uint8)
    a[4:18, 6:30, 5:25] = 1
    b = np.zeros(SHAPE, np.uint8)
    b[9:13, 14:20, 10:16] = 1  # inside the liver: two layers
    logic.writeSegmentRange(segmentation, liver, volume, a, 2, 0, SHAPE[0] - 1)
    logic.writeSegmentRange(segmentation, lesion, volume, b, 2, 0, SHAPE[0] - 1)
    path = tmp_path / "result.seg.nrrd"
    logic.exportSegmentation(segmentation, str(path))
    assert sorted(os.listdir(tmp_path)) == ["result.seg.nrrd"], "no temporary file may be left behind"

    reread_scene = Scene(monkeypatch)
    volume2 = reread_scene.add_volume(CASES["oblique"]["matrix"])
    loaded = reread_scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = reread_scene.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(loaded)
    seg = loaded.GetSegmentation()
    by_name = {
        seg.GetNthSegment(n).GetName(): seg.GetNthSegmentID(n) for n in range(seg.GetNumberOfSegments())
    }
    assert sorted(by_name) == ["lesion", "liver"]
    np.testing.assert_allclose(seg.GetSegment(by_name["liver"]).GetColor(), (0.8, 0.3, 0.2), atol=1e-6)
    np.testing.assert_allclose(seg.GetSegment(by_name["lesion"]).GetColor(), (0.1, 0.7, 0.9), atol=1e-6)
    assert "Tissue" in seg.GetSegment(by_name["liver"]).GetTerminology()
    np.testing.assert_array_equal(logic.segmentArray(loaded, by_name["liver"], volume2), a)
    np.testing.assert_array_equal(reread_scene.read(loaded, by_name["lesion"], volume2), b)

    with pytest.raises(Exception, match=r"must end in \.seg\.nrrd"):
        logic.exportSegmentation(segmentation, str(tmp_path / "result.nrrd"))


# --------------------------------------------------------------------------- engine client


def test_engine_client_groups_prompts_per_slice(predictor):
    engine = LocalEngineClient(predictor_loader=lambda *a: predictor)
    volume = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    session_id = engine.create_session(volume, None, _options(2))
    points = np.array([[10, 12, 4.2], [11, 13, 3.8], [20, 20, 9.0], [21, 22, 9.1]])
    labels = np.array([1, 1, 1, 0])
    box = (np.array([8.0, 8.0, 9.0]), np.array([25.0, 30.0, 9.0]))
    previews = engine.add_prompts(session_id, 1, PromptBundle(points_ijk=points, labels=labels, boxes=[box]))
    assert sorted(p.slice_index for p in previews) == [4, 9]
    assert all(p.mask.shape == SHAPE[1:] for p in previews)
    session = engine.session(session_id)
    slice_prompts = session._prompts[1]
    assert slice_prompts[9].box is not None and slice_prompts[9].labels == [1, 0]
    assert slice_prompts[4].labels == [1, 1]
    with pytest.raises(Exception, match="two boxes on slice 9"):
        engine.add_prompts(session_id, 1, PromptBundle(boxes=[box, box]))
    engine.close_session(session_id)
    assert not engine.has_session(session_id)


@contextlib.contextmanager
def _serve(app):
    """The inference server app on a free loopback port, in a thread (as ``medsam2 serve`` runs it)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(1500):
            if server.started or not thread.is_alive():
                break
            threading.Event().wait(0.02)
        assert server.started, "the inference server did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def test_remote_engine_puts_the_same_voxels_in_the_segment_as_the_local_one(scene, predictor):
    create_app = pytest.importorskip(
        "medsam2.server.app", reason="no inference server (medsam2.server) here"
    ).create_app
    settings = pytest.importorskip("medsam2.server.settings", reason="no inference server here")
    pytest.importorskip("uvicorn", reason="uvicorn (the server's HTTP runtime) is not installed")
    from MedSAM2SlicerLib.engine_client import RemoteEngineClient

    token = secrets.token_urlsafe(32)
    app = create_app(
        settings.ServerSettings(token=token, models=("tiny-test",), memory_budget_bytes=256 << 20),
        lambda name: predictor,
    )
    volume = scene.add_volume(CASES["oblique"]["matrix"])
    world = CASES["oblique"]["matrix"]
    points = scene.add_points(world[:3, :3] @ np.array([15.0, 18.0, 10.0]) + world[:3, 3])
    options = SessionOptions(model="tiny-test", device="cpu", intensity="abdomen", axis=2)
    segments = []
    with _serve(app) as url:
        for engine in (
            LocalEngineClient(predictor_loader=lambda *a: predictor),
            RemoteEngineClient(url, token),
        ):
            logic = MedSAM2SlicerLogic(engine)
            segmentation = logic.createSegmentationNode(volume)
            segment = logic.addSegment(segmentation, volume)
            prompts = logic.collectPrompts(volume, 2, positiveNode=points)
            run = logic.prepareRun(
                volume, segmentation, segment, options, prompts, PropagationRequest(sliceRange=(4, 16))
            )
            worker, written, failures = _run(logic, run)
            assert worker.state == WorkerState.DONE, failures
            assert written == (4, 16)
            segments.append(scene.read(segmentation, segment, volume))
            logic.closeSession()
            assert not engine.has_session(run.handle.sessionId)
        with pytest.raises(Exception, match="no server token"):
            RemoteEngineClient(url, " ")
    np.testing.assert_array_equal(segments[1], segments[0])


# --------------------------------------------------------------------------- dependencies


def test_requirements_file_parses_and_agrees_with_pyproject():
    requirements = {r.name: r for r in dependencies.read_requirements()}
    assert {"torch", "torchvision", "sam2", "numpy", "SimpleITK", "huggingface_hub", "pillow"} <= set(
        requirements
    )
    assert requirements["pillow"].import_name == "PIL"
    pyproject = (ROOT / "pyproject.toml").read_text()
    for req in requirements.values():
        assert f'"{req}"' in pyproject, f"{req} differs from pyproject.toml's dependencies"


def test_installer_detects_missing_modules_and_builds_the_pip_command():
    reqs = dependencies.read_requirements()
    present = {
        "numpy": "1.26.4",
        "SimpleITK": "2.3.1",
        "huggingface_hub": "0.20.0",
        "pillow": "10.0.0",
        "tqdm": "4.66.1",
    }
    imports = {r.import_name: r.name for r in reqs}

    plan = dependencies.plan_installation(
        reqs, module_present=lambda m: imports[m] in present, installed_version=present.get
    )
    assert [r.name for r in plan.torch] == ["torch", "torchvision"]
    assert [r.name for r in plan.pip] == ["sam2", "huggingface_hub"]  # missing, and too old (0.20 < 0.23)
    assert "huggingface_hub 0.20.0 is installed but >=0.23 is needed" in plan.reasons
    assert plan.pip_command("/slicer/bin/python") == [
        "/slicer/bin/python",
        "-m",
        "pip",
        "install",
        "--no-build-isolation",
        "sam2>=1.1.0,<2",
        "huggingface_hub>=0.23",
    ]
    assert "torch" not in " ".join(plan.pip_arguments()), "torch must come from the PyTorch extension"

    calls = []
    plans = iter([plan, dependencies.InstallPlan()])
    assert not dependencies.ensure_dependencies(
        confirm=lambda message: calls.append(("confirm", message)) or False,
        install_torch=lambda r: calls.append("torch") or True,
        pip_install=lambda args: calls.append(("pip", args)),
        plan_function=lambda _: plan,
    )
    assert [c[0] for c in calls] == ["confirm"] and "sam2>=1.1.0,<2" in calls[0][1]
    calls.clear()
    assert dependencies.ensure_dependencies(
        confirm=lambda message: True,
        install_torch=lambda r: calls.append(("torch", [x.name for x in r])) or True,
        pip_install=lambda args: calls.append(("pip", args)),
        plan_function=lambda _: next(plans),
    )
    assert calls == [("torch", ["torch", "torchvision"]), ("pip", plan.pip_arguments())]
    with pytest.raises(
        dependencies.DependencyError, match="still missing after installation: sam2 is missing"
    ):
        dependencies.ensure_dependencies(
            confirm=lambda m: True,
            install_torch=lambda r: True,
            pip_install=lambda a: None,
            plan_function=lambda _: dependencies.InstallPlan(pip=plan.pip[:1], reasons=["sam2 is missing"]),
        )


def test_nothing_heavy_is_imported_before_the_dependency_check():
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import MedSAM2SlicerLib, MedSAM2SlicerLib.dependencies, MedSAM2SlicerLib.worker;"
        "MedSAM2SlicerLib.dependencies.plan_installation();"
        "heavy = [m for m in ('torch', 'sam2', 'medsam2', 'slicer') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code, str(MODULE_DIR)], check=True, timeout=120)


# --------------------------------------------------------------------------- the panel's files


def _module_source():
    return (MODULE_DIR / "MedSAM2Slicer.py").read_text(encoding="utf-8")


def test_module_compiles():
    compile(_module_source(), str(MODULE_DIR / "MedSAM2Slicer.py"), "exec")


def test_ui_file_is_well_formed_and_has_every_widget_the_module_uses():
    tree = ET.parse(MODULE_DIR / "Resources" / "UI" / "MedSAM2Slicer.ui")
    widgets = {w.get("name"): w.get("class") for w in tree.iter("widget")}
    assert len(widgets) == len(list(tree.iter("widget"))), "duplicate widget names in the .ui"
    used = {
        node.attr
        for node in ast.walk(ast.parse(_module_source()))
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "ui"
        and isinstance(node.value.value, ast.Name)
        and node.value.value.id == "self"
    }
    assert used, "the module does not look up any widget"
    assert not used - set(widgets), (
        f"widgets the module uses but the .ui lacks: {sorted(used - set(widgets))}"
    )

    # Widgets bound to the parameter node name a parameter that exists, through a widget class that
    # parameterNodeWrapper can connect to that parameter's type (a mismatch fails only inside Slicer).
    module = ast.parse(_module_source())
    wrapper = next(
        n
        for n in module.body
        if isinstance(n, ast.ClassDef)
        and any(isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in n.decorator_list)
    )
    annotations = {
        s.target.id: ast.unparse(s.annotation) for s in wrapper.body if isinstance(s, ast.AnnAssign)
    }
    bound = {}
    for widget in tree.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[widget.get("name")] = prop.find("string").text
    assert len(bound) >= 10, "most panel settings should be bound to the parameter node"
    for widget_name, parameter in bound.items():
        assert parameter in annotations, f"{widget_name} is bound to unknown parameter {parameter!r}"
        annotation, widget_class = annotations[parameter], widgets[widget_name]
        if "vtkMRML" in annotation:
            expected = {"qMRMLNodeComboBox"}
        elif "Choice" in annotation:
            expected = {"QComboBox"}
        elif annotation == "str":
            expected = {"QLineEdit"}
        elif annotation == "bool":
            expected = {"QCheckBox", "QPushButton"}
        else:
            assert "int" in annotation, annotation
            expected = {"QSpinBox"}
        assert widget_class in expected, (
            f"{widget_name} ({widget_class}) cannot show {parameter}: {annotation}"
        )


def test_cmake_lists_every_script_and_resource():
    module_cmake = (MODULE_DIR / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", "MedSAM2Slicer")
    scripts = ["MedSAM2Slicer.py"] + sorted(
        f"MedSAM2SlicerLib/{p.name}" for p in (MODULE_DIR / "MedSAM2SlicerLib").glob("*.py")
    )
    for script in scripts:
        assert script in module_cmake, f"{script} missing from MedSAM2Slicer/CMakeLists.txt"
    assert "medsam2" in module_cmake
    for resource in (
        "Resources/Icons/MedSAM2Slicer.png",
        "Resources/UI/MedSAM2Slicer.ui",
        "Resources/requirements.txt",
    ):
        assert resource in module_cmake and (MODULE_DIR / resource).is_file(), resource
    top = (ROOT / "CMakeLists.txt").read_text()
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in top and "PyTorch" in top
    s4ext = (ROOT / "MedSAM2Slicer.s4ext").read_text()
    assert "depends PyTorch" in s4ext and "category Segmentation" in s4ext


def test_panel_loads_a_local_fine_tuned_checkpoint(tiny_predictor, tmp_path):
    """The model selector accepts the path of a checkpoint `medsam2 finetune` wrote (self-describing)."""
    import torch

    from conftest import TEST_IMAGE_SIZE, TINY_21
    from MedSAM2SlicerLib.engine_client import default_predictor_loader

    path = tmp_path / "department.pt"
    torch.save({"model": tiny_predictor.state_dict(), "config": TINY_21, "image_size": TEST_IMAGE_SIZE}, path)
    loaded = default_predictor_loader(str(path), "cpu")
    assert loaded.image_size == TEST_IMAGE_SIZE
    for key, value in tiny_predictor.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
