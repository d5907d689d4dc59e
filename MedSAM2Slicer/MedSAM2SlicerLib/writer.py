"""Every write into a segment goes through the Segment Editor's own logic, vtkSlicerSegmentEditorLogic
(Slicer 5.10 and later), so the Segment Editor node's settings apply to the model's output exactly as
to a paint stroke: mask mode (editable area), editable intensity range and overwrite mode.

A write replaces the segment's voxels in a slab (one slice for a preview, the propagated slices for a
run) and nowhere else: ModificationModeSet would clear the segment outside the modifier
(vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap removes it over the whole segment first), so a
slab is written as Remove (the slab) then Add (the new mask), both limited to the slab's extent.

Undo and redo are the Segment Editor's history: one saved state per propagation, taken before the
first write of a round (previews included); a preview never saves one of its own, so previews do not
fill the history. In Slicer the history is the embedded Segment Editor widget's (the panel passes
its saveStateForUndo/undo/redo), so Ctrl+Z in the panel and in the editor step through one history;
outside Slicer (tests) it is this logic's own vtkSegmentationHistory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

import numpy as np
import slicer

from medsam2.errors import InvalidPromptError

from .segments import Extent, checkSegmentation, slabExtent, vtkImageFromSlab


class History(Protocol):
    def save(self) -> bool: ...
    def undo(self) -> None: ...
    def redo(self) -> None: ...
    def canUndo(self) -> bool: ...
    def canRedo(self) -> bool: ...


class EditorLogicHistory:
    """The history of a vtkSlicerSegmentEditorLogic."""

    def __init__(self, logic: Any) -> None:
        self.logic = logic

    def save(self) -> bool:
        return bool(self.logic.SaveStateForUndo())

    def undo(self) -> None:
        self.logic.Undo()

    def redo(self) -> None:
        self.logic.Redo()

    def canUndo(self) -> bool:
        return bool(self.logic.CanUndo())

    def canRedo(self) -> bool:
        return bool(self.logic.CanRedo())


@dataclass
class WidgetHistory:
    """A Segment Editor widget's history (qMRMLSegmentEditorWidget keeps its logic private in 5.10,
    so its public slots are used). ``undoEnabled`` reads the widget's own undo/redo button state."""

    saveState: Callable[[], None]
    undoCall: Callable[[], None]
    redoCall: Callable[[], None]
    undoAvailable: Callable[[], bool]
    redoAvailable: Callable[[], bool]

    @classmethod
    def ofEditor(cls, editor: Any, findChild: Callable[[str], Any]) -> WidgetHistory:
        """A qMRMLSegmentEditorWidget's history; its Undo/Redo buttons (named so in its .ui) tell
        whether a step is available, as the widget's private logic enables them."""
        return cls(
            editor.saveStateForUndo,
            editor.undo,
            editor.redo,
            lambda: bool(findChild("UndoButton").enabled),
            lambda: bool(findChild("RedoButton").enabled),
        )

    def save(self) -> bool:
        self.saveState()
        return True

    def undo(self) -> None:
        self.undoCall()

    def redo(self) -> None:
        self.redoCall()

    def canUndo(self) -> bool:
        return bool(self.undoAvailable())

    def canRedo(self) -> bool:
        return bool(self.redoAvailable())


def registerSegmentEditorNode(scene: Any) -> None:
    """Slicer registers vtkMRMLSegmentEditorNode at start-up; a bare slicer-core scene does not."""
    if not scene.IsNodeClassRegistered("vtkMRMLSegmentEditorNode"):
        scene.RegisterNodeClass(slicer.vtkMRMLSegmentEditorNode())


class SegmentWriter:
    """Writes model output into segments through a vtkSlicerSegmentEditorLogic bound to a Segment
    Editor node (the embedded editor's, in Slicer: its settings are the user's)."""

    def __init__(self, scene: Any, editorNode: Any = None, history: Optional[History] = None) -> None:
        registerSegmentEditorNode(scene)
        self.scene = scene
        self.editorNode = editorNode or scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode", "MedSAM2 editor")
        self.logic = slicer.vtkSlicerSegmentEditorLogic()
        self.logic.SetMRMLScene(scene)
        self.logic.SetSegmentEditorNode(self.editorNode)
        self.history: History = history or EditorLogicHistory(self.logic)
        self._roundOpen = False  # a state is saved for the current round of previews + propagation

    def bind(self, segmentationNode: Any, volumeNode: Any) -> None:
        """Point the logic (and so masking and intensity range) at this segmentation and volume."""
        if self.editorNode.GetSegmentationNode() is not segmentationNode:
            self.logic.SetSegmentationNode(segmentationNode)
            self._roundOpen = False
        if self.editorNode.GetSourceVolumeNode() is not volumeNode:
            self.logic.SetSourceVolumeNode(volumeNode)

    def _saveOnce(self) -> None:
        if not self._roundOpen:
            self.history.save()
            self._roundOpen = True

    def endRound(self) -> None:
        """The next write saves a new undo state (after a propagation, a segment switch, an undo)."""
        self._roundOpen = False

    def writeSlab(
        self, segmentationNode: Any, segmentId: str, volumeNode: Any, axis: int, lo: int, hi: int, slab: np.ndarray
    ) -> Extent:
        """Replace the segment's voxels in slices lo..hi along ``axis`` by ``slab`` ([k, j, i] of that
        slab), subject to the editor node's masking and overwrite settings. Returns the extent written."""
        checkSegmentation(segmentationNode, segmentId)
        count = volumeNode.GetImageData().GetDimensions()[axis]
        if not 0 <= lo <= hi < count:
            raise InvalidPromptError(f"slice range {lo}:{hi} is outside 0:{count - 1}")
        self.bind(segmentationNode, volumeNode)
        extent = slabExtent(volumeNode, axis, lo, hi)
        self._saveOnce()
        Logic = slicer.vtkSlicerSegmentEditorLogic
        everything = vtkImageFromSlab(volumeNode, segmentationNode, extent, np.ones_like(slab, dtype=np.uint8))
        mask = vtkImageFromSlab(volumeNode, segmentationNode, extent, slab)
        self.editorNode.SetSelectedSegmentID(segmentId)  # masking "inside/outside" is relative to it
        self.logic.ModifySegmentByLabelmap(
            segmentationNode, segmentId, everything, Logic.ModificationModeRemove, extent, False, False
        )
        self.logic.ModifySegmentByLabelmap(
            segmentationNode, segmentId, mask, Logic.ModificationModeAdd, extent, False, False
        )
        return extent

    def writePreview(
        self, segmentationNode: Any, segmentId: str, volumeNode: Any, axis: int, sliceIndex: int, mask2d: np.ndarray
    ) -> None:
        """The model's mask on one prompted slice (2D as cut from [k, j, i] along ``axis``)."""
        self.writeSlab(
            segmentationNode, segmentId, volumeNode, axis, sliceIndex, sliceIndex, np.expand_dims(mask2d, 2 - axis)
        )

    def writePropagation(
        self, segmentationNode: Any, segmentId: str, volumeNode: Any, axis: int, lo: int, hi: int, slab: np.ndarray
    ) -> None:
        self.writeSlab(segmentationNode, segmentId, volumeNode, axis, lo, hi, slab)
        self.endRound()

    def canUndo(self) -> bool:
        return self.history.canUndo()

    def canRedo(self) -> bool:
        return self.history.canRedo()

    def undo(self) -> bool:
        if not self.history.canUndo():
            return False
        self.history.undo()
        self.endRound()
        return True

    def redo(self) -> bool:
        if not self.history.canRedo():
            return False
        self.history.redo()
        self.endRound()
        return True
