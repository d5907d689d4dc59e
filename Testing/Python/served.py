"""``medsam2 serve`` started as users start it (the installed console script, a loopback port, a local
random-weight checkpoint, a users file made with ``--add-user``), and raw HTTP helpers, for the server
tests."""

from __future__ import annotations

import gzip
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pytest
from checkpoint_factory import TEST_IMAGE_SIZE, TINY_21

from medsam2.models.build import save_checkpoint
from medsam2.remote import wire

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


def _propagate(
    conn: http.client.HTTPConnection, token: str, sid: str, options: Optional[dict[str, Any]] = None
) -> dict[str, Any]:
    """Start a propagation with these options and poll it to the end; its final status."""
    status, _, data = _request(conn, "POST", f"/sessions/{sid}/propagate", token, options or {})
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
    return dict(run)


def _mask(conn: http.client.HTTPConnection, token: str, sid: str, obj: int) -> np.ndarray:
    status, headers, data = _request(conn, "GET", f"/sessions/{sid}/masks/{obj}", token)
    assert status == 200, data
    return wire.decode_mask(data, wire.parse_shape(headers[wire.SHAPE_HEADER.lower()]))


def _masks(conn: http.client.HTTPConnection, token: str, sid: str) -> dict[int, np.ndarray]:
    run = _propagate(conn, token, sid)
    return {obj: _mask(conn, token, sid, obj) for obj in run["object_ids"]}
