"""Who may use the server: one shared token, or a users file with one hashed token per user.

The users file (``medsam2 serve --users-file FILE``) is JSON::

    {"format": "medsam2-users/1",
     "users": [{"name": "alice", "token_sha256": "<64 hex digits>", "admin": false, "max_sessions": 2}]}

``admin`` and ``max_sessions`` are optional. ``medsam2 serve --users-file FILE --add-user NAME`` adds
an entry and prints the new token once; the file never holds a token, only its SHA-256.

Why a plain SHA-256 and not a slow password hash (scrypt, PBKDF2): the tokens are generated here
with 256 random bits, so there is nothing to guess from a leaked hash that a slow hash would protect,
while a slow hash would cost every request its time. Slow hashes exist for passwords people choose.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from medsam2.errors import MedSAM2Error

FORMAT = "medsam2-users/1"
SINGLE_TOKEN_USER = "token"  # the one user of the single-token mode (it may end its own sessions)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")  # names appear in the access log: no spaces
_HEX64 = re.compile(r"[0-9a-f]{64}")


class UsersFileError(MedSAM2Error, ValueError):
    """The users file cannot be read, or an entry in it is not valid."""


@dataclass(frozen=True)
class User:
    name: str
    admin: bool = False
    max_sessions: Optional[int] = None  # None: only the server's own --max-sessions applies


def token_digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class UserDirectory:
    """Maps a presented bearer token to its user."""

    def __init__(self, entries: list[tuple[User, bytes]]) -> None:
        self._entries = entries

    @classmethod
    def single(cls, token: str) -> UserDirectory:
        return cls([(User(SINGLE_TOKEN_USER, admin=True), token_digest(token.encode("utf-8")))])

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> UserDirectory:
        users = [_parse_entry(entry, path, n) for n, entry in enumerate(_read(Path(path)), start=1)]
        if not users:
            raise UsersFileError(
                f"users file {path} has no users; add one with: medsam2 serve --users-file {path} --add-user NAME"
            )
        names = [u.name for u, _ in users]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise UsersFileError(f"users file {path} names {', '.join(duplicates)} more than once")
        return cls(users)

    @property
    def users(self) -> list[User]:
        return [user for user, _ in self._entries]

    def authenticate(self, presented: bytes) -> Optional[User]:
        digest = token_digest(presented)
        found: Optional[User] = None
        for user, expected in self._entries:
            # Every entry is compared (constant time each), so timing tells nothing about which matched.
            if hmac.compare_digest(digest, expected):
                found = user
        return found


def add_user(
    path: str | os.PathLike[str], name: str, *, admin: bool = False, max_sessions: Optional[int] = None
) -> str:
    """Add ``name`` to the users file (created if missing) and return its new token (shown once)."""
    target = Path(path).expanduser()
    if not _NAME.fullmatch(name):
        raise UsersFileError(
            f"user name {name!r} is not valid: 1-64 letters, digits, '.', '_', '@' or '-', starting with a "
            "letter or digit"
        )
    if max_sessions is not None and max_sessions < 1:
        raise UsersFileError(f"max sessions for user {name} must be at least 1, got {max_sessions}")
    entries = _read(target) if target.exists() else []
    if any(isinstance(e, dict) and e.get("name") == name for e in entries):
        raise UsersFileError(f"users file {target} already has a user {name!r}; choose another name")
    token = secrets.token_urlsafe(32)
    entry: dict[str, Any] = {"name": name, "token_sha256": token_digest(token.encode("utf-8")).hex()}
    if admin:
        entry["admin"] = True
    if max_sessions is not None:
        entry["max_sessions"] = max_sessions
    _write(target, [*entries, entry])
    return token


def _read(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsersFileError(f"cannot read users file {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UsersFileError(f"users file {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("users"), list):
        raise UsersFileError(f"users file {path} is not a {FORMAT} file (a JSON object with a 'users' list)")
    return list(data["users"])


def _parse_entry(entry: Any, path: str | os.PathLike[str], n: int) -> tuple[User, bytes]:
    where = f"users file {path}, entry {n}"
    if not isinstance(entry, dict):
        raise UsersFileError(f"{where} is not an object")
    unknown = set(entry) - {"name", "token_sha256", "admin", "max_sessions"}
    if unknown:
        raise UsersFileError(f"{where} has unknown field(s) {', '.join(sorted(unknown))}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UsersFileError(f"{where} has no valid 'name'")
    digest = entry.get("token_sha256")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise UsersFileError(f"{where} ({name}) needs 'token_sha256': the token's SHA-256 as 64 lower-case hex digits")
    admin = entry.get("admin", False)
    if not isinstance(admin, bool):
        raise UsersFileError(f"{where} ({name}): 'admin' must be true or false")
    limit = entry.get("max_sessions")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise UsersFileError(f"{where} ({name}): 'max_sessions' must be a positive integer")
    return User(name, admin, limit), bytes.fromhex(digest)


def _write(path: Path, entries: list[Any]) -> None:
    """Atomically (a reader sees the old file or the new one), readable by the owner only."""
    if not path.parent.is_dir():
        raise UsersFileError(f"folder {path.parent} for the users file does not exist; create it first")
    tmp = path.with_name(f".tmp-{secrets.token_hex(4)}-{path.name}")
    text = json.dumps({"format": FORMAT, "users": entries}, indent=2) + "\n"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise UsersFileError(f"cannot write users file {path}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
