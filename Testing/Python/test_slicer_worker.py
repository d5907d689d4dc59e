"""The panel's background work: the worker's state machine, encoding that gives way to a click and
stops between slices, cancel and failure leaving the segment as it was, closing in any state, and the
server engine writing the same voxels as the local one."""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML for Python) is not installed")
pytest.importorskip("sam2", reason="the in-process engine needs sam2")

from slicer_scene import TEST_MODEL, RecordingEngine, Scene  # noqa: E402

from MedSAM2SlicerLib.engine_client import PropagationOutcome  # noqa: E402
from MedSAM2SlicerLib.logic import PanelLogic  # noqa: E402
from MedSAM2SlicerLib.panel_state import Activity  # noqa: E402
from MedSAM2SlicerLib.runs import PropagationRequest, writtenRange  # noqa: E402
from MedSAM2SlicerLib.worker import BackgroundWorker, WorkerState, WorkerStateError  # noqa: E402


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
    assert events == [WorkerState.PREPARING, WorkerState.PROPAGATING, (3, 3), WorkerState.DONE]
    gate2 = threading.Event()
    worker.start(lambda context: gate2.wait(30) and "late")
    worker.cancel()
    gate2.set()
    worker.wait(30)
    worker.drain()
    assert worker.state == WorkerState.CANCELLED and worker.result is None


def test_written_range_covers_the_rest_of_a_direction_that_stopped():
    outcome = PropagationOutcome(
        masks={1: np.zeros((24, 4, 4), np.uint8)},
        propagated={1: (8, 14)},
        stopped_early={1: ["forward"]},
        axis=2,
        num_slices=24,
    )
    assert writtenRange(outcome, 1, PropagationRequest()) == (8, 23)
    assert writtenRange(outcome, 1, PropagationRequest(sliceRange=(4, 18))) == (8, 18)
    outcome.stopped_early = {}
    assert writtenRange(outcome, 1, PropagationRequest()) == (8, 14)


def tick_until(logic, event, timeout=120.0):
    """What the widget's QTimer does: deliver events and start queued jobs while waiting."""
    for _ in range(int(timeout / 0.05)):
        logic.tick()
        if event.wait(0.05):
            return True
    return False


class GatedEngine(RecordingEngine):
    """Holds encoding after its second slice until the test lets it go."""

    def __init__(self, predictor):
        super().__init__(predictor)
        self.reached, self.proceed = threading.Event(), threading.Event()

    def session(self, session_id):
        session = super().session(session_id)
        original = session.precompute_features
        engine = self

        def gated(progress=None, from_slice=None):
            def report(done, total):
                if progress:
                    progress(done, total)
                if done == 2 and not engine.proceed.is_set():
                    engine.reached.set()
                    engine.proceed.wait(60)

            return original(report, from_slice)

        session.precompute_features = gated
        return session


@pytest.fixture
def panel(monkeypatch, tiny_predictor):
    scene = Scene(monkeypatch)
    volume = scene.add_volume()
    engine = GatedEngine(tiny_predictor)
    logic = PanelLogic(scene.scene, engine=engine, licenceStore={})
    positive = scene.points_node()
    logic.setPromptNodes(positive, scene.points_node("negative"), None)
    logic.settings.model, logic.settings.device = TEST_MODEL, "cpu"
    yield scene, volume, engine, logic, positive
    engine.proceed.set()
    logic.close()
    logic.worker.wait(120)


def test_a_click_during_encoding_previews_first_and_encoding_resumes(panel):
    scene, volume, engine, logic, positive = panel
    logic.setSource(volume)
    assert engine.reached.wait(120)
    logic.tick()
    assert logic.activity() == Activity.ENCODING and logic.encodingText == "encoding 2/24"
    assert logic.controls()["positivePointButton"] and logic.controls()["applyButton"]
    logic.ensureOutput()
    positive.AddControlPoint(*scene.world(volume, (15, 18, 12)))
    logic.requestPreview()  # encoding is asked to stop between slices...
    engine.proceed.set()
    logic.waitIdle()
    assert len(engine.previews) == 1, "...the preview runs next"
    handle = logic.currentHandle()
    logic.waitIdle(includeEncoding=True)  # then encoding resumes where it stopped
    assert handle.encoded == 24 and engine.created == 1
    assert len(engine.session(handle.sessionId).feature_cache) == 24


def test_choosing_another_volume_stops_the_first_ones_encoding_and_closes_its_session(panel):
    scene, volume, engine, logic, positive = panel
    logic.setSource(volume)
    assert engine.reached.wait(120)
    first = logic.currentHandle()
    other = scene.add_volume(name="MR", shape=(12, 40, 36))
    logic.setSource(other)
    engine.proceed.set()
    logic.waitIdle(includeEncoding=True)
    logic.sessions.waitForBackground()
    assert first.closed and first.encoded < 24
    second = logic.currentHandle()
    assert second.encoded == 12 and engine.open_sessions() == 1


def test_a_model_with_a_restrictive_licence_is_not_used_before_it_is_accepted(panel):
    scene, volume, engine, logic, positive = panel
    engine.proceed.set()
    logic.setSource(volume, model="medsam2-latest")
    assert logic.licencePending is not None and "CC-BY-SA-4.0" in logic.licencePending.text()
    assert logic.activity() == Activity.IDLE and engine.created == 0, "nothing encoded (or downloaded) yet"
    logic.answerLicence(False)
    logic.waitIdle(includeEncoding=True)
    assert engine.created == 0 and logic.error
    logic.answerLicence(True)
    logic.waitIdle(includeEncoding=True)
    assert engine.created == 1 and logic.licencePending is None
    assert PanelLogic(scene.scene, engine=engine, licenceStore=logic.licences.store).licences.accepted("medsam2-latest")


