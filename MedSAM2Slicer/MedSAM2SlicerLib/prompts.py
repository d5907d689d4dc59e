"""Prompts from markups: clicked points and the box, as voxel indices of the source volume.

A box is a Markups ROI. Placed interactively it is two corner clicks, each firing a "point defined"
event; after the second, Slicer replaces the two corners by one centre point and pads the thin side
(vtkMRMLMarkupsROINode::UpdateBoxROIFromControlPoints). So "complete" means: one defined control
point and a non-zero size in the plane of the view it was drawn in. The padding makes the thinnest
side unreliable for telling the slice axis, so the axis comes from that view, never from the ROI.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from medsam2.errors import InvalidPromptError

from .engine_client import PromptBundle
from .geometry import arrayFromVtkMatrix, nodeToWorldMatrix, volumeShape, worldToIjk


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


def _checkInside(volumeNode: Any, ijk: np.ndarray, what: str, world: np.ndarray) -> None:
    extent = np.asarray(volumeShape(volumeNode)[::-1], dtype=float)  # (i, j, k) sizes
    outside = np.any((ijk < -0.5) | (ijk > extent - 0.5), axis=1)
    if outside.any():
        p = world[int(np.argmax(outside))]
        raise InvalidPromptError(
            f"{what} at RAS ({p[0]:.1f}, {p[1]:.1f}, {p[2]:.1f}) is outside volume "
            f"{volumeNode.GetName()!r}; move or delete it"
        )


def controlPointsIjk(volumeNode: Any, markupsNode: Any) -> np.ndarray:
    world = definedControlPointsWorld(markupsNode)
    if not len(world):
        return np.zeros((0, 3))
    ijk = worldToIjk(volumeNode, world)
    _checkInside(volumeNode, ijk, f"a point of {markupsNode.GetName()!r}", world)
    return ijk


def _roiCornersIjk(volumeNode: Any, roiNode: Any) -> tuple[np.ndarray, np.ndarray]:
    """The ROI's eight corners and its centre, in continuous voxel indices."""
    nodeToWorldMatrix(roiNode, "ROI")  # refuses non-linear transforms
    objectToWorld = arrayFromVtkMatrix(roiNode.GetObjectToWorldMatrix())
    half = np.asarray(roiNode.GetSize(), dtype=float) / 2.0
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float)
    cornersWorld = (signs * half) @ objectToWorld[:3, :3].T + objectToWorld[:3, 3]
    return worldToIjk(volumeNode, cornersWorld), worldToIjk(volumeNode, objectToWorld[None, :3, 3])[0]


def boxIsComplete(volumeNode: Any, roiNode: Any, axis: int) -> bool:
    """True once both corners are placed and the box covers more than one voxel column and row in the
    plane cut along ``axis`` (the first corner alone, or a drag still under way, is not a box)."""
    if roiNode is None or roiNode.GetNumberOfControlPoints() != 1 or roiNode.GetNumberOfDefinedControlPoints() != 1:
        return False
    corners, _centre = _roiCornersIjk(volumeNode, roiNode)
    inPlane = [a for a in range(3) if a != axis]
    return all(np.ptp(corners[:, a]) > 1e-6 for a in inPlane)


def roiBoxIjk(volumeNode: Any, roiNode: Any, axis: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """The ROI as a box on one slice: two opposite corners (i, j, k) at the voxel centres it covers in
    the slice plane, on the slice through the ROI's centre. None while the box is not complete."""
    if not boxIsComplete(volumeNode, roiNode, axis):
        return None
    cornersIjk, centreIjk = _roiCornersIjk(volumeNode, roiNode)
    shapeIjk = volumeShape(volumeNode)[::-1]
    sliceIndex = int(np.round(centreIjk[axis]))
    if not 0 <= sliceIndex < shapeIjk[axis]:
        raise InvalidPromptError(f"box {roiNode.GetName()!r} is outside volume {volumeNode.GetName()!r}")
    cornerA, cornerB = np.zeros(3), np.zeros(3)
    cornerA[axis] = cornerB[axis] = sliceIndex
    for a in (x for x in range(3) if x != axis):
        # Voxel centres inside [min, max]; the tolerance keeps a box drawn exactly on voxel edges.
        lo = max(int(np.ceil(cornersIjk[:, a].min() - 1e-6)), 0)
        hi = min(int(np.floor(cornersIjk[:, a].max() + 1e-6)), shapeIjk[a] - 1)
        if lo > hi:
            raise InvalidPromptError(f"box {roiNode.GetName()!r} does not cover volume {volumeNode.GetName()!r}")
        cornerA[a], cornerB[a] = lo, hi
    return cornerA, cornerB


def collectPrompts(
    volumeNode: Any,
    axis: int,
    positiveNode: Any = None,
    negativeNode: Any = None,
    roiNode: Any = None,
    maskSlices: Optional[dict[int, np.ndarray]] = None,
) -> PromptBundle:
    positive = controlPointsIjk(volumeNode, positiveNode)
    negative = controlPointsIjk(volumeNode, negativeNode)
    box = roiBoxIjk(volumeNode, roiNode, axis)
    return PromptBundle(
        points_ijk=np.concatenate([positive, negative]),
        labels=np.concatenate([np.ones(len(positive), int), np.zeros(len(negative), int)]),
        boxes=[box] if box is not None else [],
        masks=dict(maskSlices or {}),
    )


def promptSlices(prompts: PromptBundle, axis: int) -> set[int]:
    """The slices a bundle has prompts on (a preview is written on exactly these)."""
    slices = {int(np.round(p[axis])) for p in prompts.points_ijk}
    slices |= {int(np.round(a[axis])) for a, _b in prompts.boxes}
    return slices | {int(s) for s in prompts.masks}


def createPromptNode(scene: Any, name: str, className: str, color: tuple[float, float, float]) -> Any:
    """A markups node for prompts, in its colour, without labels (they would hide the anatomy)."""
    node = scene.AddNewNodeByClass(className, name)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetSelectedColor(*color)
    display.SetColor(*color)
    display.SetPointLabelsVisibility(False)
    return node
