"""Segmentation nodes and segments: creating them on the volume's grid, naming and coding them, and
reading their voxels back (a slab at a time where a slab is all that is needed).

A segmentation made by :func:`createSegmentationNode` takes the volume's geometry and sits under the
volume's parent transform, so each engine voxel is exactly one segment voxel and DICOM-SEG export
can reference the source series. Writing is writer.py's job (through the Segment Editor's logic).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import slicer
import vtk

from medsam2.errors import InvalidPromptError, MedSAM2Error

from .geometry import checkVolume, imageToArray, isEmptyImage, nodeToWorldMatrix, volumeIjkToWorld, vtkMatrixFromArray
from .terminology import DEFAULT_TERMINOLOGY_ENTRY

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

Extent = tuple[int, int, int, int, int, int]


def createSegmentationNode(volumeNode: Any, name: Optional[str] = None) -> Any:
    """A new segmentation whose geometry is the volume's (exact voxels, DICOM-SEG export works)."""
    checkVolume(volumeNode)
    segmentationNode = volumeNode.GetScene().AddNewNodeByClass(
        "vtkMRMLSegmentationNode", name or f"{volumeNode.GetName()} MedSAM2"
    )
    segmentationNode.CreateDefaultDisplayNodes()
    segmentationNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    return segmentationNode


def checkSegmentation(segmentationNode: Any, segmentId: Optional[str] = None) -> None:
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
        raise InvalidPromptError(f"segment {segmentId!r} is not in segmentation {segmentationNode.GetName()!r}")


def addSegment(
    segmentationNode: Any,
    volumeNode: Any,
    name: Optional[str] = None,
    color: Optional[Sequence[float]] = None,
    terminologyEntry: Optional[str] = None,
) -> str:
    """A new empty segment with a colour and a terminology entry (Slicer's serialized string, as the
    terminology selector gives it); returns its ID."""
    checkSegmentation(segmentationNode)
    segmentation = segmentationNode.GetSegmentation()
    if segmentation.GetNumberOfSegments() == 0:
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    count = segmentation.GetNumberOfSegments()
    rgb = tuple(color) if color is not None else SEGMENT_COLORS[count % len(SEGMENT_COLORS)]
    segmentId = segmentation.AddEmptySegment("", name or f"Segment_{count + 1}", rgb)
    setSegmentTerminology(segmentationNode, segmentId, terminologyEntry or DEFAULT_TERMINOLOGY_ENTRY)
    return str(segmentId)


def setSegmentTerminology(segmentationNode: Any, segmentId: str, terminologyEntry: str) -> None:
    """vtkSegment.SetTerminology (Slicer 5.10 and later) stores the entry DICOM-SEG export reads."""
    entry = slicer.vtkSlicerTerminologyEntry()
    if not slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(terminologyEntry, entry):
        raise InvalidPromptError(f"not a Slicer terminology entry: {terminologyEntry!r}")
    segmentationNode.GetSegmentation().GetSegment(segmentId).SetTerminology(terminologyEntry)


def gridImage(volumeNode: Any, segmentationNode: Any, extent: Optional[Extent] = None) -> Any:
    """An empty oriented image on the volume's voxel grid (``extent`` of it, default all of it), in
    the segmentation node's own frame."""
    dims = volumeNode.GetImageData().GetDimensions()
    return gridImageFromMatrix(volumeIjkToWorld(volumeNode), dims, segmentationNode, extent)


def gridImageFromMatrix(
    ijkToWorld: np.ndarray, dims: Sequence[int], segmentationNode: Any, extent: Optional[Extent] = None
) -> Any:
    """An empty oriented image on any grid given by its IJK-to-world matrix and (i, j, k) sizes."""
    segmentationToWorld = nodeToWorldMatrix(segmentationNode, "segmentation")
    image = slicer.vtkOrientedImageData()
    if extent is None:
        extent = (0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
    image.SetExtent(*extent)
    image.SetImageToWorldMatrix(vtkMatrixFromArray(np.linalg.inv(segmentationToWorld) @ ijkToWorld))
    return image


def slabExtent(volumeNode: Any, axis: int, lo: int, hi: int) -> Extent:
    """The IJK extent of slices lo..hi along ``axis``."""
    dims = list(volumeNode.GetImageData().GetDimensions())
    extent = [0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1]
    extent[2 * axis], extent[2 * axis + 1] = int(lo), int(hi)
    return tuple(extent)  # type: ignore[return-value]


def readSegment(segmentationNode: Any, segmentId: str, volumeNode: Any, extent: Optional[Extent] = None) -> np.ndarray:
    """The segment's voxels on the volume's grid (only ``extent`` of it), uint8 0/1 [k, j, i], a copy."""
    checkSegmentation(segmentationNode, segmentId)
    return readSegmentOnGrid(segmentationNode, segmentId, gridImage(volumeNode, segmentationNode, extent))


def readSegmentOnGrid(segmentationNode: Any, segmentId: str, reference: Any) -> np.ndarray:
    """The segment's voxels resampled (nearest neighbour) onto ``reference``'s grid, uint8 [k, j, i]."""
    ext = reference.GetExtent()
    shape = (ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
    labelmap = slicer.vtkOrientedImageData()
    if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentationNode, segmentId, labelmap, False
    ) or isEmptyImage(labelmap):
        return np.zeros(shape, np.uint8)
    resampled = slicer.vtkOrientedImageData()
    # Nearest neighbour; with matching geometry this is a pure crop/pad, not an interpolation.
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap, reference, resampled, False, False
    ):
        raise MedSAM2Error(f"cannot read segment {segmentId!r} of {segmentationNode.GetName()!r}")
    # Segments may share one labelmap layer, each with its own label value.
    labelValue = segmentationNode.GetSegmentation().GetSegment(segmentId).GetLabelValue()
    return (imageToArray(resampled) == labelValue).astype(np.uint8)


def segmentSliceMask(segmentationNode: Any, segmentId: str, volumeNode: Any, axis: int, sliceIndex: int) -> np.ndarray:
    """The segment's content on one slice as a mask prompt (2D, as cut from [k, j, i] along ``axis``)."""
    count = volumeNode.GetImageData().GetDimensions()[axis]
    if not 0 <= sliceIndex < count:
        raise InvalidPromptError(f"slice {sliceIndex} is outside the volume (0..{count - 1})")
    slab = readSegment(segmentationNode, segmentId, volumeNode, slabExtent(volumeNode, axis, sliceIndex, sliceIndex))
    mask = np.take(slab, 0, axis=2 - axis)
    if not mask.any():
        name = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()
        raise InvalidPromptError(
            f"segment {name!r} is empty on slice {sliceIndex}; paint it with a Segment Editor tool first"
        )
    return np.ascontiguousarray(mask)


def vtkImageFromSlab(volumeNode: Any, segmentationNode: Any, extent: Extent, slab: np.ndarray) -> Any:
    """An oriented uint8 image of ``extent`` holding ``slab`` ([k, j, i] of that extent)."""
    image = gridImage(volumeNode, segmentationNode, extent)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    target = imageToArray(image)
    if target.shape != slab.shape:
        raise InvalidPromptError(f"mask slab has shape {slab.shape}, its extent {target.shape}")
    target[...] = slab != 0
    return image
