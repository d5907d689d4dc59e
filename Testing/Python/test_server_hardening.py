"""The server, hardened, tested the way users meet it: ``medsam2 serve`` started through the installed
console script on a loopback port with a local random-weight checkpoint, and requests over HTTP
(raw sockets where the framing itself is the test).

- malformed requests are 4xx with a one-line reason, never a 500, on a connection that stays usable;
- a users file with hashed tokens, sessions owned by their user, an admin who lists and ends them,
  per-user session limits and a one-line access log;
- no plain-HTTP server on a non-loopback address without an explicit flag;
- a request that fails half-way leaves the session as it was.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import re
import secrets
import socket
import stat
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pytest
import torch
import uvicorn

from conftest import TEST_IMAGE_SIZE, TINY_21
from medsam2.models.build import save_checkpoint
from medsam2.server import wire
from medsam2.server.app import create_app
from medsam2.server.settings import ServerSettings
from medsam2.session import SegmentationSession

MEDSAM2 = Path(sys.executable).with_name("medsam2")
WAIT = 120.0  # bound on any wait for the server or a run (a guard against hangs, not a timing assertion)
# Small enough that every test body arrives in one socket read: a server that answers before reading
# a body must not leave bytes unread when it closes (the client would get a reset, not the answer).
UPLOAD_LIMIT = 20_000
MASK = np.zeros((32, 32), np.uint8)
MASK[10:20, 12:22] = 1

pytestmark = pytest.mark.skipif(not MEDSAM2.exists(), reason=f"no installed console script at {MEDSAM2}")


# ----------------------------------------------------------------------------- a server as users start it
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("MEDSAM2_SERVER_TOKEN", None)
    return env


def _medsam2(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(MEDSAM2), *args], capture_output=True, text=True, env=_env(), timeout=WAIT)


@dataclass
class Server:
    port: int
    tokens: dict[str, str]
    access_log: Path
    process: subprocess.Popen[bytes]

    @contextmanager
    def connection(self) -> Iterator[http.client.HTTPConnection]:
        """One keep-alive connection for a sequence of requests."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT)
        try:
            yield conn
        finally:
            conn.close()


