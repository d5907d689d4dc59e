"""The inference server: the FastAPI app through TestClient, and a real uvicorn on 127.0.0.1 driven by
RemoteSession. Masks from the server must equal, voxel for voxel, what an in-process
SegmentationSession gives on the same volume, prompts and (random, seeded) weights."""

from __future__ import annotations

import datetime
import gzip
import http.client
import io
import ipaddress
import json
import secrets
import socket
import sys
import threading
import time
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient

from medsam2.cli.main import build_parser
from medsam2.cli.main import main as cli_main
from medsam2.errors import (
    InvalidPromptError,
    InvalidVolumeError,
    MedSAM2Error,
    ModelError,
    PropagationCancelled,
)
from medsam2.geometry import VolumeGeometry
from medsam2.models.build import build_predictor
from medsam2.remote import (
    AuthenticationError,
    RemoteSession,
    ServerBusyError,
    ServerUnavailableError,
    SessionBusyError,
    SessionExpiredError,
    wire,
)
from medsam2.server import serve
from medsam2.server.app import create_app
from medsam2.server.locking import FairLock, SerialisedPredictor
from medsam2.server.settings import TOKEN_ENV, ServerConfigError, ServerSettings
from medsam2.session import SegmentationSession

TOKEN = secrets.token_urlsafe(32)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "tiny-test"
WAIT = 120.0  # bound on any wait for a background run (a guard against hangs, not a timing assertion)


# ----------------------------------------------------------------------------- cases
def _phantom(shape, centre, radii, inside, outside, noise, seed, dtype) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=float)
    d = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True))
    return (np.where(d <= 1, inside, outside) + rng.normal(0, noise, shape)).astype(dtype)


@dataclass
class Case:
    volume: np.ndarray
    geometry: Optional[VolumeGeometry]
    axis: str
    intensity: str
    prompts: list[tuple[Any, ...]]
    correction: tuple[Any, ...]
    reference: dict[str, Any] = field(default_factory=dict)


def _case_a() -> Case:
    # CT-like int16 in Hounsfield-ish units, axial, two objects (a click and a box).
    vol = _phantom((6, 40, 48), (2.5, 20, 24), (4, 10, 12), 120, -50, 15, 1, np.int16)
    return Case(
        volume=vol,
        geometry=VolumeGeometry(spacing=(0.8, 0.8, 2.5), origin=(-20.0, 10.0, 5.0)),
        axis="axial",
        intensity="400,40",
        prompts=[("points", 1, [[24, 20, 2]], [1]), ("box", 2, [8, 8, 3], [20, 18, 3])],
        correction=("points", 1, [[31, 26, 4]], [0]),
    )


def _case_b() -> Case:
    # MR-like float32 with a zero background, sliced coronally (rows flipped so the head is up).
    vol = _phantom((36, 7, 40), (18, 3, 20), (12, 5, 10), 300.0, 80.0, 10.0, 2, np.float32)
    vol[:, :, :3] = 0
    return Case(
        volume=vol,
        geometry=VolumeGeometry(spacing=(1.0, 1.5, 1.0)),
        axis="coronal",
        intensity="mri",
        prompts=[("points", 1, [[20, 3, 18]], [1])],
        correction=("points", 1, [[12, 4, 10]], [0]),
    )


def _apply(session: Any, prompt: tuple[Any, ...]) -> np.ndarray:
    """One prompt on either a SegmentationSession or a RemoteSession: the same calls."""
    kind, obj, *args = prompt
    if kind == "points":
        return session.add_points(obj, *args).mask
    return session.add_box(obj, *args).mask


def _drive(session: Any, case: Case) -> dict[str, Any]:
    out: dict[str, Any] = {"previews": [_apply(session, p) for p in case.prompts]}
    out["masks"] = {o: m.copy() for o, m in session.propagate().masks.items()}
    out["correction_preview"] = _apply(session, case.correction)
    out["corrected"] = {o: m.copy() for o, m in session.propagate(mode="full").masks.items()}
    return out


@pytest.fixture(scope="module")
def predictor():
    return build_predictor("configs/sam2.1/sam2.1_hiera_t.yaml", image_size=128, seed=0)


@pytest.fixture(scope="module")
def cases(predictor) -> dict[str, Case]:
    """Each case run once in process: the reference every server result must equal exactly."""
    out = {"a": _case_a(), "b": _case_b()}
    for case in out.values():
        session = SegmentationSession(
            predictor,
            case.volume,
            case.geometry,
            axis=case.axis,
            intensity=case.intensity,
            memory_budget_bytes=1 << 30,
        )
        case.reference = _drive(session, case)
    return out


# ----------------------------------------------------------------------------- helpers
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _settings(**kw: Any) -> ServerSettings:
    base: dict[str, Any] = dict(token=TOKEN, models=(MODEL,), memory_budget_bytes=256 << 20)
    base.update(kw)
    return ServerSettings(**base)


def _app(predictor, clock: Callable[[], float] = time.monotonic, **kw: Any):
    return create_app(_settings(**kw), lambda name: predictor, clock=clock)


