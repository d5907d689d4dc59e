"""One line per request: when, who, which route, the status and how long it took.

    2026-12-01T08:40:00.123Z user=alice POST /sessions/Zx.../prompts 400 12.3ms

Nothing else: no query string (it carries the volume's geometry), no body, no header, no client
address, so the log holds no image data and nothing that identifies a patient. It replaces
uvicorn's own access log, which prints the query string. Lines go to the ``medsam2.access`` logger;
``medsam2 serve --access-log FILE`` also writes them to a file (serve.py).
"""

from __future__ import annotations

import datetime
import logging
import time

from medsam2.server.auth import ASGIApp, Message, Receive, Scope, Send, request_user

access_log = logging.getLogger("medsam2.access")
access_log.setLevel(logging.INFO)  # logged whatever --log-level says for the server's other messages
_MAX_PATH = 200


def _printable(text: str) -> str:
    # A path is client input: no control characters or spaces that could forge a second log line.
    clean = "".join(c if c.isprintable() and not c.isspace() else "?" for c in text)
    return clean if len(clean) <= _MAX_PATH else clean[:_MAX_PATH] + "..."


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            user = request_user(scope)
            elapsed_ms = (time.perf_counter() - start) * 1000
            when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
            access_log.info(
                "%s user=%s %s %s %d %.1fms",
                when.replace("+00:00", "Z"),
                user.name if user is not None else "-",
                _printable(str(scope.get("method", "?"))),
                _printable(str(scope.get("path", ""))),
                status or 500,  # no response started: the server's own error answer follows
                elapsed_ms,
            )
