"""The server's users, tested the way operators and users meet them: a users file with hashed tokens
(``medsam2 serve --add-user``), sessions owned by their user, an admin who lists and ends them, a
one-line access log, no plain HTTP off loopback without an explicit flag, no half-written session
state, and the remote client with a user's token."""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import secrets
import socket
import stat
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import pytest
import torch
import uvicorn
from served import (  # helpers and constants of the served-server tests
    MASK,
    WAIT,
    _close,
    _create,
    _free_port,
    _masks,
    _medsam2,
    _model_args,
    _one_line_4xx,
    _request,
    _serve,
    _upload_body,
    _volume,
)

from medsam2.remote import wire
from medsam2.server.app import create_app
from medsam2.server.settings import ServerSettings
from medsam2.session import SegmentationSession


# ----------------------------------------------------------------------------- users file and add-user
def test_add_user_stores_only_hashes_and_refuses_bad_entries(users_file, tmp_path):
    path, tokens = users_file
    text = path.read_text()
    data = json.loads(text)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [u["name"] for u in data["users"]] == ["alice", "bob", "root"]
    for entry in data["users"]:
        token = tokens[entry["name"]]
        assert token not in text  # never the token itself
        assert entry["token_sha256"] == hashlib.sha256(token.encode()).hexdigest()
    assert data["users"][0]["max_sessions"] == 2 and data["users"][2]["admin"] is True
    assert len(set(tokens.values())) == 3

    for args, message in [
        (["--users-file", str(path), "--add-user", "alice"], "already has a user 'alice'"),
        (["--users-file", str(path), "--add-user", "al ice"], "is not valid"),
        (["--users-file", str(path), "--add-user", "carol", "--user-max-sessions", "0"], "at least 1"),
        (["--add-user", "carol"], "needs --users-file"),
        (["--users-file", str(path), "--admin"], "for --add-user"),
        (["--users-file", str(tmp_path / "no" / "users.json"), "--add-user", "carol"], "does not exist"),
    ]:
        done = _medsam2("serve", *args)
        assert done.returncode == 2, (args, done.stderr)
        err = done.stderr.strip()
        assert err.startswith("medsam2 serve: error:") and message in err and "\n" not in err, err
    assert json.loads(path.read_text()) == data  # a refused addition leaves the file as it was


def test_a_broken_users_file_stops_the_server_with_one_line(checkpoint, tmp_path):
    bad = tmp_path / "users.json"
    for content, message in [
        ("{not json", "not valid JSON"),
        ('{"format": "medsam2-users/1", "users": []}', "has no users"),
        ('{"format": "medsam2-users/1", "users": [{"name": "x", "token_sha256": "abc"}]}', "64 lower-case hex"),
        ('{"format": "medsam2-users/1", "users": [{"name": "x", "token": "plaintext"}]}', "unknown field"),
    ]:
        bad.write_text(content)
        done = _medsam2("serve", *_model_args(checkpoint), "--users-file", str(bad), "--no-preload")
        err = done.stderr.strip().splitlines()[-1]
        assert done.returncode == 2 and message in err and err.startswith("medsam2 serve: error:"), done.stderr


# ----------------------------------------------------------------------------- users and sessions
def test_sessions_belong_to_their_user_and_an_admin_lists_and_ends_them(server):
    alice, bob, root = (server.tokens[n] for n in ("alice", "bob", "root"))
    with server.connection() as conn:
        mine = _create(conn, alice)
        theirs = _create(conn, bob)
        status, _, unknown = _request(conn, "GET", "/sessions/" + secrets.token_urlsafe(16), bob)
        unknown_reason = json.loads(unknown)["detail"].split(" does not exist")[1]
        # Bob cannot see, use or end Alice's session: it "does not exist", word for word as an unknown id.
        body = {"type": "points", "object_id": 1, "points": [[16, 14, 1]], "labels": [1]}
        for method, suffix, payload in [
            ("GET", "", None),
            ("POST", "/prompts", body),
            ("POST", "/propagate", {}),
            ("GET", "/propagate/status", None),
            ("GET", "/masks/1", None),
            ("POST", "/cancel", None),
            ("POST", "/reset", None),
            ("DELETE", "/objects/1", None),
            ("DELETE", "", None),
        ]:
            status, _, data = _request(conn, method, f"/sessions/{mine}{suffix}", bob, payload)
            detail = _one_line_4xx(status, data, 404)
            assert detail == f"session {mine} does not exist{unknown_reason}", detail
        status, _, data = _request(conn, "POST", f"/sessions/{mine}/prompts", alice, body)
        assert status == 200  # and Alice's session was untouched by all that

        listed = {n: json.loads(_request(conn, "GET", "/sessions", server.tokens[n])[2]) for n in ("alice", "bob")}
        assert mine in {s["session_id"] for s in listed["alice"]} and {s["owner"] for s in listed["alice"]} == {"alice"}
        assert theirs in {s["session_id"] for s in listed["bob"]} and {s["owner"] for s in listed["bob"]} == {"bob"}
        everyone = json.loads(_request(conn, "GET", "/sessions", root)[2])
        assert {(s["session_id"], s["owner"]) for s in everyone} >= {(mine, "alice"), (theirs, "bob")}

        # Alice may have two sessions open at once (her entry in the users file).
        second = _create(conn, alice)
        status, _, data = _request(conn, "POST", "/sessions", alice, _upload_body(_volume()))
        assert "2 of 2 sessions" in _one_line_4xx(status, data, 429)

        # The admin ends sessions but cannot read them (masks hold patient data).
        status, _, data = _request(conn, "GET", f"/sessions/{mine}/masks/1?slice=1", root)
        _one_line_4xx(status, data, 404)
        for sid in (mine, theirs):
            status, _, data = _request(conn, "DELETE", f"/sessions/{sid}", root)
            assert status == 204, data
        status, _, data = _request(conn, "GET", f"/sessions/{mine}", alice)
        _one_line_4xx(status, data, 404)
        assert [s["session_id"] for s in json.loads(_request(conn, "GET", "/sessions", alice)[2])] == [second]
        _close(conn, alice, second)

        status, headers, data = _request(conn, "GET", "/sessions", "x" * 43)
        assert "invalid token" in _one_line_4xx(status, data, 401)