def _query(case: Case) -> dict[str, str]:
    g = case.geometry or VolumeGeometry()
    return {
        "spacing": ",".join(map(repr, g.spacing)),
        "origin": ",".join(map(repr, g.origin)),
        "direction": ",".join(map(repr, g.direction)),
        "axis": case.axis,
        "intensity": case.intensity,
        "model": MODEL,
    }


def _upload(client: TestClient, volume: np.ndarray, params: Optional[dict[str, str]] = None, **kw: Any):
    return client.post(
        "/sessions", content=wire.encode_volume(volume), headers=AUTH, params=params or {}, **kw
    )


def _points_body(obj: int, points: list[list[float]], labels: list[int]) -> dict[str, Any]:
    return {"type": "points", "object_id": obj, "points": points, "labels": labels}


def _wait_run(client: TestClient, sid: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while True:
        status = client.get(f"/sessions/{sid}/propagate/status", headers=AUTH).json()
        if status["state"] != "running":
            return status
        assert time.monotonic() < deadline, "background run never finished"
        time.sleep(0.02)


def _get_mask(client: TestClient, sid: str, obj: int, slice_index: Optional[int] = None):
    params = {"slice": str(slice_index)} if slice_index is not None else {}
    r = client.get(f"/sessions/{sid}/masks/{obj}", headers=AUTH, params=params)
    assert r.status_code == 200, r.text
    return wire.decode_mask(r.content, wire.parse_shape(r.headers[wire.SHAPE_HEADER])), r.headers


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def _detail(response) -> str:
    body = response.json()
    assert "\n" not in body["detail"] and body["detail"], body
    return body["detail"]


class Gate:
    """Pauses a server session's propagation just before it tracks slice ``frame`` (test hook)."""

    def __init__(self, engine_session: Any, frame: int) -> None:
        self.paused, self.resume = threading.Event(), threading.Event()
        original = engine_session._track

        def gated(object_id: int, f: int, reverse: bool):
            if f == frame and not reverse:
                self.paused.set()
                assert self.resume.wait(WAIT)
            return original(object_id, f, reverse)

        engine_session._track = gated
        self._session, self._original = engine_session, original

    def remove(self) -> None:
        self._session._track = self._original
        self.resume.set()


# ----------------------------------------------------------------------------- auth and schema
def test_health_is_open_and_every_other_route_needs_the_token(predictor):
    with TestClient(_app(predictor)) as client:
        assert client.get("/health").json()["status"] == "ok"
        for method, path in [
            ("GET", "/info"),
            ("GET", "/openapi.json"),
            ("POST", "/sessions"),
            ("GET", "/sessions/abc"),
            ("GET", "/no/such/route"),  # 401, not 404: nothing is revealed without the token
        ]:
            for headers in (
                {},
                {"Authorization": "Bearer " + "x" * 43},
                {"Authorization": f"Bearer {TOKEN}x"},
            ):
                r = client.request(method, path, headers=headers)
                assert r.status_code == 401, (method, path, headers)
                assert r.headers["www-authenticate"].startswith("Bearer")
                assert "token" in _detail(r)
        assert client.get("/info", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
        assert client.get("/sessions/abc", headers=AUTH).status_code == 404


def test_openapi_schema_lists_the_routes_and_the_bearer_scheme(predictor):
    with TestClient(_app(predictor)) as client:
        schema = client.get("/openapi.json", headers=AUTH).json()
    paths = schema["paths"]
    expected = {
        "/health": {"get"},
        "/info": {"get"},
        "/sessions": {"post"},
        "/sessions/{session_id}": {"get", "delete"},
        "/sessions/{session_id}/prompts": {"post"},
        "/sessions/{session_id}/propagate": {"post"},
        "/sessions/{session_id}/propagate/status": {"get"},
        "/sessions/{session_id}/cancel": {"post"},
        "/sessions/{session_id}/masks/{object_id}": {"get"},
        "/sessions/{session_id}/precompute": {"post"},
        "/sessions/{session_id}/reset": {"post"},
        "/sessions/{session_id}/objects/{object_id}": {"delete"},
        "/sessions/{session_id}/objects/{object_id}/slices/{slice_index}": {"delete"},
    }
    for path, methods in expected.items():
        assert methods <= set(paths.get(path, {})), path
    assert schema["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert "security" not in paths["/health"]["get"]
    assert paths["/sessions"]["post"]["security"] == [{"bearerAuth": []}]
    assert wire.VOLUME_MEDIA_TYPE in paths["/sessions"]["post"]["requestBody"]["content"]
    assert {"slice"} <= {
        p["name"] for p in paths["/sessions/{session_id}/masks/{object_id}"]["get"]["parameters"]
    }


def test_server_refuses_to_start_without_a_strong_token(predictor, tmp_path):
    factory = lambda name: predictor  # noqa: E731
    with pytest.raises(ServerConfigError, match="no API token") as err:
        create_app(ServerSettings(), factory, environ={})
    assert "\n" not in str(err.value) and "token-file" in str(err.value)
    with pytest.raises(ServerConfigError, match="too weak"):
        create_app(ServerSettings(token="short"), factory, environ={})
    with pytest.raises(ServerConfigError, match="cannot read token file"):
        create_app(ServerSettings(token_file=str(tmp_path / "missing")), factory, environ={})
    token_file = tmp_path / "token.txt"
    token_file.write_text(TOKEN + "\n")
    for settings, environ in [
        (ServerSettings(token_file=str(token_file)), {}),
        (ServerSettings(), {TOKEN_ENV: TOKEN}),
    ]:
        with TestClient(create_app(settings, factory, environ=environ)) as client:
            assert client.get("/info", headers=AUTH).status_code == 200
            assert client.get("/info", headers={"Authorization": "Bearer " + "y" * 43}).status_code == 401
    with pytest.raises(ServerConfigError, match="both a certificate"):
        create_app(ServerSettings(token=TOKEN, tls_certfile=str(token_file)), factory)


def serve_main(argv: list[str]) -> int:
    """``medsam2 serve ARGV...``, in this process (the registry and uvicorn are stood in for)."""
    return cli_main(["serve", *argv])


def test_default_bind_is_loopback_and_the_serve_command(predictor, monkeypatch, capsys, tmp_path):
    assert ServerSettings().host == "127.0.0.1" and ServerSettings().loopback_only
    assert not ServerSettings(host="0.0.0.0").loopback_only
    args = build_parser().parse_args(["serve", "--model", MODEL])  # how the command line wires it
    assert args.host == "127.0.0.1" and args.handler is serve.run_server

    # The registry is stood in for (its own tests cover it): this checks the server's use of it.
    registry = types.ModuleType("medsam2.models.registry")
    registry.DEFAULT_MODEL = "registry-default"  # type: ignore[attr-defined]
    loads: list[tuple[Any, ...]] = []

    def load_model(name=None, checkpoint=None, config=None, image_size=None, device="cpu"):
        if name == "missing":
            raise ModelError("unknown model 'missing'; see medsam2 models list")
        loads.append((name, checkpoint, config, image_size, str(device)))
        return predictor, object()

    registry.load_model = load_model  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "medsam2.models.registry", registry)
    started: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(kw, app=app))

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert serve_main(["--model", MODEL]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medsam2 serve: error: no API token") and "\n" not in err and "Traceback" not in err
    assert not started

    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert serve_main(["--device", "cpu", "--max-sessions", "2"]) == 0
    assert started["host"] == "127.0.0.1" and started["port"] == 8765 and started["ssl_certfile"] is None
    settings = started["app"].state.settings
    assert settings.models == ("registry-default",) and settings.max_sessions == 2
    assert loads == [("registry-default", None, None, None, "cpu")]  # loaded before serving

    checkpoint = tmp_path / "my_finetune.pt"
    argv = [
        "--checkpoint",
        str(checkpoint),
        "--config",
        "configs/x.yaml",
        "--image-size",
        "512",
        "--device",
        "cpu",
    ]
    assert serve_main(argv) == 0
    assert started["app"].state.settings.models == ("my_finetune",)
    assert loads[-1] == (None, str(checkpoint), "configs/x.yaml", 512, "cpu")

    assert serve_main(["--model", "missing", "--device", "cpu"]) == 3  # the command line's "model" exit code
    assert "unknown model 'missing'" in capsys.readouterr().err
    assert serve_main(["--checkpoint", "a.pt", "--model", "a", "--model", "b"]) == 2
    assert serve_main(["--model", MODEL, "--tls-cert", str(checkpoint)]) == 2
    assert "both a certificate" in capsys.readouterr().err


# ----------------------------------------------------------------------------- limits
def test_oversized_malformed_and_invalid_uploads_are_refused_with_a_message(predictor):
    vol = np.zeros((4, 32, 32), np.int16)
    vol[:, 8:20, 8:20] = 100
    with TestClient(_app(predictor, max_upload_bytes=4096, max_voxels=8000)) as client:
        big = np.random.default_rng(0).integers(-1000, 1000, (4, 32, 32)).astype(np.int16)  # incompressible
        r = _upload(client, big)
        assert r.status_code == 413 and "limit of 4,096 bytes" in _detail(r)
        chunked = client.post("/sessions", content=iter([wire.encode_volume(big)]), headers=AUTH)  # no length
        assert chunked.status_code == 413 and "limit of 4,096 bytes" in _detail(chunked)
        r = client.post(
            "/sessions/x/prompts", content=iter([b"{}"]), headers={**AUTH, "Content-Type": "application/json"}
        )
        assert r.status_code == 411

        r = _upload(client, np.zeros((10, 100, 100), np.int16))  # 100 kvoxels in a ~200-byte upload
        assert r.status_code == 413 and "100,000 voxels" in _detail(r) and "8,000" in _detail(r)
        bomb = gzip.compress(b"\x93NUMPY" + b"\0" * 4000)
        r = client.post("/sessions", content=bomb, headers=AUTH)
        assert r.status_code == 400 and ".npy" in _detail(r)

        good = wire.encode_volume(np.random.default_rng(1).integers(-999, 999, (2, 16, 16)).astype(np.int16))
        bad_bodies = {
            b"not a volume": "neither gzip nor .npy",
            good[: len(good) // 2]: "truncated",
            good + gzip.compress(b"junk"): "after the gzip stream",
            gzip.compress(_npy(np.array([{}, 1], dtype=object))): "not numeric",  # a pickle: never loaded
            b"": "empty upload",
        }
        for body, message in bad_bodies.items():
            r = client.post("/sessions", content=body, headers=AUTH)
            assert r.status_code == 400, (body[:20], r.text)
            assert message in _detail(r)

        nan = vol.astype(np.float32)
        nan[0, 0, 0] = np.nan
        assert "NaN" in _detail(_upload(client, nan))
        for params, message in [
            ({"spacing": "1,x,1"}, "spacing must be 3"),
            ({"direction": "1,0,0,0,1,0,0,0,5"}, "orthonormal"),
            ({"axis": "oblique"}, "axis must be"),
            ({"intensity": "nonsense"}, "unknown window preset"),
            ({"model": "other"}, "not served here"),
        ]:
            r = _upload(client, vol, params)
            assert r.status_code == 400 and message in _detail(r), params
        info = client.get("/info", headers=AUTH).json()
        assert info["sessions"] == 0 and info["memory_reserved_bytes"] == 0
        assert _upload(client, vol).status_code == 201  # and the server still works


def test_max_sessions_and_memory_budget_answer_503_with_retry_after(predictor):
    clock = FakeClock()
    vol = np.zeros((4, 32, 32), np.int16)
    vol[:, 8:20, 8:20] = 100
    # One session reserves its volume on the device (int16: 8 KiB) and a feature cache for its 4 slices
    # (4 * 4 * 128**2 float32 = 1 MiB): the budget fits one and a half.
    one = 4 * 32 * 32 * 2 + 4 * 4 * 128 * 128 * 4
    with TestClient(
        _app(predictor, clock, max_sessions=1, idle_seconds=300, memory_budget_bytes=3 * one // 2)
    ) as c:
        first = _upload(c, vol).json()["session_id"]
        assert c.get(f"/sessions/{first}", headers=AUTH).json()["reserved_bytes"] == one
        clock.now += 100
        r = _upload(c, vol)
        assert r.status_code == 503 and "1 of 1 sessions" in _detail(r)
        assert int(r.headers["retry-after"]) == 200  # when the idle session will expire
        assert c.delete(f"/sessions/{first}", headers=AUTH).status_code == 204
        assert c.get(f"/sessions/{first}", headers=AUTH).status_code == 404

    with TestClient(
        _app(predictor, clock, max_sessions=4, idle_seconds=300, memory_budget_bytes=3 * one // 2)
    ) as c:
        first = _upload(c, vol).json()["session_id"]
        r = _upload(c, vol)
        assert r.status_code == 503 and "memory budget is full" in _detail(r)
        assert int(r.headers["retry-after"]) >= 1
        huge = np.zeros((4, 512, 512), np.int16)  # its volume alone is over the whole budget
        r = _upload(c, huge)
        assert r.status_code == 413 and "whole memory budget" in _detail(r)
        c.delete(f"/sessions/{first}", headers=AUTH)
        assert _upload(c, vol).status_code == 201  # the closed session's budget came back


def test_idle_sessions_expire_and_free_their_slot(predictor):
    clock = FakeClock()
    vol = np.zeros((3, 32, 32), np.int16)
    vol[:, 8:20, 8:20] = 100
    app = _app(predictor, clock, max_sessions=1, idle_seconds=60)
    with TestClient(app) as client:
        sid = _upload(client, vol).json()["session_id"]
        clock.now += 59
        assert client.get(f"/sessions/{sid}", headers=AUTH).status_code == 200  # a request keeps it alive
        clock.now += 61
        r = client.get(f"/sessions/{sid}", headers=AUTH)
        assert r.status_code == 404 and "expired after 60 s" in _detail(r)
        assert r.json()["error"] == "SessionNotFoundError"
        assert client.get("/info", headers=AUTH).json()["memory_reserved_bytes"] == 0
        second = _upload(client, vol).json()["session_id"]  # the slot is free again
        clock.now += 61
        assert app.state.manager.expire_idle() == [second]  # what the background reaper calls
        r = client.get("/sessions/never-existed", headers=AUTH)
        assert r.status_code == 404 and "server restarted" in _detail(r)


# ----------------------------------------------------------------------------- engine behaviour
def test_prompts_propagation_and_correction_equal_the_in_process_engine(predictor, cases):
    case = cases["a"]
    ref = case.reference
    with TestClient(_app(predictor)) as client:
        r = client.post(
            "/sessions", content=wire.encode_volume(case.volume), headers=AUTH, params=_query(case)
        )
        assert r.status_code == 201, r.text
        sid = r.json()["session_id"]
        assert r.json()["num_slices"] == 6 and r.json()["shape"] == [6, 40, 48]

        for prompt, expected in zip(case.prompts, ref["previews"], strict=True):
            kind, obj, *args = prompt
            body = (
                _points_body(obj, *args)
                if kind == "points"
                else {"type": "box", "object_id": obj, "corners": [args[0], args[1]]}
            )
            r = client.post(f"/sessions/{sid}/prompts", headers=AUTH, json=body)
            assert r.status_code == 200, r.text
            np.testing.assert_array_equal(wire.decode_mask_b64(r.json()["data"], r.json()["shape"]), expected)

        r = client.post(f"/sessions/{sid}/propagate", headers=AUTH)
        assert r.status_code == 202 and r.json()["state"] == "running"
        status = _wait_run(client, sid)
        assert status["state"] == "done" and status["done"] == status["total"] > 0
        assert status["object_ids"] == [1, 2]
        for obj, expected in ref["masks"].items():
            mask, headers = _get_mask(client, sid, obj)
            np.testing.assert_array_equal(mask, expected)
            assert headers[wire.RUN_STATE_HEADER] == "done"
            one, headers = _get_mask(client, sid, obj, 4)
            np.testing.assert_array_equal(one, expected[4])
        encoded = client.get(f"/sessions/{sid}", headers=AUTH).json()["cache"]["encoded"]
        assert encoded == 6  # every slice encoded once

        r = client.post(f"/sessions/{sid}/prompts", headers=AUTH, json=_points_body(1, *case.correction[2:]))
        np.testing.assert_array_equal(
            wire.decode_mask_b64(r.json()["data"], r.json()["shape"]), ref["correction_preview"]
        )
        client.post(f"/sessions/{sid}/propagate", headers=AUTH)
        assert _wait_run(client, sid)["state"] == "done"
        for obj, expected in ref["corrected"].items():
            np.testing.assert_array_equal(_get_mask(client, sid, obj)[0], expected)
        cache = client.get(f"/sessions/{sid}", headers=AUTH).json()["cache"]
        assert (
            cache["encoded"] == encoded and cache["slices_cached"] == 6
        )  # the correction re-encoded nothing

        # The engine's own validation, as 400s (404 for an object that never ran) with its messages.
        r = client.post(f"/sessions/{sid}/prompts", headers=AUTH, json=_points_body(1, [[1, 1, 9]], [1]))
        assert r.status_code == 400 and r.json()["error"] == "InvalidPromptError" and "outside" in _detail(r)
        r = client.post(f"/sessions/{sid}/prompts", headers=AUTH, json={"type": "points", "object_id": "x"})
        assert r.status_code == 400 and "invalid request" in _detail(r)
        r = client.post(f"/sessions/{sid}/propagate", headers=AUTH, json={"direction": "sideways"})
        assert r.status_code == 400 and "direction must be" in _detail(r)
        r = client.get(f"/sessions/{sid}/masks/7", headers=AUTH)
        assert r.status_code == 404 and r.json()["error"] == "InvalidPromptError"
        r = client.get(f"/sessions/{sid}/masks/1", headers=AUTH, params={"slice": "6"})
        assert r.status_code == 400 and "outside the volume" in _detail(r)


def test_cancel_keeps_previous_masks_and_finished_slices_are_readable_while_running(predictor, cases):
    case = cases["a"]
    ref = case.reference
    app = _app(predictor)
    with TestClient(app) as client:
        sid = client.post(
            "/sessions", content=wire.encode_volume(case.volume), headers=AUTH, params=_query(case)
        )
        sid = sid.json()["session_id"]
        engine = app.state.manager.get(sid).session
        for prompt in case.prompts:
            _apply(engine, prompt)  # same prompts, straight into the server's session
        client.post(f"/sessions/{sid}/propagate", headers=AUTH)
        assert _wait_run(client, sid)["state"] == "done"
        r = client.post(f"/sessions/{sid}/prompts", headers=AUTH, json=_points_body(1, *case.correction[2:]))
        assert r.status_code == 200

        gate = Gate(engine, frame=4)  # the run pauses before slice 4: slices 2 and 3 are done
        try:
            assert client.post(f"/sessions/{sid}/propagate", headers=AUTH).status_code == 202
            assert gate.paused.wait(WAIT)
            status = client.get(f"/sessions/{sid}/propagate/status", headers=AUTH).json()
            assert status["state"] == "running" and status["done"] == 2
            for s in range(6):
                one, headers = _get_mask(client, sid, 1, s)
                fresh = headers[wire.SLICE_STATE_HEADER] == "current"
                assert fresh == (s in (2, 3)), s
                np.testing.assert_array_equal(one, (ref["corrected"] if fresh else ref["masks"])[1][s])
            whole, headers = _get_mask(client, sid, 1)
            np.testing.assert_array_equal(whole, ref["masks"][1])  # the last finished result
            assert headers[wire.RUN_STATE_HEADER] == "running"
            # The engine session is busy: other operations on it are refused, not interleaved.
            r = client.post(f"/sessions/{sid}/prompts", headers=AUTH, json=_points_body(1, [[5, 5, 1]], [1]))
            assert r.status_code == 409 and "cancel it" in _detail(r)
            assert client.post(f"/sessions/{sid}/propagate", headers=AUTH).status_code == 409

            assert client.post(f"/sessions/{sid}/cancel", headers=AUTH).status_code == 202
        finally:
            gate.remove()
        status = _wait_run(client, sid)
        assert status["state"] == "cancelled" and status["error_type"] == "PropagationCancelled"
        for obj, expected in ref["masks"].items():
            np.testing.assert_array_equal(_get_mask(client, sid, obj)[0], expected)

        client.post(f"/sessions/{sid}/propagate", headers=AUTH)  # after a cancel, a full run is exact
        assert _wait_run(client, sid)["state"] == "done"
        for obj, expected in ref["corrected"].items():
            np.testing.assert_array_equal(_get_mask(client, sid, obj)[0], expected)

        # Closing a session mid-run: gone at once; its memory returns when its worker has stopped.
        managed = app.state.manager.get(sid)
        gate = Gate(engine, frame=3)
        try:
            client.post(f"/sessions/{sid}/propagate", headers=AUTH)
            assert gate.paused.wait(WAIT)
            assert client.delete(f"/sessions/{sid}", headers=AUTH).status_code == 204
            assert client.get(f"/sessions/{sid}/propagate/status", headers=AUTH).status_code == 404
            assert app.state.manager.reserved_bytes == managed.reserved_bytes  # still held by the worker
        finally:
            gate.remove()
        assert managed.run is not None and managed.run.thread is not None
        managed.run.thread.join(WAIT)
        assert managed.run.state == "cancelled" and app.state.manager.reserved_bytes == 0


def test_a_failing_session_does_not_affect_another(predictor, cases):
    a, b = cases["a"], cases["b"]
    app = _app(predictor)
    with TestClient(app) as client:
        sids = {}
        for name, case in (("a", a), ("b", b)):
            r = client.post(
                "/sessions", content=wire.encode_volume(case.volume), headers=AUTH, params=_query(case)
            )
            sids[name] = r.json()["session_id"]
            for prompt in case.prompts:
                _apply(app.state.manager.get(sids[name]).session, prompt)
        broken = app.state.manager.get(sids["a"]).session
        original = broken._track

        def device_failure(*args: Any) -> Any:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors ...")

        broken._track = device_failure
        client.post(f"/sessions/{sids['a']}/propagate", headers=AUTH)
        client.post(f"/sessions/{sids['b']}/propagate", headers=AUTH)
        failed, done = _wait_run(client, sids["a"]), _wait_run(client, sids["b"])
        assert failed["state"] == "failed" and failed["error_type"] == "InternalError"
        assert "illegal memory access" in failed["error"] and "\n" not in failed["error"]
        assert done["state"] == "done"
        np.testing.assert_array_equal(_get_mask(client, sids["b"], 1)[0], b.reference["masks"][1])
        assert client.get("/health").status_code == 200

        broken._track = original  # the failed session itself is still usable
        client.post(f"/sessions/{sids['a']}/propagate", headers=AUTH)
        assert _wait_run(client, sids["a"])["state"] == "done"
        for obj, expected in a.reference["masks"].items():
            np.testing.assert_array_equal(_get_mask(client, sids["a"], obj)[0], expected)


# ----------------------------------------------------------------------------- real uvicorn
@contextmanager
def live_server(
    app, port: int = 0, certfile: Optional[str] = None, keyfile: Optional[str] = None
) -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(app, log_level="warning", ssl_certfile=certfile, ssl_keyfile=keyfile)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"{'https' if certfile else 'http'}://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def _remote(url: str, case: Case, **kw: Any) -> RemoteSession:
    return RemoteSession(
        url,
        TOKEN,
        case.volume,
        case.geometry,
        axis=case.axis,
        intensity=case.intensity,
        model=MODEL,
        poll_interval=0.02,
        **kw,
    )


def test_two_remote_clients_at_once_get_the_in_process_masks(predictor, cases):
    app = _app(predictor)
    results: dict[str, Any] = {}
    errors: list[BaseException] = []
    progress: dict[str, list[tuple[int, int]]] = {"a": [], "b": []}

    def client(name: str, url: str) -> None:
        try:
            case = cases[name]
            with _remote(url, case) as session:
                previews = [_apply(session, p) for p in case.prompts]
                first = session.propagate(progress=lambda d, t: progress[name].append((d, t)))
                encoded = session.cache_stats.encoded
                correction = _apply(session, case.correction)
                corrected = session.propagate()
                results[name] = dict(
                    previews=previews,
                    masks=first.masks,
                    correction_preview=correction,
                    corrected=corrected.masks,
                    encoded=(encoded, session.cache_stats.encoded),
                    num_slices=session.num_slices,
                    propagated=first.propagated,
                    object_ids=session.object_ids,
                )
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    with live_server(app) as url:
        threads = [threading.Thread(target=client, args=(n, url)) for n in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert not errors, errors
        assert httpx.get(url + "/info", headers=AUTH).json()["sessions"] == 0  # both closed

    for name, case in cases.items():
        got, ref = results[name], case.reference
        for key in ("previews", "masks", "correction_preview", "corrected"):
            _assert_same(got[key], ref[key])
        assert got["encoded"] == (got["num_slices"], got["num_slices"])  # correction: no re-encoding
        assert got["object_ids"] == sorted(ref["masks"])
        assert progress[name] and progress[name][-1][0] == progress[name][-1][1]
        assert all(d1 <= d2 for (d1, _), (d2, _) in zip(progress[name][:-1], progress[name][1:], strict=True))
    assert results["b"]["num_slices"] == 7  # case b was cut coronally, along j


def _assert_same(got: Any, expected: Any) -> None:
    if isinstance(expected, dict):
        assert sorted(got) == sorted(expected)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
    elif isinstance(expected, list):
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_array_equal(g, e)
    else:
        np.testing.assert_array_equal(got, expected)


def test_remote_errors_are_one_line_and_name_the_problem(predictor, cases):
    case = cases["a"]
    app = _app(predictor, max_sessions=1, max_upload_bytes=64 << 10)
    with live_server(app) as url:
        with pytest.raises(AuthenticationError, match="rejected the request: invalid token") as err:
            RemoteSession(url, "z" * 43, case.volume)
        _assert_one_line(err.value, url)

        session = _remote(url, case)
        with pytest.raises(ServerBusyError, match="1 of 1 sessions") as busy:
            _remote(url, case)
        assert busy.value.retry_after is not None and busy.value.retry_after >= 1
        _assert_one_line(busy.value, url)

        with pytest.raises(ModelError, match="not served here"):
            RemoteSession(url, TOKEN, case.volume, model="another-model")  # checked before the slots
        with pytest.raises(InvalidPromptError, match="outside the volume"):
            session.add_points(1, [[1, 1, 99]], [1])
        with pytest.raises(InvalidPromptError, match="non-finite"):
            session.add_points(1, [[1, np.nan, 2]], [1])
        with pytest.raises(InvalidPromptError, match="no prompts"):
            session.propagate()
        with pytest.raises(InvalidPromptError, match="has not been propagated"):
            session.mask(1)
        with pytest.raises(InvalidPromptError, match="expected"):
            session.add_mask(1, 2, np.ones((5, 5)))
        session.close()
        session.close()  # twice is harmless

        noise = np.random.default_rng(0).integers(-1000, 1000, (6, 128, 128)).astype(np.int16)
        with pytest.raises(InvalidVolumeError, match="upload limit"):  # checked before sending
            _remote(url, Case(noise, None, "axial", "400,40", [], ()))

        # The same refusals over plain HTTP, as any other client sees them.
        r = httpx.post(url + "/sessions", content=noise.tobytes(), headers=AUTH)
        assert r.status_code == 413 and "limit" in r.json()["detail"]
        r = httpx.post(url + "/sessions", content=b"\x1f\x8bgarbage", headers=AUTH)
        assert r.status_code == 400 and "gzip" in r.json()["detail"]
        r = httpx.post(url + "/sessions/nope/prompts", json=_points_body(1, [[1, 1, 1]], [1]), headers=AUTH)
        assert r.status_code == 404 and "create a new session" in r.json()["detail"]
        assert httpx.get(url + "/info").status_code == 401

    with pytest.raises(ServerUnavailableError, match="connection refused") as down:
        RemoteSession(url, TOKEN, case.volume)
    _assert_one_line(down.value, url)


def _assert_one_line(error: BaseException, url: str) -> None:
    assert isinstance(error, MedSAM2Error)
    assert "\n" not in str(error) and url in str(error)


def test_remote_cancel_leaves_the_previous_masks(predictor, cases):
    case = cases["b"]
    app = _app(predictor)
    with live_server(app) as url, _remote(url, case) as session:
        for prompt in case.prompts:
            _apply(session, prompt)
        before = session.propagate().masks[1].copy()
        _apply(session, case.correction)

        engine = app.state.manager.get(session.session_id).session
        gate = Gate(engine, frame=5)
        stop = threading.Event()
        outcome: list[BaseException] = []

        def run() -> None:
            try:
                session.propagate(cancel=stop)
            except BaseException as exc:
                outcome.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        try:
            assert gate.paused.wait(WAIT)
            with pytest.raises(SessionBusyError, match="cancel it"):
                session.add_points(1, [[20, 3, 18]], [1])  # from another thread while it propagates
            stop.set()  # the client notices on its next poll and cancels on the server
            run_state = app.state.manager.get(session.session_id).run
            deadline = time.monotonic() + WAIT
            while not run_state.cancel.is_set():
                assert time.monotonic() < deadline
                time.sleep(0.01)
        finally:
            gate.remove()
        worker.join(WAIT)
        assert len(outcome) == 1 and isinstance(outcome[0], PropagationCancelled)
        np.testing.assert_array_equal(session.mask(1), before)
        np.testing.assert_array_equal(session._fetch_mask(1), before)  # on the server too
        with pytest.raises(PropagationCancelled):
            session.propagate(cancel=lambda: True)  # cancelled before the first slice, as in process


def test_disconnected_clients_and_a_restarted_server(predictor, cases):
    case = cases["a"]
    app = _app(predictor)
    with live_server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        # A client that vanishes in the middle of an upload.
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(
                b"POST /sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + TOKEN.encode()
                + b"\r\nContent-Length: 100000\r\n\r\n"
                + wire.encode_volume(case.volume)[:500]
            )
        # A client that starts a propagation and hangs up without reading the answer.
        session = _remote(url, case)
        for prompt in case.prompts:
            _apply(session, prompt)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", f"/sessions/{session.session_id}/propagate", body=b"", headers=AUTH)
        conn.close()
        deadline = time.monotonic() + WAIT
        while (status := session._json("GET", "/propagate/status"))["state"] in ("idle", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert status["state"] == "done"
        for obj, expected in case.reference["masks"].items():
            np.testing.assert_array_equal(session.mask(obj), expected)
        assert httpx.get(url + "/info", headers=AUTH).json()["sessions"] == 1  # the half upload left nothing

    with pytest.raises(ServerUnavailableError, match="connection refused"):
        session.add_points(1, [[24, 20, 2]], [1])
    with live_server(_app(predictor), port=port):  # the same address, a fresh server
        with pytest.raises(SessionExpiredError, match="server restarted.*create a new session") as gone:
            session.add_points(1, [[24, 20, 2]], [1])
        assert "\n" not in str(gone.value)


def _self_signed(tmp_path: Path) -> tuple[str, str]:
    crypto = pytest.importorskip("cryptography", reason="the cryptography package makes the test certificate")
    del crypto
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "medsam2 test server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "server.crt", tmp_path / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert_path), str(key_path)


def test_tls_with_a_self_signed_certificate_and_the_rest_of_the_session_interface(predictor, cases, tmp_path):
    cert, key = _self_signed(tmp_path)
    case = cases["a"]
    app = create_app(_settings(tls_certfile=cert, tls_keyfile=key), lambda name: predictor)
    local = SegmentationSession(
        predictor,
        case.volume,
        case.geometry,
        axis=case.axis,
        intensity=case.intensity,
        memory_budget_bytes=1 << 30,
    )
    labels = np.zeros(case.volume.shape, np.uint8)
    labels[2:4, 15:25, 18:30] = 1
    with live_server(app, certfile=cert, keyfile=key) as url:
        assert url.startswith("https://")
        with _remote(url, case, ca_file=cert) as session:
            steps: list[tuple[int, int]] = []
            session.precompute_features(progress=lambda d, t: steps.append((d, t)))
            assert steps[-1] == (6, 6) and session.cache_stats.encoded == 6
            np.testing.assert_array_equal(_apply(session, case.prompts[0]), case.reference["previews"][0])
            assert session.add_mask_volume(3, labels) == local.add_mask_volume(3, labels) == [2, 3]
            np.testing.assert_array_equal(
                session.add_mask(3, 2, labels[2]).mask, local.add_mask(3, 2, labels[2]).mask
            )
            assert session.object_ids == [1, 3]
            session.remove_object(3)
            session.clear_slice(1, 2)
            assert session.object_ids == [1]
            session.reset()
            assert session.object_ids == [] and session.cache_stats.encoded == 6  # features survive a reset
        with pytest.raises(ServerUnavailableError, match="does not trust") as untrusted:
            _remote(url, case)  # the system's CAs do not know this certificate
        _assert_one_line(untrusted.value, url)
        plain = url.replace("https://", "http://")
        with pytest.raises(ServerUnavailableError, match="https://"):
            _remote(plain, case)


def test_wire_formats_round_trip_and_reject_bombs():
    rng = np.random.default_rng(3)
    mask = rng.random((5, 7, 9)) > 0.5
    np.testing.assert_array_equal(wire.decode_mask(wire.encode_mask(mask), mask.shape), mask)
    with pytest.raises(wire.WireFormatError, match="does not match its shape"):
        wire.decode_mask(wire.encode_mask(np.ones((64, 64), bool)), (8, 8))  # more data than the shape holds
    for dtype in (np.int16, ">i2", np.float64, np.uint8, np.bool_):
        vol = (rng.random((3, 4, 5)) * 100).astype(dtype)
        out = wire.decode_volume(wire.encode_volume(vol), max_voxels=60)
        assert out.dtype == np.dtype(dtype).newbyteorder("=") and out.flags.writeable
        np.testing.assert_array_equal(out, vol)
    fortran = np.asfortranarray(rng.random((3, 4, 5)))
    buf = io.BytesIO()
    np.save(buf, fortran)
    np.testing.assert_array_equal(wire.decode_volume(gzip.compress(buf.getvalue()), 60), fortran)
    np.testing.assert_array_equal(wire.decode_volume(buf.getvalue(), 60), fortran)  # plain .npy too
    with pytest.raises(wire.VolumeTooLargeError):
        wire.decode_volume(wire.encode_volume(np.zeros((3, 4, 5))), max_voxels=59)
    assert json.loads(json.dumps(wire.encode_mask_b64(mask)))  # base64 travels in JSON


def test_fair_lock_serves_in_arrival_order_and_wraps_only_model_calls():
    lock = FairLock()
    order: list[int] = []
    lock.acquire()
    threads = []
    for n in range(3):
        t = threading.Thread(target=lambda n=n: (lock.acquire(), order.append(n), lock.release()))
        t.start()
        threads.append(t)
        deadline = time.monotonic() + WAIT
        while lock.waiting < n + 2:  # wait until this thread is queued before starting the next
            assert time.monotonic() < deadline
            time.sleep(0.001)
    lock.release()
    for t in threads:
        t.join(WAIT)
    assert order == [0, 1, 2]

    class Model:
        image_size = 128

        def forward(self) -> bool:
            return True

        def _obj_id_to_idx(self) -> int:
            return 0

    proxy = SerialisedPredictor(Model(), lock)
    assert proxy.image_size == 128
    with lock:
        assert proxy._obj_id_to_idx() == 0  # bookkeeping does not wait for a turn
        result: list[bool] = []
        caller = threading.Thread(target=lambda: result.append(proxy.forward()))
        caller.start()
        caller.join(0.2)
        assert caller.is_alive() and not result  # a model call waits for the turn
    caller.join(WAIT)
    assert result == [True]
