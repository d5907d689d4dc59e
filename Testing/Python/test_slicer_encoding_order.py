"""Background encoding starts at the slice the radiologist is looking at: the Red view's slice first,
then its neighbours, so a click there previews without waiting for the rest of the volume."""

from __future__ import annotations

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML for Python) is not installed")
pytest.importorskip("sam2", reason="the in-process engine needs sam2")

from slicer_scene import SHAPE, TEST_MODEL, RecordingEngine, Scene  # noqa: E402

from medsam2.session import SegmentationSession  # noqa: E402
from MedSAM2SlicerLib.logic import PanelLogic  # noqa: E402


def test_encoding_starts_at_the_slice_in_view(monkeypatch, tiny_predictor):
    scene = Scene(monkeypatch)
    volume = scene.add_volume()
    red = scene.slice_node("Axial", "Red")
    k = SHAPE[0] // 3  # not the middle, not the first: the order must come from the view
    scene.show_slice(red, volume, (SHAPE[2] // 2, SHAPE[1] // 2, k))
    starts: list[object] = []
    precompute = SegmentationSession.precompute_features

    def recording(self, progress=None, from_slice=None):
        starts.append(from_slice)
        return precompute(self, progress, from_slice)

    monkeypatch.setattr(SegmentationSession, "precompute_features", recording)
    engine = RecordingEngine(tiny_predictor)
    logic = PanelLogic(scene.scene, engine=engine, licenceStore={})
    logic.encodingView = red  # what the widget sets: the Red view
    logic.setSource(volume, model=TEST_MODEL, device="cpu")
    logic.waitIdle(includeEncoding=True)
    assert starts == [k]
    handle = logic.currentHandle()
    assert handle.encoded == SHAPE[0]
    assert len(engine.session(handle.sessionId).feature_cache) == SHAPE[0]
    logic.close()


def test_precompute_from_a_slice_encodes_it_and_its_neighbours_first(tiny_predictor, monkeypatch):
    import numpy as np

    from medsam2.errors import InvalidPromptError

    volume = np.random.default_rng(0).normal(0, 1, (9, 32, 32)).astype(np.float32)
    session = SegmentationSession(tiny_predictor, volume)
    order: list[int] = []
    encode = tiny_predictor.encode_frames

    def recording(state, indices):
        order.extend(indices)
        return encode(state, indices)

    monkeypatch.setattr(tiny_predictor, "encode_frames", recording)
    session.precompute_features(from_slice=6)
    assert order[:5] == [6, 7, 5, 8, 4] and sorted(order) == list(range(9))
    with pytest.raises(InvalidPromptError, match="outside the volume"):
        session.precompute_features(from_slice=9)