def test_access_log_has_one_line_per_request_and_no_data(server):
    alice = server.tokens["alice"]

    def lines() -> list[str]:
        return server.access_log.read_text().splitlines() if server.access_log.exists() else []

    def settled() -> int:
        """The line count once no line has arrived for 0.3 s: an earlier test's last request (this
        module shares one server) may still be on its way to the log."""
        count, deadline = len(lines()), time.monotonic() + WAIT
        while time.monotonic() < deadline:
            time.sleep(0.3)
            if len(lines()) == count:
                break
            count = len(lines())
        return count

    before = settled()
    with server.connection() as conn:
        sid = _create(conn, alice)  # the query carries geometry and the body the volume: neither is logged
        _request(conn, "POST", f"/sessions/{sid}/prompts", alice, {"type": "points", "object_id": 99999})
        _request(conn, "GET", f"/sessions/{sid}", "y" * 43)
        _close(conn, alice, sid)
    deadline = time.monotonic() + WAIT
    while len(lines()) < before + 4:  # written just after each response went out
        assert time.monotonic() < deadline, lines()[before:]
        time.sleep(0.05)
    new = lines()[before:]
    pattern = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z user=(\S+) (GET|POST|DELETE) (\S+) (\d{3}) [\d.]+ms")
    parsed = [pattern.fullmatch(line) for line in new]
    assert all(parsed), new
    assert [(m.group(1), m.group(2), m.group(3), m.group(4)) for m in parsed if m] == [
        ("alice", "POST", "/sessions", "201"),
        ("alice", "POST", f"/sessions/{sid}/prompts", "400"),
        ("-", "GET", f"/sessions/{sid}", "401"),
        ("alice", "DELETE", f"/sessions/{sid}", "204"),
    ]
    text = server.access_log.read_text()
    assert "intensity" not in text and "400,40" not in text and alice not in text
    assert not any(token in text for token in server.tokens.values())


# ----------------------------------------------------------------------------- binding and single-token mode
def test_plain_http_beyond_loopback_needs_an_explicit_flag_and_the_single_token_mode_works(
    checkpoint, tmp_path
):
    token = secrets.token_urlsafe(32)
    token_file = tmp_path / "token.txt"
    token_file.write_text(token + "\n")
    args = [*_model_args(checkpoint), "--token-file", str(token_file), "--host", "0.0.0.0"]
    refused = _medsam2("serve", *args, "--port", str(_free_port()))
    err = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 2 and "refusing to serve on 0.0.0.0 without TLS" in err and "--insecure-no-tls" in err
    assert "Traceback" not in refused.stderr

    port = _free_port()
    log = tmp_path / "serve.log"
    with _serve([*args, "--port", str(port), "--insecure-no-tls"], port, log):
        assert "without TLS" in log.read_text()  # said once, loudly, at the start
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        status, _, data = _request(conn, "GET", "/info", token)
        assert status == 200
        sid = _create(conn, token)
        listed = json.loads(_request(conn, "GET", "/sessions", token)[2])
        assert [(s["session_id"], s["owner"]) for s in listed] == [(sid, "token")]
        status, _, data = _request(conn, "GET", "/info", "z" * 43)
        _one_line_4xx(status, data, 401)
        _close(conn, token, sid)
        conn.close()


