"""Local and full runs over HTTP, against ``medsam2 serve`` started through the installed console
script: the propagate route's ``mode`` field, the slices each run recomputed, and the same masks as an
in-process session given the same prompts (the remote client passes the mode through)."""

from __future__ import annotations

from typing import Any

import numpy as np
from served import _close, _create, _mask, _propagate, _request

from medsam2 import SegmentationSession
from medsam2.remote import RemoteSession

SLICES = 12  # enough slices for a local correction to stop before the volume's ends
POSITIVE = {"type": "points", "object_id": 1, "points": [[12, 12, 6]], "labels": [1]}
NEGATIVE = {"type": "points", "object_id": 1, "points": [[4, 20, 8]], "labels": [0]}


def _volume() -> np.ndarray:
    rng = np.random.default_rng(3)
    vol = rng.normal(0, 5, (SLICES, 24, 24)).astype(np.int16)
    vol[2:10, 6:18, 7:19] += 200
    return vol


def _prompt(conn: Any, token: str, sid: str, prompt: dict[str, Any]) -> None:
    status, _, data = _request(conn, "POST", f"/sessions/{sid}/prompts", token, prompt)
    assert status == 200, data


def test_a_local_correction_recomputes_fewer_slices_and_keeps_the_rest(server, tiny_predictor):
    token = server.tokens["bob"]
    volume = _volume()
    with server.connection() as conn:
        local_sid, full_sid = _create(conn, token, volume), _create(conn, token, volume)
        firsts = {}
        for sid in (local_sid, full_sid):
            _prompt(conn, token, sid, POSITIVE)
            first = _propagate(conn, token, sid, {})  # the first run of a session is always full
            assert first["recomputed"] == {"1": list(range(SLICES))}
            firsts[sid] = _mask(conn, token, sid, 1)
            _prompt(conn, token, sid, NEGATIVE)
        np.testing.assert_array_equal(firsts[local_sid], firsts[full_sid])

        local = _propagate(conn, token, local_sid, {})  # default after the first run: local, as in process
        full = _propagate(conn, token, full_sid, {"mode": "full"})
        assert full["recomputed"] == {"1": list(range(SLICES))}
        recomputed = local["recomputed"]["1"]
        assert 8 in recomputed and len(recomputed) < SLICES, recomputed
        local_mask, full_mask = _mask(conn, token, local_sid, 1), _mask(conn, token, full_sid, 1)
        kept = [k for k in range(SLICES) if k not in recomputed]
        np.testing.assert_array_equal(local_mask[kept], firsts[local_sid][kept])
        np.testing.assert_array_equal(local_mask[8], full_mask[8])  # the corrected slice itself
        for sid in (local_sid, full_sid):  # now: an idle keep-alive connection is closed after 5 s
            _close(conn, token, sid)

    # the same prompts in process give the same local and full results
    for mode, expected in (("local", local_mask), ("full", full_mask)):
        engine = SegmentationSession(tiny_predictor, volume, intensity="400,40")
        engine.add_points(1, [POSITIVE["points"][0]], [1])
        engine.propagate()
        engine.add_points(1, [NEGATIVE["points"][0]], [0])
        result = engine.propagate(mode=mode)
        assert result.recomputed[1] == (recomputed if mode == "local" else list(range(SLICES)))
        np.testing.assert_array_equal(result.masks[1], expected)
        engine.close()


def test_the_remote_client_passes_the_mode_and_reports_recomputed_slices(server):
    volume = _volume()
    url = f"http://127.0.0.1:{server.port}"
    with RemoteSession(url, server.tokens["bob"], volume, intensity="400,40") as s:
        s.add_points(1, [POSITIVE["points"][0]], [1])
        assert s.propagate().recomputed == {1: list(range(SLICES))}
        s.add_points(1, [NEGATIVE["points"][0]], [0])
        local = s.propagate(mode="local")
        assert 8 in local.recomputed[1] and len(local.recomputed[1]) < SLICES
        assert s.propagate(mode="full").recomputed == {1: list(range(SLICES))}
