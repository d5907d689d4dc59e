"""``medsam2 serve --devices``: each new session on the device with the most free memory within its
budget. Two CPU "devices" (two slots of the same torch device) with an injected free-memory
measure stand in for two GPUs."""

from __future__ import annotations

import secrets
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from console import run_medsam2
from server_cases import live_server

from medsam2.remote import RemoteSession
from medsam2.server.app import create_app
from medsam2.server.placement import DevicePlacement, parse_devices
from medsam2.server.sessions import ServerFullError, SessionManager
from medsam2.server.settings import ServerSettings

TOKEN = secrets.token_urlsafe(32)
MODEL = "tiny-test"
GiB = 1 << 30


def two_cpu_devices(predictor: Any, free: dict[int, int], budget: int) -> tuple[dict[str, Any], list[tuple]]:
    loads: list[tuple] = []

    def device_factory(name: str, device: torch.device) -> Any:
        loads.append((name, str(device)))
        return predictor

    placement = DevicePlacement(
        [torch.device("cpu"), torch.device("cpu")],
        budget_per_device=budget,
        free_memory=lambda slot, device: free[slot],
    )
    return {"placement": placement, "device_factory": device_factory}, loads


def volume(slices: int = 4) -> np.ndarray:
    return np.random.default_rng(0).normal(0, 1, (slices, 32, 32)).astype(np.float32)


def test_sessions_go_to_the_device_with_most_free_memory_within_budget(predictor):
    free = {0: 10 * GiB, 1: 20 * GiB}
    probe = SessionManager(ServerSettings(token=TOKEN, models=(MODEL,)), lambda name: predictor)
    per_slice = probe.predictor(MODEL).slice_feature_bytes
    need = volume().nbytes + 4 * per_slice
    options, loads = two_cpu_devices(predictor, free, budget=2 * need)  # two sessions per device
    settings = ServerSettings(token=TOKEN, models=(MODEL,), max_sessions=10)
    manager = SessionManager(settings, lambda name: predictor, **options)

    def create() -> Any:
        return manager.create(volume(), None, "axial", None, MODEL)

    first = create()
    assert first.slot == 1  # more free memory
    free[0], free[1] = 30 * GiB, 5 * GiB
    second, third = create(), create()
    assert (second.slot, third.slot) == (0, 0)
    fourth = create()
    assert fourth.slot == 1  # device 0 has more free memory but its budget is full
    with pytest.raises(ServerFullError, match="budget is full"):
        create()
    manager.close(second.id)
    assert create().slot == 0  # its reservation was released
    assert manager.budget_bytes == 4 * need and manager.reserved_bytes == 4 * need
    assert sorted(loads) == [(MODEL, "cpu"), (MODEL, "cpu")]  # one model copy per device


def test_served_over_http_with_two_devices(predictor):
    free = {0: 1 * GiB, 1: 3 * GiB}
    options, _ = two_cpu_devices(predictor, free, budget=512 << 20)
    app = create_app(ServerSettings(token=TOKEN, models=(MODEL,)), lambda name: predictor, manager_options=options)
    with live_server(app) as url:
        with RemoteSession(url, TOKEN, volume(), model=MODEL, poll_interval=0.02) as remote:
            assert app.state.manager.get(remote.session_id).slot == 1
            remote.add_points(1, [[16, 16, 2]], [1])
            result = remote.propagate()
            assert result.masks[1].shape == (4, 32, 32)
        info = httpx.get(url + "/info", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert info["sessions"] == 0 and info["memory_reserved_bytes"] == 0


def test_devices_option_on_the_command_line(tmp_path):
    assert parse_devices("cpu") == [torch.device("cpu")]
    token = tmp_path / "token.txt"
    token.write_text(secrets.token_urlsafe(32))
    # CUDA_VISIBLE_DEVICES is empty in run_medsam2: naming a GPU is a one-line device error (exit 4)
    done = run_medsam2("serve", "--devices", "cuda:0,cuda:1", "--token-file", token, "--no-preload", timeout=120)
    assert done.returncode == 4, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0]
    with pytest.raises(Exception, match="twice"):
        parse_devices("cpu,cpu")
