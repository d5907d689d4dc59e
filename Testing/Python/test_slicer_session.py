"""A radiologist's first session with the panel, step by step, on a real MRML scene (slicer-core) with
the real engine and a small random-weight SAM2: every step goes through the calls the widget forwards
Qt signals to (MedSAM2SlicerLib.logic.PanelLogic), and results are read back through Slicer's own
segment export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML for Python) is not installed")
pytest.importorskip("sam2", reason="the in-process engine needs sam2")

from slicer_scene import AXIAL_CT, TEST_MODEL, RecordingEngine, Scene  # noqa: E402

from MedSAM2SlicerLib.dicom_export import exportDicomSeg  # noqa: E402
from MedSAM2SlicerLib.logic import PanelLogic  # noqa: E402
from MedSAM2SlicerLib.panel_state import Activity  # noqa: E402
from MedSAM2SlicerLib.runs import PropagationRequest  # noqa: E402
from MedSAM2SlicerLib.segments import setSegmentTerminology  # noqa: E402

LIVER_ENTRY = (
    "Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure"
    "~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"
)
EXPORTED: dict[str, Path] = {}


class Database:
    """What the export needs of Slicer's DICOM database: the file of each instance."""

    def __init__(self, written):
        import pydicom

        self.files = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): str(p) for p in written.files}

    def fileForInstance(self, uid):
        return self.files.get(uid, "")


