"""Bearer tokens bound to an account (or admin), kept hashed in a JSON file.

On Kubernetes the file is a mounted Secret; in embedded mode `kubetask dev` writes it. The file is
re-read when it changes, so tokens can be added or revoked without a restart. Only SHA-256 hashes
are stored: a leaked file does not leak tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Principal:
    name: str
    account: str | None  # None for an admin
    admin: bool

    def scope(self, account: str | None) -> str | None:
        """The account a call acts on. For a tenant that is always its own; asking for another
        account's objects raises `OutOfScope` (answered as 404, so existence does not leak)."""
        if self.admin:
            return account
        if account is not None and account != self.account:
            raise OutOfScope(account)
        return self.account

    def one_account(self, account: str | None) -> str:
        scoped = self.scope(account)
        return scoped if scoped is not None else "default"


class OutOfScope(Exception):
    pass


class Unauthenticated(Exception):
    """No valid bearer token: answered 401 with the reason."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenBook:
    def __init__(self, path: Path, recheck_seconds: float = 1.0) -> None:
        self.path = path
        self.recheck_seconds = recheck_seconds
        self._checked = 0.0
        self._version: tuple[int, int, int] | None = None
        self._by_hash: dict[str, Principal] = {}

    def _reload(self, force: bool = False) -> None:
        # Known tokens re-stat the file at most once a second (revocations land within it); an
        # unknown token re-stats at once, so a token added a moment ago works straight away.
        now = time.monotonic()
        if not force and now - self._checked < self.recheck_seconds:
            return
        self._checked = now
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._by_hash, self._version = {}, None
            return
        # mtime alone misses two writes within one clock tick; a replaced file has a new inode.
        version = (st.st_ino, st.st_mtime_ns, st.st_size)
        if version == self._version:
            return
        entries = json.loads(self.path.read_text() or "{}").get("tokens", [])
        self._by_hash = {
            e["sha256"]: Principal(e.get("name", ""), e.get("account"), bool(e.get("admin")))
            for e in entries
        }
        self._version = version

    def authenticate(self, token: str) -> Principal | None:
        self._reload()
        # A dict lookup on the SHA-256 of the token: the hash, not the token, is compared, so
        # timing reveals nothing useful about valid tokens.
        digest = hash_token(token)
        if digest not in self._by_hash:
            self._reload(force=True)
        return self._by_hash.get(digest)

    def from_header(self, authorization: str | None) -> Principal:
        """The caller named by an `Authorization: Bearer <token>` header."""
        if not authorization or authorization[:7].lower() != "bearer ":
            raise Unauthenticated("missing bearer token: send 'Authorization: Bearer <token>'")
        found = self.authenticate(authorization[7:].strip())
        if found is None:
            raise Unauthenticated("invalid token")
        return found


def create_token(path: Path, name: str, account: str | None, admin: bool = False) -> str:
    """Append a new token to the file and return it; the plaintext is shown only this once."""
    token = "kt_" + secrets.token_urlsafe(24)
    data = json.loads(path.read_text()) if path.exists() else {"tokens": []}
    data["tokens"].append(
        {
            "name": name,
            "account": None if admin else account,
            "admin": admin,
            "sha256": hash_token(token),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.chmod(tmp, 0o600)
    tmp.replace(path)
    return token
