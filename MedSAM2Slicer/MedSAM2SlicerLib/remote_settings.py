"""The inference server the panel talks to: its address (https unless it is this machine, or the
user has confirmed plain http), token, CA file, and a connection test. The test runs off the GUI
thread (the panel starts it through the background worker)."""

from __future__ import annotations

import ipaddress
import os
import urllib.parse
from dataclasses import dataclass
from typing import Any, Optional

from medsam2.errors import InvalidPromptError


def isLoopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerSettings:
    url: str
    token: str
    caFile: str = ""  # PEM bundle for a server with a private CA; empty: the system's CAs
    allowPlainHttp: bool = False  # the user confirmed plain http to a host that is not this machine

    def check(self) -> None:
        """Refuse what must not be sent: raises InvalidPromptError with one line."""
        parsed = urllib.parse.urlsplit(self.url.strip())
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise InvalidPromptError(f"server address must look like https://HOST:PORT, got {self.url!r}")
        if parsed.scheme == "http" and not isLoopback(parsed.hostname) and not self.allowPlainHttp:
            raise InsecureServerError(
                f"{parsed.hostname} is reached over plain http, which sends the token and the images "
                "unencrypted; use https, or confirm plain http for this server"
            )
        if not self.token.strip():
            raise InvalidPromptError("no server token; enter the access token of the inference server")
        if self.caFile and not os.path.isfile(self.caFile):
            raise InvalidPromptError(f"CA file {self.caFile!r} does not exist")

    def key(self) -> tuple[str, ...]:
        return ("remote", self.url.strip(), self.token.strip(), self.caFile)


class InsecureServerError(InvalidPromptError):
    """Plain http to another machine, not confirmed by the user."""


def testConnection(settings: ServerSettings) -> str:
    """One line describing the server (its model and device), or a RemoteError with one line.
    Blocking: call it from the worker thread."""
    settings.check()
    from medsam2.remote.connection import ServerConnection

    connection = ServerConnection(settings.url, settings.token, timeout=10.0, ca_file=settings.caFile or None)
    connection.health()
    info: dict[str, Any] = connection.info()
    parts = [f"{key} {info[key]}" for key in ("model", "device", "version") if info.get(key)]
    return f"connected to {connection.url}" + (f" ({', '.join(parts)})" if parts else "")


def engineFor(settings: Optional[ServerSettings]) -> Any:
    """The engine client for these settings: in process (None) or the server."""
    from .engine_client import LocalEngineClient, RemoteEngineClient

    if settings is None:
        return LocalEngineClient()
    settings.check()
    return RemoteEngineClient(settings.url, settings.token, ca_file=settings.caFile or None)
