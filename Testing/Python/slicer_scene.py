"""Shared by the test_slicer_* files: a real MRML scene from ``slicer-core``, volumes with DICOM-like
geometry, markups, slice views, and reading segments back through Slicer's own export (independent of
the panel's code). The model is the conftest's SAM2 tiny with random weights at 128 px: its masks are
arbitrary, so tests check where masks go and what is left untouched, never how good they are."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "MedSAM2Slicer"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from MedSAM2SlicerLib.engine_client import LocalEngineClient  # noqa: E402
from MedSAM2SlicerLib.geometry import vtkMatrixFromArray  # noqa: E402

SHAPE = (24, 40, 36)  # [k, j, i]
LPS = np.diag([-1.0, -1.0, 1.0])
TEST_MODEL = "random-weights:configs/sam2.1/sam2.1_hiera_t.yaml@128"


def ijk_to_ras(columns, spacing, origin):
    m = np.eye(4)
    m[:3, :3] = np.asarray(columns, float) @ np.diag(spacing)
    m[:3, 3] = origin
    return m


AXIAL_CT = ijk_to_ras(LPS, (0.7, 0.8, 2.5), (110.0, 95.0, -40.0))


def register_converters() -> None:
    # Slicer registers these at start-up; a bare slicer-core process must do it once.
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    for rule in (
        slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
        slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
    ):
        factory.RegisterConverterRule(rule())


register_converters()


class Scene:
    """A fresh MRML scene plus what ``slicer.util``'s segment helpers expect."""

    def __init__(self, monkeypatch):
        self.scene = slicer.vtkMRMLScene()
        self.segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
        self.segmentations_logic.SetMRMLScene(self.scene)
        monkeypatch.setattr(slicer, "mrmlScene", self.scene, raising=False)
        modules = types.SimpleNamespace(segmentations=types.SimpleNamespace(logic=lambda: self.segmentations_logic))
        monkeypatch.setattr(slicer, "modules", modules, raising=False)

    def add_volume(self, matrix=AXIAL_CT, name="CT", shape=SHAPE, voxels=None):
        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        image = vtk.vtkImageData()
        image.SetDimensions(shape[2], shape[1], shape[0])
        image.AllocateScalars(vtk.VTK_SHORT, 1)
        array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape)
        if voxels is None:
            k, j, i = np.indices(shape)
            blob = ((k - 12) / 7.0) ** 2 + ((j - 18) / 10.0) ** 2 + ((i - 15) / 9.0) ** 2 < 1
            voxels = np.where(blob, 180, -90) + np.random.default_rng(1).integers(-20, 20, shape)
        array[:] = voxels
        node.SetAndObserveImageData(image)
        node.SetIJKToRASMatrix(vtkMatrixFromArray(matrix))
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.AutoWindowLevelOff()
        display.SetWindowLevel(400, 40)
        return node

    def world(self, volume, ijk):
        matrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(matrix)
        m = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        return m[:3, :3] @ np.asarray(ijk, float) + m[:3, 3]

    def points_node(self, name="positive"):
        return self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)

    def slice_node(self, orientation="Axial", name="Red"):
        """A slice view's node showing ``orientation`` (as the Red, Yellow or Green view)."""
        if not getattr(self, "_presets", False):  # Slicer's application logic adds these at start-up
            slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(self.scene)
            self._presets = True
        node = self.scene.AddNewNodeByClass("vtkMRMLSliceNode", name)
        node.SetLayoutName(name)
        node.SetOrientation(orientation)
        return node

    def show_slice(self, slice_node, volume, ijk):
        """Move the view so its plane goes through voxel ``ijk`` (as scrolling to that slice does)."""
        centre = self.world(volume, ijk)
        slice_node.JumpSliceByOffsetting(*centre)
        slice_node.UpdateMatrices()

    @staticmethod
    def read(segmentation, segment_id, volume):
        """The segment on the volume's grid, through Slicer's own export (independent of the panel)."""
        return (slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume) > 0).astype(np.uint8)


class RecordingEngine(LocalEngineClient):
    """The real in-process engine with the test model, remembering what the panel sent it."""

    def __init__(self, predictor):
        super().__init__(predictor_loader=lambda model, device, progress: predictor)
        self.sent = []
        self.previews = []
        self.created = 0

    def create_session(self, *args, **kwargs):
        self.created += 1
        return super().create_session(*args, **kwargs)

    def add_prompts(self, session_id, object_id, prompts):
        self.sent.append((object_id, prompts))
        previews = super().add_prompts(session_id, object_id, prompts)
        self.previews.append(previews)
        return previews

    def open_sessions(self):
        with self._lock:
            return len(self._sessions)
