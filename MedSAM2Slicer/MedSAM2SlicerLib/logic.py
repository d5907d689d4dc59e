"""The MRML side of MedSAM2Slicer: volume and markups in, segment voxels out, with exact geometry.

Only MRML is used here (no Qt, no ``slicer.app``, no ``slicer.mrmlScene``), so it runs in Slicer and
against the ``slicer-core`` package in tests. Slicer-facing names keep Slicer's camelCase.

Geometry conventions
- The engine works on the source volume's own voxel grid: ``arrayFromVolume`` order [k, j, i] and a
  medsam2.geometry.VolumeGeometry built from the volume's IJK-to-world matrix (its IJKToRAS with any
  linear parent transform applied). Prompts are mapped world RAS -> (i, j, k) through that matrix,
  so a click at a voxel centre arrives as that voxel's exact integer index.
- Masks come back on that same grid and are written into the segment through a vtkOrientedImageData
  carrying the same matrix (expressed in the segmentation node's own frame, in case the segmentation
  is transformed). When the segmentation's reference geometry is the volume's, which is how
  :meth:`MedSAM2SlicerLogic.createSegmentationNode` makes it, no resampling happens: each engine
  voxel is exactly one segment voxel.
- Non-linear transforms cannot be expressed as one matrix: they are refused with a message asking
  the user to harden them.

Writing rules
- A propagation replaces the segment's voxels only in the slices it visited (plus the rest of a
  direction that stopped because the object ended); other slices keep what the user had.
- Only the target segment is written. Overlapping segments are separated by Slicer into another
  labelmap layer instead of being overwritten.
- Each propagation is one undo step: the slab it replaced is kept (bit-packed) and restored by
  :meth:`MedSAM2SlicerLogic.undo`. Prompt previews written before the propagation belong to that
  same step.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from medsam2.errors import InvalidPromptError, InvalidVolumeError, MedSAM2Error
from medsam2.geometry import VolumeGeometry

from .engine_client import (
    EngineClient,
    LocalEngineClient,
    PromptBundle,
    PropagationOutcome,
    SessionOptions,
    SlicePreview,
)
from .worker import JobContext, WorkerState

logger = logging.getLogger(__name__)

# "General Anatomy / Tissue" (SNOMED CT 85756007): Slicer's default for a new segment. DICOM-SEG
# export needs a category and type on every segment.
DEFAULT_TERMINOLOGY = (
    "Segmentation category and type - 3D Slicer General Anatomy list",
    ("85756007", "SCT", "Tissue"),  # category (code value, coding scheme, meaning)
    ("85756007", "SCT", "Tissue"),  # type
)
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"

# Distinct colours for new segments, chosen to stay visible on grey CT/MR.
SEGMENT_COLORS = (
    (0.95, 0.40, 0.25),
    (0.30, 0.75, 0.35),
    (0.25, 0.55, 0.95),
    (0.95, 0.80, 0.20),
    (0.75, 0.35, 0.85),
    (0.20, 0.80, 0.80),
    (0.95, 0.55, 0.70),
    (0.60, 0.45, 0.25),
)

UNDO_DEPTH = 20  # per segmentation node; each step holds one bit per voxel of the slab it replaced


# --------------------------------------------------------------------------- small helpers
def arrayFromVtkMatrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def vtkMatrixFromArray(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def nodeToWorldMatrix(node: Any, what: str) -> np.ndarray:
    """The 4x4 matrix of the node's parent transforms; refuses non-linear ones."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise InvalidVolumeError(
            f"{what} {node.GetName()!r} is under the non-linear transform {parent.GetName()!r}; "
            "harden the transform (Data module) first"
        )
    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(matrix)
    return arrayFromVtkMatrix(matrix)


def slabIndex(axis: int, lo: int, hi: int) -> tuple[slice, ...]:
    """numpy index of slices lo..hi (inclusive) along voxel axis ``axis`` of a [k, j, i] array."""
    index = [slice(None)] * 3
    index[2 - axis] = slice(lo, hi + 1)
    return tuple(index)


def _imageToArray(image: vtk.vtkImageData) -> np.ndarray:
    dims = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])


def _isEmptyImage(image: Any) -> bool:
    extent = image.GetExtent()
    return image.GetPointData().GetScalars() is None or any(
        extent[2 * a] > extent[2 * a + 1] for a in range(3)
    )


@dataclass
class PropagationRequest:
    direction: str = "both"  # "both", "forward" (increasing slice index) or "backward"
    sliceRange: Optional[tuple[int, int]] = None  # inclusive limits along the session axis
    stopWhenAbsent: Optional[int] = None  # end a direction after this many slices without the object


