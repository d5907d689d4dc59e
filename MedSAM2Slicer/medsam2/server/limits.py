"""Request-size limits applied before any body is read.

A declared Content-Length over the limit is refused at once (413), so a client is told before it
streams a gigabyte. The volume upload may also arrive chunked (no Content-Length): its route counts
bytes as they arrive (app._read_limited). JSON routes carry at most a 2D mask; a chunked body there
is refused (411) rather than read without a bound.
"""

from __future__ import annotations

from medsam2.server.auth import ASGIApp, Receive, Scope, Send, send_error

JSON_BODY_LIMIT = 64 << 20  # a base64 mask of a 4096 x 4096 slice is under 3 MB


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, upload_limit: int, upload_path: str = "/sessions") -> None:
        self.app = app
        self.upload_limit = upload_limit
        self.upload_path = upload_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.lower(): value for name, value in scope.get("headers", [])}
        upload = scope.get("path") == self.upload_path and scope.get("method") == "POST"
        limit = self.upload_limit if upload else min(self.upload_limit, JSON_BODY_LIMIT)
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await send_error(send, 400, f"bad Content-Length header {declared!r}", "BadRequestError")
                return
            if size > limit:
                what = "upload" if upload else "request body"
                await send_error(
                    send,
                    413,
                    f"{what} of {size:,} bytes is over this server's limit of {limit:,} bytes; "
                    + ("crop or downsample the volume" if upload else "send a smaller request"),
                    "RequestTooLargeError",
                )
                return
        elif b"transfer-encoding" in headers and not upload:
            await send_error(
                send, 411, "send the request body with a Content-Length header", "BadRequestError"
            )
            return
        await self.app(scope, receive, send)