def _dicom_volume(scene, tmp_path):
    """A CT series on disk, loaded the way Slicer's DICOM plugin loads it (instance UIDs in k order)."""
    import pydicom
    from dicom_factory import write_series

    from medsam2.geometry import VolumeGeometry

    shape = (20, 40, 36)
    k, j, i = np.indices(shape)
    blob = ((k - 10) / 7.0) ** 2 + ((j - 18) / 10.0) ** 2 + ((i - 15) / 9.0) ** 2 < 1
    values = np.where(blob, 60.0, -100.0) + np.random.default_rng(2).integers(-20, 20, shape)
    geometry = VolumeGeometry.from_ijk_to_ras_matrix(AXIAL_CT)
    written = write_series(tmp_path / "series", values, geometry)
    volume = scene.add_volume(geometry.ijk_to_ras_matrix(), shape=shape, voxels=values)
    by_position = sorted(written.files, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    volume.SetAttribute("DICOM.instanceUIDs", " ".join(str(pydicom.dcmread(p).SOPInstanceUID) for p in by_position))
    return volume, written


def _read_all(scene, logic):
    seg = logic.segmentationNode
    ids = [seg.GetSegmentation().GetNthSegmentID(n) for n in range(seg.GetSegmentation().GetNumberOfSegments())]
    return {s: scene.read(seg, s, logic.volumeNode) for s in ids}


def test_a_first_session_from_click_to_dicom_seg(monkeypatch, tmp_path, tiny_predictor):
    scene = Scene(monkeypatch)
    volume, written = _dicom_volume(scene, tmp_path)
    engine = RecordingEngine(tiny_predictor)
    logic = PanelLogic(scene.scene, engine=engine, licenceStore={})
    red = scene.slice_node("Axial", "Red")
    positive, negative = scene.points_node("positive"), scene.points_node("negative")
    roi = scene.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    logic.setPromptNodes(positive, negative, roi)

    # 1. Choose the volume: encoding starts in the background, with its count in the status.
    logic.setSource(volume, model=TEST_MODEL, device="cpu")
    assert logic.activity() == Activity.ENCODING
    logic.waitIdle(includeEncoding=True)
    assert engine.created == 1 and logic.encodingText == "encoded 20 slices"
    handle = logic.currentHandle()
    assert handle.encoded == 20 and handle.intensity == "400,40"  # the view's W/L when it started
    assert len(engine.session(handle.sessionId).feature_cache) == 20

    # 2. Click in the red view: a preview on that slice only, and no undo state of its own.
    logic.ensureOutput()
    liver = logic.segmentId
    setSegmentTerminology(logic.segmentationNode, liver, LIVER_ENTRY)  # as the terminology selector does
    logic.notePromptView(red)
    positive.AddControlPoint(*scene.world(volume, (15, 18, 10)))
    logic.requestPreview()
    logic.waitIdle()
    assert len(engine.sent) == 1 and np.round(engine.sent[0][1].points_ijk[0]).tolist() == [15, 18, 10]
    (preview,) = engine.previews[0]
    shown = scene.read(logic.segmentationNode, liver, volume)
    assert preview.slice_index == 10 and not np.delete(shown, 10, axis=0).any(), "a preview writes its slice only"
    np.testing.assert_array_equal(shown[10], preview.mask)
    assert logic.writer.canUndo()

    # 3. Window/level changes in the views: same session, same window, prompts kept.
    volume.GetDisplayNode().SetWindowLevel(1500, -600)
    logic.onDisplayChanged()
    assert logic.currentHandle() is handle and logic.intensityText() == "400,40" and engine.created == 1

    # 4. A box by two corner clicks: nothing after the first, one preview after the second.
    sent = len(engine.sent)
    roi.AddControlPoint(*scene.world(volume, (8, 10, 10)))
    logic.tick()
    logic.waitIdle()
    assert len(engine.sent) == sent, "the first corner alone is not a box"
    roi.AddControlPoint(*scene.world(volume, (24, 28, 10)))
    logic.tick()
    logic.waitIdle()
    assert len(engine.sent) == sent + 1
    box = engine.sent[-1][1].boxes[0]
    assert np.round(box[0]).tolist() == [8, 10, 10] and np.round(box[1]).tolist() == [24, 28, 10]
    logic.tick()
    logic.waitIdle()
    assert len(engine.sent) == sent + 1, "an unchanged box is previewed once"

    # 5. Propagate through the volume: one undo state covers the previews and the run.
    logic.propagate(PropagationRequest())
    assert logic.controls()["addSegmentButton"] is False, "session controls wait for the run"
    logic.waitIdle()
    assert logic.status.startswith("done: slices")
    after_first = scene.read(logic.segmentationNode, liver, volume)
    np.testing.assert_array_equal(after_first, engine.fetch_mask(handle.sessionId, 1))
    assert after_first.sum() > 0 and np.delete(after_first, 10, axis=0).any(), "the run wrote beyond the prompted slice"

    # 6. Propagate again and cancel at once: the segment stays as it was.
    logic.propagate(PropagationRequest())
    logic.cancel()
    logic.waitIdle()
    assert logic.status in ("cancelled: the segment is unchanged", "propagating")  # cancelled before it started
    np.testing.assert_array_equal(scene.read(logic.segmentationNode, liver, volume), after_first)

    # 7. A correction on another slice, propagated over slices 12..16 only: the rest is kept.
    logic.clearMarkups()
    negative.AddControlPoint(*scene.world(volume, (30, 5, 14)))
    positive.AddControlPoint(*scene.world(volume, (15, 18, 14)))
    logic.propagate(PropagationRequest(sliceRange=(12, 16)))
    logic.waitIdle()
    corrected = scene.read(logic.segmentationNode, liver, volume)
    np.testing.assert_array_equal(
        np.delete(corrected, range(12, 17), axis=0), np.delete(after_first, range(12, 17), axis=0)
    )
    np.testing.assert_array_equal(corrected[12:17], engine.fetch_mask(handle.sessionId, 1)[12:17])

    # 8. Paint slice 4 and propagate it as a mask prompt.
    logic.clearMarkups()
    painted = np.zeros((40, 36), np.uint8)
    painted[14:22, 12:20] = 1
    logic.writer.writePreview(logic.segmentationNode, liver, volume, 2, 4, painted)  # a paint stroke's write
    scene.show_slice(red, volume, (0, 0, 4))
    logic.settings.usePaintedSlice = True
    logic.propagate(PropagationRequest(sliceRange=(2, 6)))
    logic.waitIdle()
    logic.settings.usePaintedSlice = False
    np.testing.assert_array_equal(engine.sent[-1][1].masks[4], painted)
    finished = scene.read(logic.segmentationNode, liver, volume)

    # 9. A second segment beside the finished one, the editor set not to overwrite others.
    logic.writer.editorNode.SetOverwriteMode(logic.writer.editorNode.OverwriteNone)
    tumour = logic.addSegment("tumour")
    positive.AddControlPoint(*scene.world(volume, (14, 17, 10)))
    logic.propagate(PropagationRequest(sliceRange=(6, 14)))
    logic.waitIdle()
    both = _read_all(scene, logic)
    np.testing.assert_array_equal(both[liver], finished)
    assert finished.any() and both[tumour].any()
    engine_tumour = engine.fetch_mask(handle.sessionId, 2)
    assert (finished & engine_tumour).any(), "the model's tumour overlaps the liver: the editor setting decided"
    np.testing.assert_array_equal(both[tumour][6:15], engine_tumour[6:15])
    assert {o for o, _b in engine.sent} == {1, 2}, "each segment is its own object in one session"

    # 10. Undo and redo through the Segment Editor logic's history.
    assert logic.undo()
    undone = _read_all(scene, logic)
    assert not undone[tumour].any() and np.array_equal(undone[liver], finished)
    assert logic.redo()
    np.testing.assert_array_equal(_read_all(scene, logic)[tumour], both[tumour])

    # 11. DICOM-SEG through the engine's writer, referencing the source series, inserted once.
    imported = []
    result = exportDicomSeg(
        logic.segmentationNode, volume, Database(written), imported.append, modelName="test", checkpoint="random"
    )
    assert imported == [str(result.path.parent)] and [p.name for p in result.path.parent.iterdir()] == [
        result.path.name
    ]
    import pydicom

    seg = pydicom.dcmread(result.path)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == written.series_uid
    labels = {s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence}
    assert labels.get("Segment_1") == "10200004", labels  # the terminology chosen, not "Tissue"
    EXPORTED["seg"] = result.path

    # 12. Close the scene: no engine session is left.
    logic.close()
    logic.sessions.waitForBackground()
    assert engine.open_sessions() == 0


def test_the_exported_dicom_seg_passes_dciodvfy():
    from dicom_tools import dciodvfy_errors

    if "seg" not in EXPORTED:
        pytest.skip("the session test did not export a DICOM-SEG")
    assert dciodvfy_errors(EXPORTED["seg"]) == []