@contextmanager
def _serve(args: list[str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        process = subprocess.Popen([str(MEDSAM2), "serve", *args], stdout=out, stderr=out, env=_env())
    try:
        deadline = time.monotonic() + WAIT
        while True:
            assert process.poll() is None, f"medsam2 serve exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "medsam2 serve did not start"
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def checkpoint(tiny_predictor, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny128.pt"
    save_checkpoint(path, tiny_predictor)
    return path


def _model_args(checkpoint: Path) -> list[str]:
    return [
        "--checkpoint", str(checkpoint), "--config", TINY_21,
        "--image-size", str(TEST_IMAGE_SIZE), "--device", "cpu",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def users_file(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Users added with the documented command; each token is printed once, on stdout."""
    path = tmp_path_factory.mktemp("users") / "users.json"
    tokens = {}
    for name, extra in [("alice", ["--user-max-sessions", "2"]), ("bob", []), ("root", ["--admin"])]:
        done = _medsam2("serve", "--users-file", str(path), "--add-user", name, *extra)
        assert done.returncode == 0, done.stderr
        tokens[name] = done.stdout.strip()
        assert re.fullmatch(r"[A-Za-z0-9_-]{40,}", tokens[name]) and "shown only now" in done.stderr
    return path, tokens


@pytest.fixture(scope="module")
def server(checkpoint, users_file, tmp_path_factory) -> Iterator[Server]:
    path, tokens = users_file
    folder = tmp_path_factory.mktemp("server")
    port = _free_port()
    access = folder / "access.log"
    args = [
        *_model_args(checkpoint), "--users-file", str(path), "--port", str(port),
        "--access-log", str(access), "--max-upload-mb", str(UPLOAD_LIMIT / (1 << 20)), "--max-sessions", "8",
    ]  # fmt: skip
    with _serve(args, port, folder / "serve.log") as process:
        yield Server(port, tokens, access, process)


# ----------------------------------------------------------------------------- requests
def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _request(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    token: str,
    body: Any = None,
    headers: Optional[dict[str, str]] = None,
) -> tuple[int, dict[str, str], bytes]:
    hdrs = {**_auth(token), **(headers or {})}
    if body is not None and not isinstance(body, (bytes, bytearray)):
        body = json.dumps(body).encode() if not isinstance(body, str) else body.encode()
        hdrs.setdefault("Content-Type", "application/json")
    conn.request(method, path, body=body, headers=hdrs)
    response = conn.getresponse()
    data = response.read()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def _one_line_4xx(status: int, data: bytes, expected: Optional[int] = None) -> str:
    """The answer is a client error with a single-line reason (never a 500), and that reason."""
    assert 400 <= status < 500, (status, data[:300])
    if expected is not None:
        assert status == expected, (status, data[:300])
    text = data.decode("utf-8", "replace")
    try:
        detail = json.loads(text)["detail"]
    except (ValueError, KeyError):
        detail = text  # the HTTP parser's own plain-text answer to a request it cannot parse
    assert detail.strip() and "\n" not in detail.strip(), text
    return str(detail)


def _upload_body(volume: np.ndarray) -> bytes:
    return wire.encode_volume(volume)


def _volume(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vol = rng.normal(0, 5, (4, 32, 32)).astype(np.int16)
    vol[:, 8:22, 10:24] += 200
    return vol


def _create(conn: http.client.HTTPConnection, token: str, volume: Optional[np.ndarray] = None) -> str:
    status, _, data = _request(
        conn, "POST", "/sessions?intensity=400,40", token, _upload_body(_volume() if volume is None else volume)
    )
    assert status == 201, data
    return str(json.loads(data)["session_id"])


def _close(conn: http.client.HTTPConnection, token: str, sid: str) -> None:
    status, _, data = _request(conn, "DELETE", f"/sessions/{sid}", token)
    assert status == 204, data


def _session_ids(conn: http.client.HTTPConnection, token: str) -> set[str]:
    status, _, data = _request(conn, "GET", "/sessions", token)
    assert status == 200, data
    return {s["session_id"] for s in json.loads(data)}


def _npy_upload(shape_text: str, descr: str, data: bytes = b"") -> bytes:
    """A hand-written .npy header (what a buggy or hostile client might send), gzip-compressed."""
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}"
    header = header.ljust(118) + "\n"
    raw = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin-1") + data
    return gzip.compress(raw, mtime=0)


# ----------------------------------------------------------------------------- raw sockets
def _raw_exchange(port: int, payload: bytes) -> tuple[int, dict[str, str], bytes, socket.socket]:
    """Send bytes as they are and read one response (status, headers, body); the socket stays open."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    sock.sendall(payload)
    return (*_read_response(sock), sock)


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {buf!r}"
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        length = int(headers["content-length"])
        while len(rest) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed in the middle of a response body"
            rest += chunk
        return status, headers, rest[:length]
    # No length: the HTTP parser's own answer, chunked or ended by closing the connection.
    while not (rest.endswith(b"0\r\n\r\n") and headers.get("transfer-encoding") == "chunked"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    if headers.get("transfer-encoding") == "chunked":
        body, data = b"", rest
        while True:
            size_line, _, data = data.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            body, data = body + data[:size], data[size + 2 :]
        rest = body
    return status, headers, rest


def _closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed its end (a read returns end-of-file)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _head(method: str, path: str, token: str, extra: list[str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {token}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _chunked(body: bytes, size: int = 8192) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size]) for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


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


# ----------------------------------------------------------------------------- framing and size limits
def test_framing_that_disagrees_is_refused_and_the_size_limit_holds_on_every_route(server):
    token = server.tokens["bob"]
    with server.connection() as conn:
        sid = _create(conn, token)
    json_type = "Content-Type: application/json"
    routes = [
        ("POST", "/sessions", "Content-Type: application/x-npy"),
        ("POST", f"/sessions/{sid}/prompts", json_type),
        ("POST", f"/sessions/{sid}/propagate", json_type),
        ("POST", f"/sessions/{sid}/reset", json_type),
        ("GET", f"/sessions/{sid}", json_type),
        ("DELETE", f"/sessions/{sid}/objects/1", json_type),
        ("GET", "/info", json_type),
    ]
    too_big = os.urandom(UPLOAD_LIMIT + 1000)  # incompressible, just over the limit
    for method, path, ctype in routes:
        where = f"{method} {path}"
        # Content-Length and Transfer-Encoding together, the chunked body over the limit: the HTTP
        # parser goes by the chunks, so a check of the declared length alone would let it through.
        both = [ctype, "Content-Length: 3", "Transfer-Encoding: chunked"]
        status, headers, body, sock = _raw_exchange(server.port, _head(method, path, token, both) + _chunked(too_big))
        assert "both Content-Length and Transfer-Encoding" in _one_line_4xx(status, body, 400), where
        assert headers.get("connection") == "close" and _closed_by_server(sock), where
        sock.close()
        # Two Content-Length values that differ; a negative one; one that is not a number.
        for lengths in (["Content-Length: 5", "Content-Length: 6"], ["Content-Length: -5"], ["Content-Length: 5x"]):
            status, headers, body, sock = _raw_exchange(server.port, _head(method, path, token, [ctype, *lengths]))
            _one_line_4xx(status, body, 400)
            assert _closed_by_server(sock), (where, lengths)
            sock.close()
        # A declared length over the limit: refused before a byte of the body is read.
        status, headers, body, sock = _raw_exchange(
            server.port, _head(method, path, token, [ctype, f"Content-Length: {len(too_big)}"])
        )
        assert "limit of" in _one_line_4xx(status, body, 413), where
        sock.close()
        # No length, a chunked body over the limit: counted as it arrives (upload) or refused on the
        # headers (411: JSON routes take a Content-Length only).
        chunked = _head(method, path, token, [ctype, "Transfer-Encoding: chunked"])
        upload = path == "/sessions"
        status, headers, body, sock = _raw_exchange(server.port, chunked + (_chunked(too_big) if upload else b""))
        _one_line_4xx(status, body, 413 if upload else 411)
        sock.close()

    # Ambiguous framing is refused before the token is looked at: for anyone, the connection is closed.
    ambiguous = _head("POST", "/sessions", "no-such-token", ["Content-Length: 3", "Transfer-Encoding: chunked"])
    status, headers, body, sock = _raw_exchange(server.port, ambiguous + _chunked(b"{}"))
    assert "both Content-Length" in _one_line_4xx(status, body, 400) and headers.get("connection") == "close"
    sock.close()

    # After all of that, the server and the session are fine, and a keep-alive connection stays usable.
    with server.connection() as conn:
        for _ in range(2):
            status, _, data = _request(conn, "GET", f"/sessions/{sid}", token)
            assert status == 200 and json.loads(data)["object_ids"] == []
        _close(conn, token, sid)


def test_malformed_array_headers_are_refused_and_the_connection_stays_usable(server):
    token = server.tokens["bob"]
    volume_bytes = np.zeros((2, 8, 8), np.int16).tobytes()
    cases = [
        (_npy_upload("(-1, 8, 8)", "<i2", volume_bytes), 400, "negative size"),
        (_npy_upload("(-2, -2, 8)", "<i2", volume_bytes), 400, "negative size"),
        (_npy_upload("(0, 8, 8)", "<i2"), 400, "zero-size axis"),
        (_npy_upload("(2, 0, 8)", "<i2"), 400, "zero-size axis"),
        # 2**64 elements (the product wraps to 0 in int64), and far beyond: refused on the header alone.
        (_npy_upload(f"({2**32}, {2**32}, 1)", "<i2"), 413, "over this server's limit"),
        (_npy_upload(f"({2**62}, {2**62}, {2**62})", "<i2"), 413, "over this server's limit"),
        (_npy_upload("(2, 8, 8)", "<f16", b"\0" * 2048), 400, "not supported"),  # float128
        (_npy_upload("(2, 8, 8)", "<u8", b"\0" * 1024), 400, "not supported"),  # uint64
        (_npy_upload("(2, 8, 8)", "<c8", b"\0" * 1024), 400, "not numeric"),  # complex
        (_npy_upload("(2, 8, 8)", "|O", b"\0" * 1024), 400, "not numeric"),  # object (a pickle)
        (_npy_upload("(2, 8)", "|S4", b"\0" * 64), 400, "not numeric"),
        (_npy_upload("(8,)", "<i2", b"\0" * 16), 400, "3D (or a 2D image)"),
        (_npy_upload("(2, 2, 2, 2)", "<i2", b"\0" * 32), 400, "3D (or a 2D image)"),
    ]
    with server.connection() as conn:  # one keep-alive connection for every refusal and the upload after
        before = _session_ids(conn, token)
        for body, code, message in cases:
            status, _, data = _request(conn, "POST", "/sessions", token, body)
            assert message in _one_line_4xx(status, data, code), (message, data)
        assert _session_ids(conn, token) == before  # no session half-made
        sid = _create(conn, token)
        _close(conn, token, sid)


@pytest.mark.parametrize("field_name", ["spacing", "origin", "direction"])
def test_non_finite_numbers_in_any_geometry_field_are_refused(server, field_name):
    token = server.tokens["bob"]
    count = 9 if field_name == "direction" else 3
    good = {"spacing": ["1"] * 3, "origin": ["0"] * 3, "direction": "1 0 0 0 1 0 0 0 1".split()}[field_name]
    with server.connection() as conn:
        before = _session_ids(conn, token)
        for bad in ("nan", "NaN", "inf", "-inf", "Infinity", "1e999", "-1e999"):
            for position in (0, count - 1):
                values = list(good)
                values[position] = bad
                query = f"/sessions?{field_name}={','.join(values)}"
                status, _, data = _request(conn, "POST", query, token, _upload_body(_volume()))
                detail = _one_line_4xx(status, data, 400)
                assert field_name in detail and "finite" in detail, detail
        assert _session_ids(conn, token) == before
        sid = _create(conn, token)  # the same connection still works
        _close(conn, token, sid)


def test_non_finite_numbers_in_the_intensity_window_are_refused(server):
    token = server.tokens["bob"]
    with server.connection() as conn:
        before = _session_ids(conn, token)
        for query, message in [
            ("inf,40", "finite"),
            ("1e999,40", "finite"),
            ("400,nan", "finite"),
            ("400,-inf", "finite"),
            ("nan,40", "positive"),
            ("percentile:nan,99", "percentiles must satisfy"),
            ("percentile:1,inf", "percentiles must satisfy"),
        ]:
            status, _, data = _request(conn, "POST", f"/sessions?intensity={query}", token, _upload_body(_volume()))
            assert message in _one_line_4xx(status, data, 400), query
        assert _session_ids(conn, token) == before


# ----------------------------------------------------------------------------- prompts and integer bounds
def _bad_requests(sid: str, data_b64: str) -> list[tuple[str, str, Any, str]]:
    """(method, path, JSON body, a word the one-line reason must contain)."""
    base = f"/sessions/{sid}"

    def mask(**kw: Any) -> str:
        fields = {"type": '"mask"', "object_id": "1", "slice_index": "1", "shape": "[32, 32]", "data": f'"{data_b64}"'}
        fields.update(kw)
        return "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"

    def points(obj: str = "1", pts: str = "[[16, 14, 1]]", labels: str = "[1]") -> str:
        return f'{{"type": "points", "object_id": {obj}, "points": {pts}, "labels": {labels}}}'

    prompts = f"{base}/prompts"
    return [
        # mask prompts: shapes with negative or zero sides, overflowing counts, non-finite numbers
        ("POST", prompts, mask(shape="[-32, 32]"), "greater than or equal to 1"),
        ("POST", prompts, mask(shape="[0, 32]"), "greater than or equal to 1"),
        ("POST", prompts, mask(shape=f"[{2**32}, {2**32}]"), "less than or equal to"),
        ("POST", prompts, mask(shape=f"[{2**64 + 1}, 3]"), "less than or equal to"),
        ("POST", prompts, mask(shape="[32, 31]"), "expected (32, 32)"),
        ("POST", prompts, mask(shape="[Infinity, 32]"), "finite"),
        ("POST", prompts, mask(shape="[NaN, 32]"), "finite"),
        ("POST", prompts, mask(slice_index="NaN"), "finite"),
        ("POST", prompts, mask(slice_index="-Infinity"), "finite"),
        ("POST", prompts, mask(slice_index="1e400"), "finite"),
        ("POST", prompts, mask(object_id="Infinity"), "finite"),
        ("POST", prompts, mask(object_id="NaN"), "finite"),
        ("POST", prompts, mask(slice_index="4"), "outside the volume"),
        ("POST", prompts, mask(slice_index=str(2**70)), "less than or equal to"),
        ("POST", prompts, mask(slice_index="-1"), "greater than or equal to 0"),
        ("POST", prompts, mask(object_id=str(2**63)), "less than or equal to 65535"),
        ("POST", prompts, mask(object_id="-1"), "greater than or equal to 0"),
        ("POST", prompts, mask(data='"not base64!"'), "base64"),
        ("POST", prompts, mask(data=f'"{wire.encode_mask_b64(np.zeros((32, 32)))}"'), "empty"),
        # points and boxes: non-finite coordinates, out-of-range ids and labels
        ("POST", prompts, points(pts="[[NaN, 14, 1]]"), "non-finite"),
        ("POST", prompts, points(pts="[[16, Infinity, 1]]"), "non-finite"),
        ("POST", prompts, points(pts="[[16, 14, -Infinity]]"), "non-finite"),
        ("POST", prompts, points(pts="[[16, 14, 1e400]]"), "non-finite"),
        ("POST", prompts, points(obj="65536"), "less than or equal to 65535"),
        ("POST", prompts, points(obj=str(2**80)), "less than or equal to 65535"),
        ("POST", prompts, points(obj="-5"), "greater than or equal to 0"),
        ("POST", prompts, points(labels="[2]"), "less than or equal to 1"),
        ("POST", prompts, points(labels=f"[{2**70}]"), "less than or equal to 1"),
        ("POST", prompts, points(pts="[[16, 14, 1], [16, 14, 2]]", labels="[1, 1]"), "different slices"),
        ("POST", prompts, points(pts="[[16, 14, 99]]"), "outside the volume"),
        ("POST", prompts, '{"type": "box", "object_id": 1, "corners": [[1, 1, 1], [NaN, 9, 1]]}', "non-finite"),
        ("POST", prompts, '{"type": "box", "object_id": 1, "corners": [[1, 1, 1], [9, 9, 2]]}', "different slices"),
        ("POST", prompts, '{"type": "points", "object_id": 1', "invalid request"),
        ("POST", prompts, "[]", "invalid request"),
        # integers in paths and queries
        ("DELETE", f"{base}/objects/{2**70}", None, "less than or equal to 65535"),
        ("DELETE", f"{base}/objects/-1", None, "greater than or equal to 0"),
        ("DELETE", f"{base}/objects/1/slices/{2**70}", None, "less than or equal to"),
        ("DELETE", f"{base}/objects/1/slices/-1", None, "greater than or equal to 0"),
        ("DELETE", f"{base}/objects/7", None, "unknown object id 7"),
        ("DELETE", f"{base}/objects/7/slices/1", None, "unknown object id 7"),
        ("DELETE", f"{base}/objects/1/slices/4", None, "outside the volume"),
        ("GET", f"{base}/masks/{2**70}", None, "less than or equal to 65535"),
        ("GET", f"{base}/masks/1?slice={2**70}", None, "less than or equal to"),
        ("GET", f"{base}/masks/1?slice=-1", None, "greater than or equal to 0"),
        ("GET", f"{base}/masks/1?slice=nan", None, "valid integer"),
        # propagation options
        ("POST", f"{base}/propagate", f'{{"slice_range": [0, {2**70}]}}', "less than or equal to"),
        ("POST", f"{base}/propagate", '{"slice_range": [0, 9]}', "outside"),
        ("POST", f"{base}/propagate", '{"slice_range": [NaN, 2]}', "finite"),
        ("POST", f"{base}/propagate", f'{{"stop_when_absent": {2**70}}}', "less than or equal to"),
        ("POST", f"{base}/propagate", '{"stop_when_absent": 0}', "greater than or equal to 1"),
        ("POST", f"{base}/propagate", f'{{"object_ids": [{2**70}]}}', "less than or equal to 65535"),
        ("POST", f"{base}/propagate", '{"object_ids": [7]}', "unknown object id 7"),
        ("POST", f"{base}/propagate", '{"object_ids": []}', "at least 1 item"),
        ("POST", f"{base}/propagate", '{"slice_range": [3, 3]}', "no prompt between slices 3 and 3"),
        ("POST", f"{base}/propagate", '{"slice_range": [2, 3], "object_ids": [1]}', "object 1 has no prompt"),
        ("POST", f"{base}/propagate", '{"direction": "sideways"}', "direction must be"),
    ]


def _masks(conn: http.client.HTTPConnection, token: str, sid: str) -> dict[int, np.ndarray]:
    status, _, data = _request(conn, "POST", f"/sessions/{sid}/propagate", token, {})
    assert status == 202, data
    deadline = time.monotonic() + WAIT
    while True:
        status, _, data = _request(conn, "GET", f"/sessions/{sid}/propagate/status", token)
        run = json.loads(data)
        if run["state"] != "running":
            break
        assert time.monotonic() < deadline, "propagation never finished"
        time.sleep(0.02)
    assert run["state"] == "done", run
    out = {}
    for obj in run["object_ids"]:
        status, headers, data = _request(conn, "GET", f"/sessions/{sid}/masks/{obj}", token)
        assert status == 200
        out[obj] = wire.decode_mask(data, wire.parse_shape(headers[wire.SHAPE_HEADER.lower()]))
    return out


def test_bad_prompts_and_out_of_range_integers_are_refused_and_change_nothing(server):
    """Every bad request on one keep-alive connection, each a 4xx with one line; then the session
    propagates exactly as a twin session that never saw them."""
    token = server.tokens["bob"]
    good = {"type": "points", "object_id": 1, "points": [[16, 14, 1]], "labels": [1]}
    good_mask = {
        "type": "mask", "object_id": 2, "slice_index": 2, "shape": [32, 32], "data": wire.encode_mask_b64(MASK)
    }  # fmt: skip
    with server.connection() as conn:
        twin, tested = _create(conn, token), _create(conn, token)
        for sid in (twin, tested):
            for prompt in (good, good_mask):
                status, _, data = _request(conn, "POST", f"/sessions/{sid}/prompts", token, prompt)
                assert status == 200, data
        bad = _bad_requests(tested, wire.encode_mask_b64(MASK))
        for method, path, body, message in bad:
            status, _, data = _request(conn, method, path, token, body)
            assert 400 <= status < 500, (method, path, body, status)
            detail = _one_line_4xx(status, data)
            assert message in detail, (method, path, body, detail)
        status, _, data = _request(conn, "GET", f"/sessions/{tested}", token)
        assert status == 200 and json.loads(data)["object_ids"] == [1, 2]
        expected, got = _masks(conn, token, twin), _masks(conn, token, tested)
        assert sorted(got) == sorted(expected) == [1, 2]
        for obj in expected:
            np.testing.assert_array_equal(got[obj], expected[obj])
        for sid in (twin, tested):
            _close(conn, token, sid)


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

    before = len(lines())
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
