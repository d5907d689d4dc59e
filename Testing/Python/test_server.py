"""The inference server through the FastAPI app (TestClient): token, schema, limits, expiry, and masks
that must equal, voxel for voxel, what an in-process SegmentationSession gives on the same volume,
prompts and (random, seeded) weights."""

from __future__ import annotations

import gzip
import sys
import types
from typing import Any

import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from server_cases import (  # cases, helpers and constants shared by the server tests
    AUTH,
    MODEL,
    TOKEN,
    WAIT,
    FakeClock,
    Gate,
    _app,
    _apply,
    _detail,
    _get_mask,
    _npy,
    _points_body,
    _query,
    _upload,
    _wait_run,
)

from medsam2.cli.main import build_parser
from medsam2.cli.main import main as cli_main
from medsam2.errors import (
    ModelError,
)
from medsam2.remote import (
    wire,
)
from medsam2.server import serve
from medsam2.server.app import create_app
from medsam2.server.settings import TOKEN_ENV, ServerConfigError, ServerSettings


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

        # A full run (forward from the first prompted slice, 2) pauses before slice 4: 2 and 3 are done.
        gate = Gate(engine, frame=4)
        try:
            full = {"mode": "full"}
            assert client.post(f"/sessions/{sid}/propagate", headers=AUTH, json=full).status_code == 202
            assert gate.paused.wait(WAIT)
            status = client.get(f"/sessions/{sid}/propagate/status", headers=AUTH).json()
            assert status["state"] == "running" and status["done"] == 2
            for s in range(6):
                one, headers = _get_mask(client, sid, 1, s)
                fresh = headers[wire.SLICE_STATE_HEADER] == "current"
                assert fresh == (s in (2, 3)), s
                np.testing.assert_array_equal(one, (ref["corrected_full"] if fresh else ref["masks"])[1][s])
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

        client.post(f"/sessions/{sid}/propagate", headers=AUTH)  # after a cancel the local run is exact
        assert _wait_run(client, sid)["state"] == "done"
        for obj, expected in ref["corrected"].items():
            np.testing.assert_array_equal(_get_mask(client, sid, obj)[0], expected)
        client.post(f"/sessions/{sid}/propagate", headers=AUTH, json=full)  # and so is a full one
        assert _wait_run(client, sid)["state"] == "done"
        for obj, expected in ref["corrected_full"].items():
            np.testing.assert_array_equal(_get_mask(client, sid, obj)[0], expected)

        # Closing a session mid-run: gone at once; its memory returns when its worker has stopped.
        managed = app.state.manager.get(sid)
        gate = Gate(engine, frame=3)
        try:
            client.post(f"/sessions/{sid}/propagate", headers=AUTH, json=full)  # nothing changed: full
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


