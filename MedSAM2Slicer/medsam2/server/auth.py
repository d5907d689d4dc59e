"""Bearer-token authentication for every route except ``/health``.

The token names the user (users.py: one shared token, or a users file); the middleware puts that
:class:`~.users.User` in the request's state (``scope["state"]["user"]``) for the routes, which give
each user their own sessions, and for the access log.

An ASGI middleware rather than a FastAPI dependency, so nothing can be reached without the token:
not the OpenAPI schema, not an unknown path (a 401 instead of a 404 tells a scanner nothing about
which routes exist), not a route someone adds later and forgets to protect.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any, Awaitable, Callable, Iterable, Mapping, Optional

from medsam2.server.users import User, UserDirectory

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/health"})


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def token_matches(presented: bytes, expected: bytes) -> bool:
    """Constant-time comparison. Both sides are hashed first so that not even the token's length
    leaks through timing (compare_digest returns early on a length mismatch)."""
    return hmac.compare_digest(_digest(presented), _digest(expected))


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, credentials = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and credentials.strip():
                return credentials.strip()
            return None
    return None


def request_user(scope: Mapping[str, Any]) -> Optional[User]:
    """The authenticated user of a request (None on the open paths)."""
    user = scope.get("state", {}).get("user")
    return user if isinstance(user, User) else None


class BearerTokenMiddleware:
    def __init__(self, app: ASGIApp, users: UserDirectory, open_paths: frozenset[str] = OPEN_PATHS) -> None:
        self.app = app
        self.users = users
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("path") in self.open_paths:
            await self.app(scope, receive, send)
            return
        presented = bearer_token(scope.get("headers", []))
        user = self.users.authenticate(presented) if presented is not None else None
        if user is not None:
            scope.setdefault("state", {})["user"] = user
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        detail = (
            "missing bearer token: send the header 'Authorization: Bearer <token>'"
            if presented is None
            else "invalid token: it matches no user of this server"
        )
        await send_error(
            send, 401, detail, "AuthenticationError", [(b"www-authenticate", b'Bearer realm="medsam2"')]
        )


async def send_error(
    send: Send, status: int, detail: str, error: str, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """A JSON error response in the API's format ({"detail": one line, "error": class name})."""
    body = json.dumps({"detail": detail, "error": error}).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode("ascii")),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
