"""The inference server's client and the wire format both sides use.

``RemoteSession`` (client.py) is a :class:`medsam2.api.Session` on a ``medsam2 serve`` server over a
``ServerConnection`` (connection.py: token, TLS, one-line errors); wire.py
encodes volumes and masks for HTTP (the server imports it from here). Standard library and numpy only,
so this runs inside Slicer's Python with nothing to install.
"""

from medsam2.errors import SessionBusyError
from medsam2.remote.client import RemoteSession
from medsam2.remote.connection import (
    AuthenticationError,
    RemoteError,
    ServerBusyError,
    ServerConnection,
    ServerUnavailableError,
    SessionExpiredError,
)

__all__ = [
    "AuthenticationError",
    "RemoteError",
    "RemoteSession",
    "ServerBusyError",
    "ServerConnection",
    "ServerUnavailableError",
    "SessionBusyError",
    "SessionExpiredError",
]
