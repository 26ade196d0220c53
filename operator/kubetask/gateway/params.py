"""Path and query parameters checked against the one grammar (`grammar.py`) before any NATS call.

A lookup by a name that cannot exist answers 404 exactly as a well-formed name that does not
exist would (no subject, key or stream is ever built from it); a filter that could never match
is a 422, since the caller made a mistake worth telling.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from datetime import datetime
from typing import Any

from .. import grammar
from .errors import ApiError


def task_id(value: str, account: str) -> str:
    if not grammar.is_task_id(value):
        raise ApiError(404, f"task {value[:200]!r} not found in account {account!r}")
    return value


def object_name(kind: str, value: str, account: str) -> str:
    if not grammar.is_name(value):
        raise ApiError(404, f"{kind} {value[:200]!r} not found in account {account!r}")
    return value


def function_filter(value: str | None) -> str | None:
    """An empty `?function=` filters nothing, like an empty `?idPrefix=`."""
    value = value or None
    if value is not None and not grammar.is_name(value):
        raise ApiError(422, f"function: {grammar.NAME_RULE}", field="function")
    return value


def _cursor(
    value: str | None, last_ok: Callable[[str], bool], returned_as: str
) -> tuple[str, str] | None:
    if not value:
        return None
    account, _, last = value.partition("/")
    if not (grammar.is_name(account) and last_ok(last)):
        raise ApiError(422, f"malformed cursor; pass back {returned_as}", field="cursor")
    return account, last


def cursor(value: str | None) -> tuple[str, str] | None:
    """A task list's cursor is `account/last-id`, as the previous page returned it."""
    return _cursor(value, grammar.is_task_id, "the cursor of the previous page")


def name_cursor(value: str | None) -> tuple[str, str] | None:
    """A listing's cursor is `account/last-name`, as the previous page's `Next-Cursor` said."""
    return _cursor(value, grammar.is_name, "the Next-Cursor of the previous page")


def time(name: str, value: str | None) -> datetime | None:
    """An RFC 3339 time; one without a zone is refused rather than guessed at."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None or "T" not in value.upper():
        raise ApiError(
            422, f"{name}: an RFC 3339 time with a zone, e.g. 2026-01-01T00:00:00Z", field=name
        )
    return parsed


def documented_queries(doc: Mapping[str, Any]) -> dict[tuple[str, str], frozenset[str]]:
    """The query parameters each operation of an OpenAPI document takes, by (method, path)."""
    return {
        (method.upper(), path): frozenset(
            p["name"] for p in op.get("parameters", []) if p.get("in") == "query"
        )
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
    }


def only_documented(pairs: Iterable[tuple[str, str]], allowed: Collection[str]) -> None:
    """A query parameter the route does not take is refused rather than ignored: a misspelt
    filter (`?stauts=Failed`) would otherwise answer with every task. One given twice is
    refused too, since either value would be dropped without a word."""
    seen: set[str] = set()
    for name, _ in pairs:
        shown = name[:100]
        if name not in allowed:
            takes = ", ".join(sorted(allowed)) or "none"
            raise ApiError(
                422,
                f"unknown query parameter {shown!r}; this route takes: {takes}",
                field=f"query.{shown}",
            )
        if name in seen:
            raise ApiError(
                422, f"query parameter {shown!r} given more than once", field=f"query.{shown}"
            )
        seen.add(name)