def test_cancel_mid_propagation_leaves_the_segment_unchanged_and_a_failure_says_one_line(panel):
    scene, volume, engine, logic, positive = panel
    engine.proceed.set()
    logic.setSource(volume)
    logic.ensureOutput()
    positive.AddControlPoint(*scene.world(volume, (15, 18, 12)))
    reached, proceed = threading.Event(), threading.Event()
    original = engine.propagate

    def held(*args, progress=None, **kwargs):
        def report(done, total):
            progress(done, total)
            if done == 3:
                reached.set()
                proceed.wait(60)

        return original(*args, progress=report, **kwargs)

    engine.propagate = held
    logic.propagate(PropagationRequest())
    assert tick_until(logic, reached)
    logic.tick()
    assert logic.activity() == Activity.PROPAGATING
    assert not logic.controls()["undoButton"] and not logic.controls()["modelSelector"]
    logic.cancel()
    assert logic.activity() == Activity.CANCELLING
    proceed.set()
    logic.waitIdle()
    assert logic.status == "cancelled: the segment is unchanged"
    assert not scene.read(logic.segmentationNode, logic.segmentId, volume).any()
    assert not logic.writer.canUndo()

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered\nlong trace")

    engine.propagate = broken
    logic.propagate(PropagationRequest())
    logic.waitIdle()
    assert logic.error and logic.status == "unexpected error (RuntimeError): CUDA error: device-side assert triggered"
    assert not scene.read(logic.segmentationNode, logic.segmentId, volume).any()


def test_closing_while_the_session_is_being_made_leaves_no_session(panel):
    scene, volume, engine, logic, positive = panel
    made, release = threading.Event(), threading.Event()
    original = engine.create_session

    def slow(*args, **kwargs):
        made.set()
        release.wait(60)
        return original(*args, **kwargs)

    engine.create_session = slow
    logic.setSource(volume)
    assert made.wait(60)
    logic.close()  # the scene closes while the volume is still being prepared
    release.set()
    assert logic.worker.wait(120)
    logic.sessions.waitForBackground()
    assert engine.open_sessions() == 0


def test_a_session_per_axis_keeps_its_prompts_and_rewindow_keeps_them_too(panel):
    scene, volume, engine, logic, positive = panel
    engine.proceed.set()
    logic.setSource(volume)
    logic.ensureOutput()
    red, yellow = scene.slice_node("Axial", "Red"), scene.slice_node("Sagittal", "Yellow")
    logic.notePromptView(red)
    positive.AddControlPoint(*scene.world(volume, (15, 18, 12)))
    logic.requestPreview()
    logic.waitIdle()
    axial = logic.currentHandle()
    logic.notePromptView(yellow)  # a click in another view: its own session...
    sagittal = logic.currentHandle()
    assert sagittal is not axial and sagittal.axis == 0
    logic.notePromptView(red)
    assert logic.currentHandle() is axial and axial.log, "...and the axial one kept its prompts"
    volume.GetDisplayNode().SetWindowLevel(80, 40)
    assert logic.rewindow() == "80,40"
    fresh = logic.currentHandle()
    assert fresh is not axial and fresh.intensity == "80,40" and fresh.log == axial.log
    logic.waitIdle(includeEncoding=True)
    sent_before = len(engine.sent)
    logic.propagate(PropagationRequest(sliceRange=(10, 14)))
    logic.waitIdle()
    assert engine.created >= 2 and len(engine.sent) == sent_before + 1
    assert fresh.objectIds == axial.objectIds


@contextlib.contextmanager
def _serve(app):
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


def test_the_server_engine_writes_the_same_voxels_and_its_session_is_closed(monkeypatch, tiny_predictor):
    create_app = pytest.importorskip("medsam2.server.app", reason="no inference server here").create_app
    settings = pytest.importorskip("medsam2.server.settings", reason="no inference server here")
    pytest.importorskip("uvicorn", reason="uvicorn (the server's HTTP runtime) is not installed")
    from MedSAM2SlicerLib.engine_client import LocalEngineClient
    from MedSAM2SlicerLib.remote_settings import ServerSettings, engineFor, testConnection

    token = secrets.token_urlsafe(32)
    app = create_app(
        settings.ServerSettings(token=token, models=("tiny-test",), memory_budget_bytes=256 << 20),
        lambda name: tiny_predictor,
    )
    scene = Scene(monkeypatch)
    volume = scene.add_volume()
    results = []
    with _serve(app) as url:
        server = ServerSettings(url, token)
        assert testConnection(server).startswith(f"connected to {url}")
        for engine in (LocalEngineClient(predictor_loader=lambda *a: tiny_predictor), engineFor(server)):
            logic = PanelLogic(scene.scene, engine=engine, licenceStore={})
            positive = scene.points_node()
            logic.setPromptNodes(positive, None, None)
            logic.settings.model, logic.settings.device, logic.settings.windowPreset = "tiny-test", "cpu", "abdomen"
            positive.AddControlPoint(*scene.world(volume, (15, 18, 10)))
            segmentation, segment = logic.segment(
                volume, [scene.world(volume, (15, 18, 10))], request=PropagationRequest(sliceRange=(4, 16))
            )
            results.append(scene.read(segmentation, segment, volume))
            logic.close()
            logic.sessions.waitForBackground()
            assert not logic.sessions.handles
    np.testing.assert_array_equal(results[1], results[0])
