"""Bearer tokens bound to an account (or admin), kept hashed in a JSON file.

On Kubernetes the file is a mounted Secret; in embedded mode `kubetask dev` writes it. The file is
re-read when it changes, so tokens can be added or revoked without a restart. Only SHA-256 hashes
are stored: a leaked file does not leak tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import grammar, private_files, reserved_namespaces

log = logging.getLogger("kubetask.auth")


@dataclass(frozen=True)
class Principal:
    name: str
    account: str | None  # None for an admin
    admin: bool

    def scope(self, account: str | None) -> str | None:
        """The account a call acts on. For a tenant that is always its own; asking for another
        account's objects raises `OutOfScope` (answered as 404, so existence does not leak).
        An empty `?account=` is no account named."""
        account = account or None
        if account is not None and not (
            grammar.is_name(account) and (self.admin or account == self.account)
        ):
            raise OutOfScope(account)
        return account if self.admin else self.account

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
        self._by_hash = {}
        for entry in read_entries(self.path):
            principal = _principal(entry)
            if principal is None:
                log.error("ignoring a malformed entry of %s (%s)", self.path, entry.get("id"))
                continue
            self._by_hash[entry["sha256"]] = principal
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


def _principal(entry: dict[str, Any]) -> Principal | None:
    """The caller an entry of the file stands for; None for one no grammar-checked token
    could have written (a hand edit), which authenticates nobody rather than somebody wide."""
    digest, account, admin = entry.get("sha256"), entry.get("account"), entry.get("admin")
    if not isinstance(digest, str) or admin not in (True, False, None):
        return None
    if admin:
        return Principal(str(entry.get("name", "")), None, True)
    if not grammar.is_name(account):
        return None
    return Principal(str(entry.get("name", "")), account, False)


def read_entries(path: Path) -> list[dict[str, Any]]:
    """The file's token entries; an unreadable file holds none (every token is refused)."""
    try:
        data = json.loads(path.read_text() or "{}")
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as err:
        log.error("cannot read the token file %s: %s", path, err)
        return []
    entries = data.get("tokens", []) if isinstance(data, dict) else []
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


class TokenError(ValueError):
    """A token request that is refused: said to the user as it is."""


def _entries_to_edit(path: Path, must_exist: bool) -> list[dict[str, Any]]:
    """The file's entries for the `tokens` commands, which, unlike the gateway, must not read
    a file they cannot parse as empty: `create` would then write a file holding only the new
    token, and every other token in it would be gone."""
    try:
        data = json.loads(path.read_text() or "{}")
    except FileNotFoundError:
        if must_exist:
            raise TokenError(
                f"there is no token file at {path} (`kubetask tokens create --file {path}` "
                "makes one)"
            ) from None
        return []
    except (OSError, ValueError) as err:
        raise TokenError(
            f"cannot read the token file {path} ({err}); nothing was changed"
        ) from None
    entries = data.get("tokens", []) if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise TokenError(
            f'{path} is not a token file (an object whose "tokens" is a list of entries);'
            " nothing was changed"
        )
    return entries


def _write_entries(path: Path, entries: list[dict[str, Any]]) -> None:
    private_files.write(path, json.dumps({"tokens": entries}, indent=2))


def create_token(path: Path, name: str | None, account: str | None, admin: bool = False) -> str:
    """Append a new token to the file and return it; the plaintext is shown only this once."""
    return issue_token(path, name, account, admin)[0]


def issue_token(
    path: Path, name: str | None, account: str | None, admin: bool = False
) -> tuple[str, dict[str, Any]]:
    """Append a new token to the file; returns the token and its entry (without the hash).

    A token is for exactly one account or is an admin's: there is no token for "no account in
    particular", which the gateway would have to read as either nothing or everything."""
    if admin and account is not None:
        raise TokenError("a token is either an admin's (--admin) or one account's (--account)")
    if not admin:
        if account is None:
            raise TokenError("say whose token this is: --account NAME, or --admin")
        if not grammar.is_name(account):
            raise TokenError(f"account {account!r} is not a valid name: {grammar.NAME_RULE}")
        if reserved_namespaces.is_system(account):
            raise TokenError(
                f"account {account!r} is reserved: names starting"
                f" {reserved_namespaces.SYSTEM_PREFIX!r} are Kubernetes' system namespaces"
            )
    token = "kt_" + secrets.token_urlsafe(24)
    entry: dict[str, Any] = {
        "id": "tok_" + secrets.token_hex(6),
        "name": name or ("admin" if admin else account),
        "account": None if admin else account,
        "admin": admin,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "sha256": hash_token(token),
    }
    with private_files.editing(path):
        _write_entries(path, [*_entries_to_edit(path, must_exist=False), entry])
    return token, _public(entry)


def _public(entry: dict[str, Any]) -> dict[str, Any]:
    """An entry as shown to people: everything but the hash."""
    return {k: v for k, v in entry.items() if k != "sha256"}


def list_tokens(path: Path) -> list[dict[str, Any]]:
    """Every entry, without its hash."""
    return [_public(e) for e in _entries_to_edit(path, must_exist=True)]


def revoke_token(path: Path, key: str) -> list[dict[str, Any]]:
    """Remove the tokens whose id or name is `key`; returns what was removed. The gateway stops
    accepting them within a second (it re-reads the file when it changes)."""
    with private_files.editing(path):
        entries = _entries_to_edit(path, must_exist=True)
        gone = [e for e in entries if key in (e.get("id"), e.get("name"))]
        if not gone:
            raise TokenError(f"no token has id or name {key!r}")
        _write_entries(path, [e for e in entries if e not in gone])
    return [_public(e) for e in gone]
