"""The inference server on a real uvicorn on 127.0.0.1, driven by RemoteSession: concurrent clients,
one-line errors, cancel, restarts, TLS; and the wire format and fair lock underneath."""

from __future__ import annotations

import datetime
import gzip
import http.client
import io
import ipaddress
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from server_cases import (  # cases, helpers and constants shared by the server tests
    AUTH,
    TOKEN,
    WAIT,
    Case,
    Gate,
    _app,
    _apply,
    _points_body,
    _remote,
    _settings,
    in_process_session,
    live_server,
)

from medsam2.errors import (
    InvalidPromptError,
    InvalidVolumeError,
    MedSAM2Error,
    ModelError,
    PropagationCancelled,
)
from medsam2.remote import (
    AuthenticationError,
    RemoteSession,
    ServerBusyError,
    ServerUnavailableError,
    SessionBusyError,
    SessionExpiredError,
    wire,
)
from medsam2.server.app import create_app
from medsam2.server.locking import FairLock, SerialisedPredictor


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
                corrected_full = session.propagate(mode="full")
                results[name] = dict(
                    previews=previews,
                    masks=first.masks,
                    correction_preview=correction,
                    corrected=corrected.masks,
                    corrected_full=corrected_full.masks,
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
        for key in ("previews", "masks", "correction_preview", "corrected", "corrected_full"):
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
    local = in_process_session(predictor, case)
    labels = np.zeros(case.volume.shape, np.uint8)
    labels[2:4, 15:25, 18:30] = 1
    with live_server(app, certfile=cert, keyfile=key) as url:
        assert url.startswith("https://")
        with _remote(url, case, ca_file=cert) as session:
            steps: list[tuple[int, int]] = []
            with pytest.raises(InvalidPromptError, match="slice 6 is outside the volume"):
                session.precompute_features(from_slice=6)  # checked on the server, before the run starts
            session.precompute_features(progress=lambda d, t: steps.append((d, t)), from_slice=3)
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
