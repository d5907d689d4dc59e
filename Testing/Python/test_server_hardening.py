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

import json
import os
from typing import Any

import numpy as np
import pytest
from served import (  # helpers and constants of the served-server tests
    MASK,
    UPLOAD_LIMIT,
    _chunked,
    _close,
    _closed_by_server,
    _create,
    _head,
    _masks,
    _npy_upload,
    _one_line_4xx,
    _raw_exchange,
    _request,
    _session_ids,
    _upload_body,
    _volume,
)

from medsam2.remote import wire


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
        ("POST", f"{base}/propagate", '{"mode": "partial"}', "mode must be one of full, local"),
        ("POST", f"{base}/propagate", '{"mode": 3}', "valid string"),
    ]


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


