"""Where a volume's voxels are: IJK <-> world RAS (with linear parent transforms) and slice axes.

The engine works on the source volume's own voxel grid: ``arrayFromVolume`` order [k, j, i] and a
medsam2.geometry.VolumeGeometry built from the volume's IJK-to-world matrix. Prompts are mapped world
RAS -> (i, j, k) through that matrix, so a click at a voxel centre arrives as that voxel's exact
index. Non-linear transforms cannot be one matrix: they are refused with a message asking the user to
harden them. MRML only (no Qt): runs in Slicer and on a ``slicer-core`` scene.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

import numpy as np
import vtk
from vtk.util import numpy_support

from medsam2.errors import InvalidPromptError, InvalidVolumeError
from medsam2.geometry import VolumeGeometry

Points = Union[Sequence[Sequence[float]], np.ndarray]


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


def imageToArray(image: vtk.vtkImageData) -> np.ndarray:
    """A [k, j, i] view of the image's scalars (no copy)."""
    dims = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])


def isEmptyImage(image: Any) -> bool:
    extent = image.GetExtent()
    return image.GetPointData().GetScalars() is None or any(extent[2 * a] > extent[2 * a + 1] for a in range(3))


def checkVolume(volumeNode: Any) -> None:
    if volumeNode is None:
        raise InvalidVolumeError("no source volume selected")
    if not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
        raise InvalidVolumeError(f"{volumeNode.GetName()!r} is not a scalar volume; select a CT or MR volume")
    image = volumeNode.GetImageData()
    if image is None or isEmptyImage(image):
        raise InvalidVolumeError(f"volume {volumeNode.GetName()!r} has no voxels loaded")
    if image.GetNumberOfScalarComponents() != 1:
        raise InvalidVolumeError(
            f"volume {volumeNode.GetName()!r} has {image.GetNumberOfScalarComponents()} components; "
            "extract one channel (Vector to Scalar Volume module) first"
        )


def volumeIjkToWorld(volumeNode: Any) -> np.ndarray:
    """IJK -> world RAS, including the volume's (linear) parent transforms."""
    checkVolume(volumeNode)
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return nodeToWorldMatrix(volumeNode, "volume") @ arrayFromVtkMatrix(matrix)


def volumeGeometry(volumeNode: Any) -> VolumeGeometry:
    try:
        return VolumeGeometry.from_ijk_to_ras_matrix(volumeIjkToWorld(volumeNode))
    except InvalidVolumeError as exc:
        if "orthonormal" in str(exc):
            raise InvalidVolumeError(
                f"volume {volumeNode.GetName()!r} is sheared by its transform; harden or remove it"
            ) from None
        raise


def volumeShape(volumeNode: Any) -> tuple[int, int, int]:
    """[k, j, i] sizes."""
    checkVolume(volumeNode)
    k, j, i = volumeNode.GetImageData().GetDimensions()[::-1]
    return int(k), int(j), int(i)


def volumeArray(volumeNode: Any) -> np.ndarray:
    """A copy of the voxels, [k, j, i]: the engine must never see (or change) the node's own buffer.
    Worker thread only (see runs.py): a whole-volume copy is too slow for the GUI thread."""
    checkVolume(volumeNode)
    return np.array(imageToArray(volumeNode.GetImageData()), copy=True)


def worldToIjk(volumeNode: Any, pointsWorld: Points) -> np.ndarray:
    return volumeGeometry(volumeNode).ras_to_ijk(pointsWorld)


def ijkToWorld(volumeNode: Any, pointsIjk: Points) -> np.ndarray:
    return volumeGeometry(volumeNode).ijk_to_ras(pointsIjk)


def voxelAxisForView(volumeNode: Any, view: Union[str, Sequence[float], np.ndarray]) -> int:
    """Voxel axis to cut along for a view: "axial"/"coronal"/"sagittal" or a slice normal in world RAS."""
    if isinstance(view, str):
        return volumeGeometry(volumeNode).voxel_axis_for_view(view.lower())
    normal = np.asarray(view, dtype=float)
    if normal.shape != (3,) or not np.linalg.norm(normal) > 0:
        raise InvalidPromptError(f"slice normal must be a non-zero 3-vector, got {view!r}")
    directions = volumeIjkToWorld(volumeNode)[:3, :3]
    directions = directions / np.linalg.norm(directions, axis=0)
    return int(np.argmax(np.abs(directions.T @ (normal / np.linalg.norm(normal)))))


def sliceAxisForSliceNode(volumeNode: Any, sliceNode: Any) -> int:
    """The voxel axis of the slice view the user works in (named orientation or reformatted)."""
    orientation = (sliceNode.GetOrientation() or "").lower()
    if orientation in ("axial", "coronal", "sagittal"):
        return voxelAxisForView(volumeNode, orientation)
    sliceToRas = arrayFromVtkMatrix(sliceNode.GetSliceToRAS())
    return voxelAxisForView(volumeNode, sliceToRas[:3, 2])


def sliceIndexAt(volumeNode: Any, pointWorld: Union[Sequence[float], np.ndarray], axis: int) -> int:
    index = int(np.round(worldToIjk(volumeNode, np.asarray(pointWorld, dtype=float)[None])[0, axis]))
    count = volumeShape(volumeNode)[2 - axis]
    if not 0 <= index < count:
        raise InvalidPromptError(f"the slice view is outside volume {volumeNode.GetName()!r} (slice {index})")
    return index


def sliceIndexForSliceNode(volumeNode: Any, sliceNode: Any, axis: int) -> int:
    """The slice (along ``axis``) the slice view shows (its plane's origin)."""
    centre = arrayFromVtkMatrix(sliceNode.GetSliceToRAS())[:3, 3]
    return sliceIndexAt(volumeNode, centre, axis)