@dataclass
class _UndoRecord:
    segmentId: str
    volumeNode: Any
    axis: int
    lo: int
    hi: int
    shape: tuple[int, ...]  # of the slab
    packed: np.ndarray  # np.packbits of the slab's previous content

    @classmethod
    def capture(
        cls, segmentId: str, volumeNode: Any, axis: int, lo: int, hi: int, slab: np.ndarray
    ) -> _UndoRecord:
        return cls(segmentId, volumeNode, axis, lo, hi, slab.shape, np.packbits(slab.astype(bool), axis=None))

    def slab(self) -> np.ndarray:
        count = int(np.prod(self.shape))
        return np.unpackbits(self.packed, count=count).reshape(self.shape).astype(np.uint8)


@dataclass
class _PendingPreview:
    """Slices previewed since the segment's last propagation, as they were before their first preview."""

    volumeNode: Any
    slices: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)  # axis -> slice -> original


@dataclass
class _SessionHandle:
    """The engine session for one (volume, axis, intensity, model, device); reused across runs so that
    slice features stay cached and earlier prompts stay in the model's memory."""

    key: tuple
    axis: int
    numSlices: int
    sessionId: Optional[str] = None  # set by the worker thread once the engine has the volume
    objectIds: dict[tuple[str, str], int] = field(default_factory=dict)


@dataclass
class PreparedRun:
    """Everything a worker-thread job needs, copied out of MRML on the main thread.

    ``__call__`` runs on the worker thread and touches only the engine; the node references are used
    again only on the main thread, by :meth:`MedSAM2SlicerLogic.applyRun`.
    """

    engine: EngineClient
    handle: _SessionHandle
    options: SessionOptions
    objectId: int
    prompts: PromptBundle
    request: Optional[PropagationRequest]  # None: only show the prompt previews
    volumeNode: Any
    segmentationNode: Any
    segmentId: str
    volume: Optional[np.ndarray] = None  # only when the engine does not hold the volume yet
    geometry: Optional[VolumeGeometry] = None

    def __call__(self, context: JobContext) -> Union[PropagationOutcome, list[SlicePreview]]:
        context.phase(WorkerState.PREPARING)
        context.raise_if_cancelled()
        if not self.engine.has_session(self.handle.sessionId):
            if self.volume is None:
                raise InvalidPromptError("the engine lost its session; press Apply again")
            context.message(f"loading {self.options.model} and preparing the volume")
            self.handle.sessionId = self.engine.create_session(
                self.volume, self.geometry, self.options, progress=context.progress
            )
            self.volume = None  # the engine has its own copy; do not hold a second one
            context.raise_if_cancelled()
        assert self.handle.sessionId is not None
        previews: list[SlicePreview] = []
        if not self.prompts.is_empty():
            previews = self.engine.add_prompts(self.handle.sessionId, self.objectId, self.prompts)
        context.raise_if_cancelled()
        if self.request is None:
            return previews
        context.phase(WorkerState.PROPAGATING)
        return self.engine.propagate(
            self.handle.sessionId,
            [self.objectId],
            direction=self.request.direction,
            slice_range=self.request.sliceRange,
            stop_when_absent=self.request.stopWhenAbsent,
            progress=context.progress,
            cancel=context.cancel_event,
        )