# ----------------------------------------------------------------------------- no half-written state
class FailingPredictor:
    """The real predictor, whose prompt calls can be made to run fully (changing the inference state)
    and then fail as a GPU out of memory would: the worst moment for the server's session state."""

    def __init__(self, predictor: Any) -> None:
        self._predictor = predictor
        self.fail = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._predictor, name)

    def _then_fail(self, method: str, *args: Any, **kwargs: Any) -> Any:
        out = getattr(self._predictor, method)(*args, **kwargs)
        if self.fail:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return out

    def add_new_points_or_box(self, *args: Any, **kwargs: Any) -> Any:
        return self._then_fail("add_new_points_or_box", *args, **kwargs)

    def add_new_mask(self, *args: Any, **kwargs: Any) -> Any:
        return self._then_fail("add_new_mask", *args, **kwargs)

    def clear_all_prompts_in_frame(self, *args: Any, **kwargs: Any) -> Any:
        return self._then_fail("clear_all_prompts_in_frame", *args, **kwargs)

    def remove_object(self, *args: Any, **kwargs: Any) -> Any:
        return self._then_fail("remove_object", *args, **kwargs)


@contextmanager
def _in_thread(app: Any) -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield int(sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(WAIT)
        sock.close()


def test_a_request_that_fails_half_way_leaves_the_session_as_it_was(tiny_predictor):
    """The one test here that cannot start the console script: the failure is injected into the model.
    Each failing request's model call completes (SAM2 has written its state) and then fails; the
    session must propagate exactly as one that never received those requests."""
    failing = FailingPredictor(tiny_predictor)
    token = secrets.token_urlsafe(32)
    settings = ServerSettings(token=token, models=("m",), memory_budget_bytes=256 << 20)
    volume = _volume()
    first = {"type": "points", "object_id": 1, "points": [[16, 14, 1]], "labels": [1]}
    reference = SegmentationSession(tiny_predictor, volume, intensity="400,40", memory_budget_bytes=1 << 30)
    reference.add_points(1, [[16, 14, 1]], [1])
    expected = reference.propagate().masks[1].copy()

    with _in_thread(create_app(settings, lambda name: failing)) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        sid = _create(conn, token, volume)
        assert _request(conn, "POST", f"/sessions/{sid}/prompts", token, first)[0] == 200
        failing.fail = True
        for method, path, body in [
            ("POST", "/prompts", {"type": "points", "object_id": 2, "points": [[20, 12, 3]], "labels": [1]}),
            ("POST", "/prompts", {"type": "points", "object_id": 1, "points": [[12, 10, 2]], "labels": [1]}),
            ("POST", "/prompts", {"type": "box", "object_id": 1, "corners": [[10, 8, 1], [24, 22, 1]]}),
            ("POST", "/prompts", {"type": "mask", "object_id": 3, "slice_index": 0, "shape": [32, 32],
                                  "data": wire.encode_mask_b64(MASK)}),
            ("DELETE", "/objects/1/slices/1", None),
            ("DELETE", "/objects/1", None),
        ]:  # fmt: skip
            status, headers, data = _request(conn, method, f"/sessions/{sid}{path}", token, body)
            assert status == 503 and "out of memory" in json.loads(data)["detail"], (path, status, data)
            assert "\n" not in json.loads(data)["detail"] and headers.get("retry-after")
        failing.fail = False
        status, _, data = _request(conn, "GET", f"/sessions/{sid}", token)
        assert json.loads(data)["object_ids"] == [1]
        masks = _masks(conn, token, sid)
        assert sorted(masks) == [1]
        np.testing.assert_array_equal(masks[1], expected)
        conn.close()


def test_the_remote_client_works_for_a_user_of_the_users_file(server, tiny_predictor):
    """RemoteSession, as the Slicer panel uses it, with one user's token: the in-process masks."""
    from medsam2.errors import InvalidPromptError
    from medsam2.remote import RemoteSession

    volume = _volume(3)
    reference = SegmentationSession(tiny_predictor, volume, intensity="400,40", memory_budget_bytes=1 << 30)
    reference.add_points(1, [[16, 14, 1]], [1])
    expected = reference.propagate().masks[1].copy()
    url = f"http://127.0.0.1:{server.port}"
    with RemoteSession(url, server.tokens["alice"], volume, intensity="400,40", poll_interval=0.02) as remote:
        with pytest.raises(InvalidPromptError, match="between 0 and 65535"):
            remote.add_points(70000, [[16, 14, 1]], [1])  # refused before it is sent
        remote.add_points(1, [[16, 14, 1]], [1])
        np.testing.assert_array_equal(remote.propagate().masks[1], expected)
        with server.connection() as conn:
            status, _, data = _request(conn, "GET", f"/sessions/{remote.session_id}", server.tokens["bob"])
            _one_line_4xx(status, data, 404)
