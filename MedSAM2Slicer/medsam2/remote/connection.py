"""The HTTP(S) connection to a ``medsam2 serve`` server: bearer token, TLS, and every failure turned
into a one-line exception (RemoteError subclasses for the connection, the engine's own classes for
the server's refusals of bad input). Standard library only."""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Optional

from medsam2.errors import (
    DeviceUnavailableError,
    InvalidPromptError,
    InvalidVolumeError,
    MedSAM2Error,
    MemoryBudgetError,
    ModelError,
    PropagationCancelled,
    SessionBusyError,
    one_line,
)


class RemoteError(MedSAM2Error):
    """The inference server refused or failed a request."""


class ServerUnavailableError(RemoteError, ConnectionError):
    """The server cannot be reached (refused, unknown host, timeout, TLS failure)."""


class AuthenticationError(RemoteError, PermissionError):
    """The server rejected the API token."""


class ServerBusyError(RemoteError):
    """The server is full (sessions or memory); ``retry_after`` seconds is its hint."""

    def __init__(self, message: str, retry_after: Optional[float] = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SessionExpiredError(RemoteError):
    """The session is gone from the server (idle expiry, closed, or a server restart)."""


ENGINE_ERRORS: dict[str, type[MedSAM2Error]] = {
    cls.__name__: cls
    for cls in (
        InvalidPromptError,
        InvalidVolumeError,
        MemoryBudgetError,
        ModelError,
        DeviceUnavailableError,
        PropagationCancelled,
    )
}
# Server-side refusals of the upload itself: to the user, the volume cannot be used as it is.
ENGINE_ERRORS.update(VolumeTooLargeError=InvalidVolumeError, RequestTooLargeError=InvalidVolumeError)


class ServerConnection:
    """HTTP(S) with the bearer token, and errors turned into one-line exceptions."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 120.0,
        ca_file: Optional[str] = None,
        verify_tls: bool = True,
    ) -> None:
        parsed = urllib.parse.urlsplit(url.strip())
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ServerUnavailableError(f"server URL must look like http(s)://HOST:PORT, got {url!r}")
        if not token or not token.strip():
            raise AuthenticationError("no API token given: ask the server's operator for its token")
        self.url = f"{parsed.scheme}://{parsed.netloc}{parsed.path.rstrip('/')}"
        self.timeout = float(timeout)
        self._token = token.strip()
        handlers: list[Any] = []
        if parsed.scheme == "https":
            context = ssl.create_default_context(cafile=ca_file)
            if not verify_tls:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            handlers.append(urllib.request.HTTPSHandler(context=context))
        if _is_loopback(parsed.hostname):
            handlers.append(urllib.request.ProxyHandler({}))  # never send loopback traffic to a proxy
        self._opener = urllib.request.build_opener(*handlers)

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Optional[dict[str, str]] = None,
        json_body: Any = None,
        data: Optional[bytes] = None,
        content_type: Optional[str] = None,
        bad_request: type[MedSAM2Error] = RemoteError,
        timeout: Optional[float] = None,
    ) -> tuple[bytes, http.client.HTTPMessage]:
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        if json_body is not None:
            data = json.dumps(json_body, allow_nan=False).encode("utf-8")
            content_type = "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._opener.open(req, timeout=timeout or self.timeout) as response:
                return response.read(), response.headers
        except urllib.error.HTTPError as err:
            body = err.read() if err.fp is not None else b""
            raise self._http_error(err.code, body, err.headers, bad_request) from None
        except urllib.error.URLError as err:
            raise self._connection_error(err.reason) from None
        except (OSError, http.client.HTTPException) as err:
            raise self._connection_error(err) from None

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        body, _ = self.request(method, path, **kwargs)
        return json.loads(body) if body else None

    def health(self) -> dict[str, Any]:
        return self.json("GET", "/health")

    def info(self) -> dict[str, Any]:
        return self.json("GET", "/info")

    def _http_error(
        self, status: int, body: bytes, headers: Any, bad_request: type[MedSAM2Error]
    ) -> MedSAM2Error:
        try:
            payload = json.loads(body)
            detail, kind = one_line(payload["detail"]), str(payload.get("error", ""))
        except (ValueError, KeyError, TypeError):
            detail, kind = one_line(body.decode("utf-8", "replace"))[:200] or f"HTTP {status}", ""
        if status == 401:
            return AuthenticationError(
                f"the MedSAM2 server at {self.url} rejected the request: {detail}; check the API token"
            )
        if status in (429, 503):  # 429: this user's own session limit
            retry = headers.get("Retry-After") if headers is not None else None
            try:
                retry_after: Optional[float] = float(retry) if retry is not None else None
            except ValueError:
                retry_after = None
            hint = f" (retry in {retry_after:g} s)" if retry_after is not None else ""
            return ServerBusyError(f"the MedSAM2 server at {self.url} is busy: {detail}{hint}", retry_after)
        if kind == "SessionNotFoundError":
            return SessionExpiredError(detail)
        if kind == "SessionBusyError":
            return SessionBusyError(detail)
        if kind in ENGINE_ERRORS:
            return ENGINE_ERRORS[kind](detail)
        if status == 400:
            return bad_request(detail)
        return RemoteError(f"the MedSAM2 server at {self.url} answered HTTP {status}: {detail}")

    def _connection_error(self, reason: Any) -> ServerUnavailableError:
        where = f"the MedSAM2 server at {self.url}"
        if isinstance(reason, ssl.SSLCertVerificationError):
            return ServerUnavailableError(
                f"{where} presented a TLS certificate this client does not trust ({reason.verify_message}); "
                "pass the server's certificate as ca_file"
            )
        if isinstance(reason, ssl.SSLError):
            return ServerUnavailableError(
                f"TLS with {where} failed ({reason.reason or reason}); is it serving https on that port?"
            )
        if isinstance(reason, ConnectionRefusedError):
            return ServerUnavailableError(
                f"cannot connect to {where}: connection refused; is `medsam2 serve` running?"
            )
        if isinstance(reason, (socket.timeout, TimeoutError)):
            return ServerUnavailableError(f"{where} did not answer within {self.timeout:g} s")
        if isinstance(reason, socket.gaierror):
            return ServerUnavailableError(
                f"cannot resolve the host name of {where}: {reason.strerror or reason}"
            )
        if isinstance(
            reason, (http.client.RemoteDisconnected, http.client.BadStatusLine, ConnectionResetError)
        ):
            hint = (
                "; if the server uses TLS the URL must start with https://"
                if self.url.startswith("http:")
                else ""
            )
            return ServerUnavailableError(f"{where} closed the connection without an answer{hint}")
        return ServerUnavailableError(
            f"cannot reach {where}: {one_line(str(reason)) or type(reason).__name__}"
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