class MedSAM2SlicerLogic:
    def __init__(self, engine: Optional[EngineClient] = None) -> None:
        self.engine: EngineClient = engine or LocalEngineClient()
        self._session: Optional[_SessionHandle] = None
        self._undo: dict[str, list[_UndoRecord]] = {}  # segmentation node ID -> steps, oldest first
        self._redo: dict[str, list[_UndoRecord]] = {}
        self._pendingPreview: dict[tuple[str, str], _PendingPreview] = {}  # (segmentation ID, segment ID)

    # ------------------------------------------------------------------ volume geometry
    @staticmethod
    def _checkVolume(volumeNode: Any) -> None:
        if volumeNode is None:
            raise InvalidVolumeError("no source volume selected")
        if not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
            raise InvalidVolumeError(
                f"{volumeNode.GetName()!r} is not a scalar volume; select a CT or MR volume"
            )
        image = volumeNode.GetImageData()
        if image is None or _isEmptyImage(image):
            raise InvalidVolumeError(f"volume {volumeNode.GetName()!r} has no voxels loaded")
        if image.GetNumberOfScalarComponents() != 1:
            raise InvalidVolumeError(
                f"volume {volumeNode.GetName()!r} has {image.GetNumberOfScalarComponents()} components; "
                "extract one channel (Vector to Scalar Volume module) first"
            )

    def volumeIjkToWorld(self, volumeNode: Any) -> np.ndarray:
        """IJK -> world RAS, including the volume's (linear) parent transforms."""
        self._checkVolume(volumeNode)
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        return nodeToWorldMatrix(volumeNode, "volume") @ arrayFromVtkMatrix(matrix)

    def volumeGeometry(self, volumeNode: Any) -> VolumeGeometry:
        try:
            return VolumeGeometry.from_ijk_to_ras_matrix(self.volumeIjkToWorld(volumeNode))
        except InvalidVolumeError as exc:
            if "orthonormal" in str(exc):
                raise InvalidVolumeError(
                    f"volume {volumeNode.GetName()!r} is sheared by its transform; harden or remove it"
                ) from None
            raise

    def volumeArray(self, volumeNode: Any) -> np.ndarray:
        """A copy of the voxels, [k, j, i]: the engine must never see (or change) the node's own buffer."""
        self._checkVolume(volumeNode)
        return np.array(_imageToArray(volumeNode.GetImageData()), copy=True)

    def volumeShape(self, volumeNode: Any) -> tuple[int, int, int]:
        self._checkVolume(volumeNode)
        return tuple(int(v) for v in volumeNode.GetImageData().GetDimensions()[::-1])  # type: ignore[return-value]

    def worldToIjk(
        self, volumeNode: Any, pointsWorld: Union[Sequence[Sequence[float]], np.ndarray]
    ) -> np.ndarray:
        return self.volumeGeometry(volumeNode).ras_to_ijk(pointsWorld)

    def ijkToWorld(
        self, volumeNode: Any, pointsIjk: Union[Sequence[Sequence[float]], np.ndarray]
    ) -> np.ndarray:
        return self.volumeGeometry(volumeNode).ijk_to_ras(pointsIjk)

    def voxelAxisForView(self, volumeNode: Any, view: Union[str, Sequence[float]]) -> int:
        """Voxel axis to cut along for a view: "axial"/"coronal"/"sagittal" or a slice normal in world RAS."""
        geometry = self.volumeGeometry(volumeNode)
        if isinstance(view, str):
            return geometry.voxel_axis_for_view(view.lower())
        normal = np.asarray(view, dtype=float)
        if normal.shape != (3,) or not np.linalg.norm(normal) > 0:
            raise InvalidPromptError(f"slice normal must be a non-zero 3-vector, got {view!r}")
        directions = self.volumeIjkToWorld(volumeNode)[:3, :3]
        directions = directions / np.linalg.norm(directions, axis=0)
        return int(np.argmax(np.abs(directions.T @ (normal / np.linalg.norm(normal)))))

    def sliceAxisForSliceNode(self, volumeNode: Any, sliceNode: Any) -> int:
        """The voxel axis of the slice view the user works in (named orientation or reformatted)."""
        orientation = (sliceNode.GetOrientation() or "").lower()
        if orientation in ("axial", "coronal", "sagittal"):
            return self.voxelAxisForView(volumeNode, orientation)
        sliceToRas = arrayFromVtkMatrix(sliceNode.GetSliceToRAS())
        return self.voxelAxisForView(volumeNode, sliceToRas[:3, 2])

    def voxelAxisForRoi(self, volumeNode: Any, roiNode: Any) -> int:
        """The voxel axis a box was drawn across: an ROI placed in a slice view is thinnest along that
        view's normal (its own axes follow the view, also in a reformatted one)."""
        nodeToWorldMatrix(roiNode, "ROI")
        objectToWorld = arrayFromVtkMatrix(roiNode.GetObjectToWorldMatrix())
        thinnest = int(np.argmin(np.asarray(roiNode.GetSize(), dtype=float)))
        return self.voxelAxisForView(volumeNode, objectToWorld[:3, thinnest])

    def sliceIndexForSliceNode(self, volumeNode: Any, sliceNode: Any, axis: int) -> int:
        """The slice (along ``axis``) under the centre of the slice view."""
        centre = arrayFromVtkMatrix(sliceNode.GetSliceToRAS())[:3, 3]
        return self.sliceIndexAt(volumeNode, centre, axis)

    def sliceIndexAt(self, volumeNode: Any, pointWorld: Sequence[float], axis: int) -> int:
        index = int(np.round(self.worldToIjk(volumeNode, [pointWorld])[0, axis]))
        count = self.volumeShape(volumeNode)[2 - axis]
        if not 0 <= index < count:
            raise InvalidPromptError(
                f"the slice view is outside volume {volumeNode.GetName()!r} (slice {index})"
            )
        return index

    def intensityFromDisplay(self, volumeNode: Any) -> str:
        """The window/level the user sees, as an engine intensity spec ("W,L")."""
        display = volumeNode.GetDisplayNode() if volumeNode is not None else None
        if display is None or not display.GetWindow() > 0:
            return "minmax"
        return f"{display.GetWindow():.6g},{display.GetLevel():.6g}"

    # ------------------------------------------------------------------ prompts
    @staticmethod
    def definedControlPointsWorld(markupsNode: Any) -> np.ndarray:
        """(N, 3) world RAS positions of the placed points (a point being dragged in is skipped)."""
        if markupsNode is None:
            return np.zeros((0, 3))
        points = []
        for n in range(markupsNode.GetNumberOfControlPoints()):
            if markupsNode.GetNthControlPointPositionStatus(n) != markupsNode.PositionDefined:
                continue
            p = [0.0, 0.0, 0.0]
            markupsNode.GetNthControlPointPositionWorld(n, p)  # applies parent transforms
            points.append(p)
        return np.asarray(points, dtype=float).reshape(-1, 3)

    def _checkInside(self, volumeNode: Any, ijk: np.ndarray, what: str, world: np.ndarray) -> None:
        extent = np.asarray(self.volumeShape(volumeNode)[::-1], dtype=float)  # (i, j, k) sizes
        outside = np.any((ijk < -0.5) | (ijk > extent - 0.5), axis=1)
        if outside.any():
            p = world[int(np.argmax(outside))]
            raise InvalidPromptError(
                f"{what} at RAS ({p[0]:.1f}, {p[1]:.1f}, {p[2]:.1f}) is outside volume "
                f"{volumeNode.GetName()!r}; move or delete it"
            )

    def controlPointsIjk(self, volumeNode: Any, markupsNode: Any) -> np.ndarray:
        world = self.definedControlPointsWorld(markupsNode)
        ijk = self.worldToIjk(volumeNode, world) if len(world) else np.zeros((0, 3))
        if len(world):
            self._checkInside(volumeNode, ijk, f"a point of {markupsNode.GetName()!r}", world)
        return ijk

    def roiBoxIjk(self, volumeNode: Any, roiNode: Any, axis: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """The ROI as a box on one slice: two opposite corners (i, j, k) at the voxel centres it covers
        in the slice plane, on the slice through the ROI's centre. None when the ROI is not placed."""
        if roiNode is None or roiNode.GetNumberOfDefinedControlPoints() == 0:
            return None
        nodeToWorldMatrix(roiNode, "ROI")  # refuses non-linear transforms
        objectToWorld = arrayFromVtkMatrix(roiNode.GetObjectToWorldMatrix())
        half = np.asarray(roiNode.GetSize(), dtype=float) / 2.0
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float)
        cornersObject = signs * half
        cornersWorld = cornersObject @ objectToWorld[:3, :3].T + objectToWorld[:3, 3]
        cornersIjk = self.worldToIjk(volumeNode, cornersWorld)
        centreIjk = self.worldToIjk(volumeNode, [objectToWorld[:3, 3]])[0]
        shape_ijk = self.volumeShape(volumeNode)[::-1]
        sliceIndex = int(np.round(centreIjk[axis]))
        if not 0 <= sliceIndex < shape_ijk[axis]:
            raise InvalidPromptError(f"box {roiNode.GetName()!r} is outside volume {volumeNode.GetName()!r}")
        cornerA = np.zeros(3)
        cornerB = np.zeros(3)
        cornerA[axis] = cornerB[axis] = sliceIndex
        for a in (x for x in range(3) if x != axis):
            # Voxel centres inside [min, max]; the tolerance keeps a box drawn exactly on voxel edges.
            lo = int(np.ceil(cornersIjk[:, a].min() - 1e-6))
            hi = int(np.floor(cornersIjk[:, a].max() + 1e-6))
            lo, hi = max(lo, 0), min(hi, shape_ijk[a] - 1)
            if lo > hi:
                raise InvalidPromptError(
                    f"box {roiNode.GetName()!r} does not cover volume {volumeNode.GetName()!r}"
                )
            cornerA[a], cornerB[a] = lo, hi
        return cornerA, cornerB

    def collectPrompts(
        self,
        volumeNode: Any,
        axis: int,
        positiveNode: Any = None,
        negativeNode: Any = None,
        roiNode: Any = None,
        maskSlices: Optional[dict[int, np.ndarray]] = None,
    ) -> PromptBundle:
        positive = self.controlPointsIjk(volumeNode, positiveNode)
        negative = self.controlPointsIjk(volumeNode, negativeNode)
        box = self.roiBoxIjk(volumeNode, roiNode, axis)
        return PromptBundle(
            points_ijk=np.concatenate([positive, negative]),
            labels=np.concatenate([np.ones(len(positive), int), np.zeros(len(negative), int)]),
            boxes=[box] if box is not None else [],
            masks=dict(maskSlices or {}),
        )

    # ------------------------------------------------------------------ segmentation nodes
    def createSegmentationNode(self, volumeNode: Any, name: Optional[str] = None) -> Any:
        """A new segmentation whose geometry is the volume's (exact voxels, DICOM-SEG export works).

        It sits under the volume's parent transform, so its voxels stay on the volume's when the user
        later edits that transform (registration), and its labelmap grid is the volume's IJK grid.
        """
        self._checkVolume(volumeNode)
        scene = volumeNode.GetScene()
        segmentationNode = scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", name or f"{volumeNode.GetName()} MedSAM2"
        )
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        return segmentationNode

    def _checkSegmentation(self, segmentationNode: Any, segmentId: Optional[str] = None) -> None:
        if segmentationNode is None:
            raise InvalidPromptError("no output segmentation selected")
        segmentation = segmentationNode.GetSegmentation()
        binary = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
        source = segmentation.GetSourceRepresentationName()
        if segmentation.GetNumberOfSegments() and source != binary:
            raise InvalidPromptError(
                f"segmentation {segmentationNode.GetName()!r} stores {source.lower()}s; make binary "
                "labelmap its source representation (Segmentations module) first"
            )
        if segmentId is not None and segmentation.GetSegment(segmentId) is None:
            raise InvalidPromptError(
                f"segment {segmentId!r} is not in segmentation {segmentationNode.GetName()!r}"
            )

    def addSegment(
        self,
        segmentationNode: Any,
        volumeNode: Any,
        name: Optional[str] = None,
        color: Optional[Sequence[float]] = None,
        terminology: Optional[str] = None,
    ) -> str:
        """A new empty segment with a colour and a terminology entry; returns its ID.

        An empty segmentation takes the volume's geometry, so the segment's voxels are the volume's.
        """
        self._checkSegmentation(segmentationNode)
        segmentation = segmentationNode.GetSegmentation()
        if segmentation.GetNumberOfSegments() == 0:
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        count = segmentation.GetNumberOfSegments()
        color = tuple(color) if color is not None else SEGMENT_COLORS[count % len(SEGMENT_COLORS)]
        segmentId = segmentation.AddEmptySegment("", name or f"Segment_{count + 1}", color)
        segment = segmentation.GetSegment(segmentId)
        segment.SetTerminology(terminology or self.defaultTerminology())
        return segmentId

    @staticmethod
    def defaultTerminology() -> str:
        context, category, kind = DEFAULT_TERMINOLOGY
        return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
            context, *category, *kind, "", "", "", ANATOMIC_CONTEXT, "", "", "", "", "", ""
        )

    def _gridImage(self, volumeNode: Any, segmentationNode: Any) -> slicer.vtkOrientedImageData:
        """An empty oriented image on the volume's voxel grid, in the segmentation node's own frame."""
        ijkToWorld = self.volumeIjkToWorld(volumeNode)
        segmentationToWorld = nodeToWorldMatrix(segmentationNode, "segmentation")
        image = slicer.vtkOrientedImageData()
        dims = volumeNode.GetImageData().GetDimensions()
        image.SetExtent(0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
        image.SetImageToWorldMatrix(vtkMatrixFromArray(np.linalg.inv(segmentationToWorld) @ ijkToWorld))
        return image

    def segmentArray(self, segmentationNode: Any, segmentId: str, volumeNode: Any) -> np.ndarray:
        """The segment's voxels on the volume's grid, uint8 0/1 [k, j, i] (a copy)."""
        self._checkSegmentation(segmentationNode, segmentId)
        shape = self.volumeShape(volumeNode)
        labelmap = slicer.vtkOrientedImageData()
        if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
            segmentationNode, segmentId, labelmap, False
        ) or _isEmptyImage(labelmap):
            return np.zeros(shape, np.uint8)
        reference = self._gridImage(volumeNode, segmentationNode)
        resampled = slicer.vtkOrientedImageData()
        # Nearest neighbour; with matching geometry this is a pure crop/pad, not an interpolation.
        if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            labelmap, reference, resampled, False, False
        ):
            raise MedSAM2Error(f"cannot read segment {segmentId!r} on the grid of {volumeNode.GetName()!r}")
        # Segments may share one labelmap layer, each with its own label value.
        labelValue = segmentationNode.GetSegmentation().GetSegment(segmentId).GetLabelValue()
        return (_imageToArray(resampled) == labelValue).astype(np.uint8)

    def _setSegmentArray(
        self, segmentationNode: Any, segmentId: str, volumeNode: Any, array: np.ndarray
    ) -> None:
        image = self._gridImage(volumeNode, segmentationNode)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        _imageToArray(image)[...] = array != 0
        # MODE_REPLACE without an extent replaces the whole segment by ``array``; segments that overlap it
        # are not in segmentIdsToOverwrite, so Slicer moves this one to another layer rather than erase them.
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        if not logic.SetBinaryLabelmapToSegment(image, segmentationNode, segmentId, logic.MODE_REPLACE):
            raise MedSAM2Error(f"cannot write segment {segmentId!r} of {segmentationNode.GetName()!r}")

    def segmentSliceMask(
        self, segmentationNode: Any, segmentId: str, volumeNode: Any, axis: int, sliceIndex: int
    ) -> np.ndarray:
        """The segment's content on one slice as a mask prompt (2D, as cut from [k, j, i] along ``axis``)."""
        array = self.segmentArray(segmentationNode, segmentId, volumeNode)
        if not 0 <= sliceIndex < array.shape[2 - axis]:
            raise InvalidPromptError(
                f"slice {sliceIndex} is outside the volume (0..{array.shape[2 - axis] - 1})"
            )
        mask = np.take(array, sliceIndex, axis=2 - axis)
        if not mask.any():
            name = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()
            raise InvalidPromptError(
                f"segment {name!r} is empty on slice {sliceIndex}; paint it with a Segment Editor tool first"
            )
        return np.ascontiguousarray(mask)

    # ------------------------------------------------------------------ writing results, undo
    def writeSegmentRange(
        self,
        segmentationNode: Any,
        segmentId: str,
        volumeNode: Any,
        mask: np.ndarray,
        axis: int,
        lo: int,
        hi: int,
        undoable: bool = True,
    ) -> bool:
        """Replace the segment's voxels in slices lo..hi along ``axis`` by ``mask``'s; True if anything
        changed. The replaced slab (and any preview it absorbs) becomes one undo step."""
        current = self.segmentArray(segmentationNode, segmentId, volumeNode)
        mask = np.asarray(mask)
        if mask.shape != current.shape:
            raise InvalidPromptError(f"result mask has shape {mask.shape}, the volume {current.shape}")
        count = current.shape[2 - axis]
        if not 0 <= lo <= hi < count:
            raise InvalidPromptError(f"slice range {lo}:{hi} is outside 0:{count - 1}")
        previewed: dict[int, np.ndarray] = {}
        if undoable:
            pending = self._pendingPreview.pop((segmentationNode.GetID(), segmentId), None)
            if pending is not None:
                self._pushPreviewSteps(segmentationNode, segmentId, pending, skipAxis=axis)
                previewed = pending.slices.get(axis, {})
        lo_u, hi_u = min([lo, *previewed]), max([hi, *previewed])
        before = current[slabIndex(axis, lo_u, hi_u)].copy()
        for s, original in previewed.items():  # the undo step restores what was there before the previews
            np.moveaxis(before, 2 - axis, 0)[s - lo_u] = original
        updated = current.copy()
        updated[slabIndex(axis, lo, hi)] = mask[slabIndex(axis, lo, hi)] != 0
        changed = not np.array_equal(updated, current)
        if changed:
            self._setSegmentArray(segmentationNode, segmentId, volumeNode, updated)
        if undoable and (changed or previewed):
            self._pushUndo(
                segmentationNode,
                _UndoRecord.capture(segmentId, volumeNode, axis, lo_u, hi_u, before),
                clearRedo=True,
            )
        return changed

    def _pushPreviewSteps(
        self, segmentationNode: Any, segmentId: str, pending: _PendingPreview, skipAxis: Optional[int]
    ) -> None:
        """Previews not absorbed by a propagation along the same axis become undo steps of their own."""
        volumeNode = pending.volumeNode
        for axis, slices in pending.slices.items():
            if axis == skipAxis or not slices:
                continue
            current = self.segmentArray(segmentationNode, segmentId, volumeNode)
            lo, hi = min(slices), max(slices)
            before = current[slabIndex(axis, lo, hi)].copy()
            for s, original in slices.items():
                np.moveaxis(before, 2 - axis, 0)[s - lo] = original
            self._pushUndo(
                segmentationNode, _UndoRecord.capture(segmentId, volumeNode, axis, lo, hi, before), True
            )

    def _pushUndo(self, segmentationNode: Any, record: _UndoRecord, clearRedo: bool) -> None:
        stack = self._undo.setdefault(segmentationNode.GetID(), [])
        stack.append(record)
        del stack[:-UNDO_DEPTH]
        if clearRedo:
            self._redo.pop(segmentationNode.GetID(), None)

    def writePreview(
        self, segmentationNode: Any, segmentId: str, volumeNode: Any, axis: int, preview: SlicePreview
    ) -> None:
        """Show the model's mask on a prompted slice; the next propagation's undo step covers it."""
        current = self.segmentArray(segmentationNode, segmentId, volumeNode)
        view = np.moveaxis(current, 2 - axis, 0)
        s = int(preview.slice_index)
        if preview.mask.shape != view.shape[1:]:
            raise InvalidPromptError(
                f"preview for slice {s} has shape {preview.mask.shape}, expected {view.shape[1:]}"
            )
        key = (segmentationNode.GetID(), segmentId)
        pending = self._pendingPreview.get(key)
        if pending is None or pending.volumeNode is not volumeNode:
            if pending is not None:
                self._pushPreviewSteps(segmentationNode, segmentId, pending, skipAxis=None)
            pending = self._pendingPreview[key] = _PendingPreview(volumeNode)
        pending.slices.setdefault(axis, {}).setdefault(s, view[s].copy())
        view[s] = preview.mask != 0
        self._setSegmentArray(segmentationNode, segmentId, volumeNode, current)

    def canUndo(self, segmentationNode: Any) -> bool:
        return segmentationNode is not None and bool(
            self._undo.get(segmentationNode.GetID())
            or any(k[0] == segmentationNode.GetID() for k in self._pendingPreview)
        )

    def canRedo(self, segmentationNode: Any) -> bool:
        return segmentationNode is not None and bool(self._redo.get(segmentationNode.GetID()))

    def undo(self, segmentationNode: Any) -> bool:
        """Restore the segmentation as it was before its latest propagation (or pending previews)."""
        if segmentationNode is None:
            return False
        for key in [k for k in self._pendingPreview if k[0] == segmentationNode.GetID()]:
            # Previews not yet followed by a propagation are undone first, as their own step.
            self._pushPreviewSteps(segmentationNode, key[1], self._pendingPreview.pop(key), skipAxis=None)
        stack = self._undo.get(segmentationNode.GetID())
        if not stack:
            return False
        record = stack.pop()
        inverse = self._restore(segmentationNode, record)
        if inverse is not None:
            self._redo.setdefault(segmentationNode.GetID(), []).append(inverse)
        return True

    def redo(self, segmentationNode: Any) -> bool:
        stack = self._redo.get(segmentationNode.GetID()) if segmentationNode is not None else None
        if not stack:
            return False
        inverse = self._restore(segmentationNode, stack.pop())
        if inverse is not None:
            self._pushUndo(segmentationNode, inverse, clearRedo=False)
        return True

    def _restore(self, segmentationNode: Any, record: _UndoRecord) -> Optional[_UndoRecord]:
        segmentation = segmentationNode.GetSegmentation()
        if segmentation.GetSegment(record.segmentId) is None or record.volumeNode.GetScene() is None:
            logger.warning("segment %s or its volume was deleted; its undo step is dropped", record.segmentId)
            return None
        volumeNode = record.volumeNode
        current = self.segmentArray(segmentationNode, record.segmentId, volumeNode)
        index = slabIndex(record.axis, record.lo, record.hi)
        inverse = _UndoRecord.capture(
            record.segmentId, volumeNode, record.axis, record.lo, record.hi, current[index]
        )
        current[index] = record.slab()
        self._setSegmentArray(segmentationNode, record.segmentId, volumeNode, current)
        return inverse

    # ------------------------------------------------------------------ engine runs
    def objectIdFor(self, segmentationNode: Any, segmentId: str) -> int:
        """Each segment is its own object in the engine session (ids are stable within the session)."""
        if self._session is None:
            raise InvalidPromptError("no engine session; prepare a run first")
        ids = self._session.objectIds
        return ids.setdefault((segmentationNode.GetID(), segmentId), len(ids) + 1)

    def _sessionFor(self, volumeNode: Any, options: SessionOptions) -> tuple[_SessionHandle, bool]:
        """The reusable session handle, and whether the engine needs the volume (new session)."""
        image = volumeNode.GetImageData()
        key = (
            volumeNode.GetID(),
            image.GetMTime(),  # edited voxels mean a new session
            self.volumeIjkToWorld(volumeNode).round(9).tobytes(),
            options,
        )
        if (
            self._session is not None
            and self._session.key == key
            and self.engine.has_session(self._session.sessionId)
        ):
            return self._session, False
        self.closeSession()
        shape = self.volumeShape(volumeNode)
        self._session = _SessionHandle(key=key, axis=options.axis, numSlices=shape[2 - options.axis])
        return self._session, True

    def setEngine(self, engine: EngineClient) -> None:
        """Switch between the in-process engine and a server; undo history is kept."""
        self.closeSession()
        self.engine = engine

    def closeSession(self) -> None:
        if self._session is not None and self._session.sessionId is not None:
            self.engine.close_session(self._session.sessionId)
        self._session = None

    def forgetSegmentPrompts(self, segmentationNode: Any, segmentId: str) -> None:
        """Drop a segment's prompts from the engine (its voxels stay)."""
        session = self._session
        if session is None or session.sessionId is None:
            return
        objectId = session.objectIds.pop((segmentationNode.GetID(), segmentId), None)
        if objectId is not None and self.engine.has_session(session.sessionId):
            self.engine.remove_object(session.sessionId, objectId)

    def prepareRun(
        self,
        volumeNode: Any,
        segmentationNode: Any,
        segmentId: str,
        options: SessionOptions,
        prompts: PromptBundle,
        request: Optional[PropagationRequest] = None,
    ) -> PreparedRun:
        """Main thread: check inputs and copy what the worker needs. ``request=None`` runs previews only."""
        self._checkVolume(volumeNode)
        self._checkSegmentation(segmentationNode, segmentId)
        if options.axis not in (0, 1, 2):
            raise InvalidPromptError(f"slice axis must be 0, 1 or 2, got {options.axis}")
        if request is not None and request.direction not in ("both", "forward", "backward"):
            raise InvalidPromptError(
                f"direction must be both, forward or backward, got {request.direction!r}"
            )
        handle, needsVolume = self._sessionFor(volumeNode, options)
        objectId = self.objectIdFor(segmentationNode, segmentId)
        if prompts.is_empty() and (request is None or needsVolume):
            raise InvalidPromptError("no prompts: place a point, draw a box or use the painted slice first")
        return PreparedRun(
            engine=self.engine,
            handle=handle,
            options=options,
            objectId=objectId,
            prompts=prompts,
            request=request,
            volumeNode=volumeNode,
            segmentationNode=segmentationNode,
            segmentId=segmentId,
            volume=self.volumeArray(volumeNode) if needsVolume else None,
            geometry=self.volumeGeometry(volumeNode),
        )

    def writtenRange(
        self, outcome: PropagationOutcome, objectId: int, request: PropagationRequest
    ) -> tuple[int, int]:
        """Slices a run owns: those it visited, plus the rest of a direction that ended with the object
        (the engine cleared them: the object is absent there)."""
        first, last = outcome.propagated[objectId]
        lo, hi = request.sliceRange if request.sliceRange is not None else (0, outcome.num_slices - 1)
        stopped = outcome.stopped_early.get(objectId, [])
        if "forward" in stopped:
            last = hi
        if "backward" in stopped:
            first = lo
        return int(first), int(last)

    def applyRun(
        self, run: PreparedRun, result: Union[PropagationOutcome, list[SlicePreview]]
    ) -> Optional[tuple[int, int]]:
        """Main thread: put a finished run's masks into the segment. Returns the slice range written
        (None for previews)."""
        self._checkSegmentation(run.segmentationNode, run.segmentId)
        axis = run.handle.axis
        if run.request is None:
            for preview in result:  # type: ignore[union-attr]
                self.writePreview(run.segmentationNode, run.segmentId, run.volumeNode, axis, preview)
            return None
        assert isinstance(result, PropagationOutcome)
        lo, hi = self.writtenRange(result, run.objectId, run.request)
        self.writeSegmentRange(
            run.segmentationNode, run.segmentId, run.volumeNode, result.masks[run.objectId], axis, lo, hi
        )
        return lo, hi

    # ------------------------------------------------------------------ export
    def exportSegmentation(self, segmentationNode: Any, path: str) -> None:
        """Write a .seg.nrrd through Slicer's own storage node, atomically (temp file, then rename)."""
        if not str(path).endswith(".seg.nrrd"):
            raise InvalidPromptError(f"export file must end in .seg.nrrd, got {path!r}")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise InvalidPromptError(f"folder {folder!r} does not exist")
        temporary = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.seg.nrrd")
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(temporary)
        storage.SetCropToMinimumExtent(False)  # keep the reference geometry: what DICOM-SEG export expects
        try:
            if not storage.WriteData(segmentationNode):
                raise MedSAM2Error(f"cannot write {path!r}")
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
