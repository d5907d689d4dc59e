"""Server settings: where to listen, the API token, TLS, the models served and the resource limits."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from medsam2.errors import MedSAM2Error
from medsam2.server.users import UserDirectory

TOKEN_ENV = "MEDSAM2_SERVER_TOKEN"
MIN_TOKEN_LENGTH = 16
DEFAULT_PORT = 8765
TOKEN_HINT = (
    'create one with: python -c "import secrets; print(secrets.token_urlsafe(32))" > token.txt; '
    f"chmod 600 token.txt; then pass --token-file token.txt (or set {TOKEN_ENV})"
)


class ServerConfigError(MedSAM2Error, ValueError):
    """The server cannot start with these settings."""


@dataclass(frozen=True)
class ServerSettings:
    # Loopback by default: exposing a GPU server to the network is a decision the operator makes.
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: Optional[str] = None  # else token_file, else $MEDSAM2_SERVER_TOKEN; no token, no server
    token_file: Optional[str] = None
    users_file: Optional[str] = None  # one hashed token per user (users.py), instead of the one token
    tls_certfile: Optional[str] = None
    tls_keyfile: Optional[str] = None
    # Serving beyond this machine without TLS sends tokens and images in clear text: only on request.
    insecure_no_tls: bool = False
    access_log: Optional[str] = None  # a file for the one-line-per-request log (also logged to stderr)
    models: tuple[str, ...] = ()  # names a client may ask for; the first is the default
    device: str = "auto"
    max_upload_bytes: int = 1 << 30  # compressed request body
    max_voxels: int = 1 << 29  # e.g. 512 x 512 x 2048
    max_sessions: int = 4
    idle_seconds: float = 1800.0
    # Device memory shared by all sessions (volume on the device + slice-feature cache). None: half of
    # what is free on the device when the server starts.
    memory_budget_bytes: Optional[int] = None
    # Upper bound on one session's feature cache; None: enough for every slice of its volume.
    cache_bytes_per_session: Optional[int] = None

    def resolve_token(self, environ: Optional[Mapping[str, str]] = None) -> str:
        """The API token from the settings, a token file or the environment; refuse to run without one."""
        env = os.environ if environ is None else environ
        if self.token:
            token, source = self.token, "token setting"
        elif self.token_file:
            path = Path(self.token_file).expanduser()
            try:
                token = path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ServerConfigError(f"cannot read token file {path}: {exc.strerror or exc}") from None
            source = f"token file {path}"
        elif env.get(TOKEN_ENV, "").strip():
            token, source = env[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
        else:
            raise ServerConfigError(f"no API token: the server refuses to run without one; {TOKEN_HINT}")
        if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
            raise ServerConfigError(
                f"API token from {source} is too weak ({len(token)} characters or contains spaces); use at "
                f"least {MIN_TOKEN_LENGTH} characters without spaces; {TOKEN_HINT}"
            )
        return token

    def resolve_users(self, environ: Optional[Mapping[str, str]] = None) -> UserDirectory:
        """Who may use the server: the users file, else the one API token (resolve_token)."""
        if not self.users_file:
            return UserDirectory.single(self.resolve_token(environ))
        if self.token or self.token_file:
            raise ServerConfigError("give either --users-file (one token per user) or --token-file, not both")
        return UserDirectory.load(Path(self.users_file).expanduser())

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ServerConfigError(f"port must be between 0 and 65535, got {self.port}")
        if not self.loopback_only and not self.tls and not self.insecure_no_tls:
            raise ServerConfigError(
                f"refusing to serve on {self.host} without TLS: tokens and images would cross the network "
                "unencrypted; pass --tls-cert and --tls-key (or, on a network you trust, --insecure-no-tls)"
            )
        if bool(self.tls_certfile) != bool(self.tls_keyfile):
            raise ServerConfigError(
                "TLS needs both a certificate (--tls-cert) and its private key (--tls-key)"
            )
        for label, path in (("TLS certificate", self.tls_certfile), ("TLS key", self.tls_keyfile)):
            if path and not Path(path).expanduser().is_file():
                raise ServerConfigError(f"{label} file {path} does not exist")
        for name, value in (
            ("max upload bytes", self.max_upload_bytes),
            ("max voxels", self.max_voxels),
            ("max sessions", self.max_sessions),
        ):
            if value < 1:
                raise ServerConfigError(f"{name} must be at least 1, got {value}")
        if not self.idle_seconds > 0:
            raise ServerConfigError(f"idle expiry must be positive seconds, got {self.idle_seconds}")
        if self.memory_budget_bytes is not None and self.memory_budget_bytes < 1:
            raise ServerConfigError(f"memory budget must be positive, got {self.memory_budget_bytes}")
        if self.cache_bytes_per_session is not None and self.cache_bytes_per_session < 0:
            raise ServerConfigError(
                f"feature cache per session must be >= 0, got {self.cache_bytes_per_session}"
            )

    @property
    def tls(self) -> bool:
        return bool(self.tls_certfile and self.tls_keyfile)

    @property
    def loopback_only(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a host name: assume it is reachable from elsewhere
