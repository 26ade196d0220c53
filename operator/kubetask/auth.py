"""Bearer tokens bound to an account (or admin), kept hashed in a JSON file.

On Kubernetes the file is a mounted Secret; in embedded mode `kubetask dev` writes it. The file is
re-read when it changes, so tokens can be added or revoked without a restart. Only SHA-256 hashes
are stored: a leaked file does not leak tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
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


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenBook:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime: float | None = None
        self._by_hash: dict[str, Principal] = {}

    def _reload(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self._by_hash, self._mtime = {}, None
            return
        if mtime == self._mtime:
            return
        entries = json.loads(self.path.read_text() or "{}").get("tokens", [])
        self._by_hash = {
            e["sha256"]: Principal(e.get("name", ""), e.get("account"), bool(e.get("admin")))
            for e in entries
        }
        self._mtime = mtime

    def authenticate(self, token: str) -> Principal | None:
        self._reload()
        digest = hash_token(token)
        for known, principal in self._by_hash.items():
            if hmac.compare_digest(known, digest):
                return principal
        return None


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
