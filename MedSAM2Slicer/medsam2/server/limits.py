"""Request-size limits that hold whatever framing a client claims.

- A request with both ``Content-Length`` and ``Transfer-Encoding``, or with several Content-Length
  values that differ, or one that is not a plain non-negative number, is a 400 (FramingMiddleware,
  before the token is even looked at): such framing is ambiguous (the classic request-smuggling
  set-up), and RFC 9112 section 6.1 says to close the connection after answering it, which it does.
- A declared Content-Length over the limit is refused at once (413), so a client is told before it
  streams a gigabyte.
- Whatever the headers say, the bytes that actually arrive are counted on every route: once they
  pass the limit the app stops reading and the answer is a 413 (and the connection is closed, since
  the rest of the body was never read). The volume upload may arrive chunked; JSON routes carry at
  most a 2D mask, and a chunked body there is refused (411).
"""

from __future__ import annotations

from medsam2.server.auth import ASGIApp, Message, Receive, Scope, Send, send_error

JSON_BODY_LIMIT = 64 << 20  # a base64 mask of a 4096 x 4096 slice is under 3 MB
_CLOSE = [(b"connection", b"close")]


class BodyOverLimit(Exception):
    """Raised from ``receive`` once more bytes arrived than the route's limit allows."""


def framing_problem(headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why the request's body framing is ambiguous, or None."""
    lengths = [value.strip() for name, value in headers if name.lower() == b"content-length"]
    encodings = [value.strip() for name, value in headers if name.lower() == b"transfer-encoding"]
    if lengths and encodings:
        return "request has both Content-Length and Transfer-Encoding headers; send exactly one"
    if len(set(lengths)) > 1 or not all(v.isdigit() for v in lengths):
        return f"bad Content-Length header ({', '.join(v.decode('latin-1')[:40] for v in lengths)})"
    return None


class FramingMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        problem = framing_problem(scope.get("headers", [])) if scope["type"] == "http" else None
        if problem is not None:
            await send_error(send, 400, problem, "BadRequestError", _CLOSE)
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, upload_limit: int, upload_path: str = "/sessions") -> None:
        self.app = app
        self.upload_limit = upload_limit
        self.upload_path = upload_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", [])
        lengths = [value.strip() for name, value in headers if name.lower() == b"content-length"]
        encodings = [value.strip() for name, value in headers if name.lower() == b"transfer-encoding"]
        upload = scope.get("path") == self.upload_path and scope.get("method") == "POST"
        limit = self.upload_limit if upload else min(self.upload_limit, JSON_BODY_LIMIT)
        what = "upload" if upload else "request body"

        problem = framing_problem(headers)  # FramingMiddleware answered these already; kept for safety
        if problem is not None:
            await send_error(send, 400, problem, "BadRequestError", _CLOSE)
            return
        if lengths:
            size = int(lengths[0])
            if size > limit:
                await send_error(
                    send,
                    413,
                    f"{what} of {size:,} bytes is over this server's limit of {limit:,} bytes; "
                    + ("crop or downsample the volume" if upload else "send a smaller request"),
                    "RequestTooLargeError",
                    _CLOSE,
                )
                return
        elif encodings and not upload:
            await send_error(
                send, 411, "send the request body with a Content-Length header", "BadRequestError", _CLOSE
            )
            return

        received = 0
        over = False
        replaced = False

        async def counted_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise BodyOverLimit()
            return message

        async def guarded_send(message: Message) -> None:
            # Once the body overflowed, whatever the app answers (its own error for the aborted
            # read) is replaced by the one true reason.
            nonlocal replaced
            if over:
                if message["type"] == "http.response.start" and not replaced:
                    replaced = True
                    await _send_over_limit(send, what, limit, upload)
                return
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except BodyOverLimit:
            pass
        if over and not replaced:
            await _send_over_limit(send, what, limit, upload)


async def _send_over_limit(send: Send, what: str, limit: int, upload: bool) -> None:
    fix = "crop or downsample the volume, or ask the operator to raise --max-upload-mb" if upload else (
        "send a smaller request"
    )
    detail = f"{what} is over this server's limit of {limit:,} bytes; {fix}"
    await send_error(send, 413, detail, "RequestTooLargeError", _CLOSE)
