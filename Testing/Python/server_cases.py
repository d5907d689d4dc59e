"""Shared by the server tests: the phantom cases and their in-process reference masks, the app and
request helpers, and a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import io
import secrets
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient

from medsam2.geometry import VolumeGeometry
from medsam2.models.build import build_predictor
from medsam2.remote import (
    RemoteSession,
    wire,
)
from medsam2.server.app import create_app
from medsam2.server.settings import ServerSettings
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
    out["corrected"] = {o: m.copy() for o, m in session.propagate().masks.items()}  # local, as served
    out["corrected_full"] = {o: m.copy() for o, m in session.propagate(mode="full").masks.items()}
    return out


def reference_cases(predictor) -> dict[str, Case]:
    """Each case run once in process: the reference every server result must equal exactly."""
    out = {"a": _case_a(), "b": _case_b()}
    for case in out.values():
        case.reference = _drive(in_process_session(predictor, case), case)
    return out


def in_process_session(predictor, case: Case) -> SegmentationSession:
    """The case's volume in an in-process session opened as the server opens it."""
    return SegmentationSession(
        predictor,
        case.volume,
        case.geometry,
        axis=case.axis,
        intensity=case.intensity,
        memory_budget_bytes=1 << 30,
    )


# Module-scoped fixtures (import them into a test module): each server test file gets its own model.
@pytest.fixture(scope="module")
def predictor():
    return build_predictor("configs/sam2.1/sam2.1_hiera_t.yaml", image_size=128, seed=0)


@pytest.fixture(scope="module")
def cases(predictor) -> dict[str, Case]:
    return reference_cases(predictor)


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


