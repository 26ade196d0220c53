"""A page of `GET /v1/tasks`, rendered from the records as stored without validating each again.

A record is stored as `TaskRecord.model_dump_json(exclude_none=True)` (`store.encode`), so its
task differs from the API's rendering only by the fields left out for being None. Validating
100 records into models and dumping them again took half of a list's time in the gateway
(about 18 µs a record: 1.8 ms of the 4.9 spent per page of 100); parsing each with
pydantic-core and putting the missing Nones back, in the models' field order, gives the same
bytes for a fraction of that. The records were validated when they were written, by the
components that alone may write them.

Anything the shape does not account for (a field it does not know, a missing field whose
default is not None, a nested object that is not an object) goes the validating way instead,
so a record written by another version or around the platform is rendered as before, or
reported unreadable for quarantine.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

import pydantic_core
from pydantic import BaseModel

from ..models import Task
from ..store import TaskRecord, Unreadable, decode

Fill = Callable[[Any], Any]


class _Unaccounted(Exception):
    """The stored document has something the shape does not know how to fill in."""


class Shape:
    """A model's fields in declaration order, which of them may be left out (default None),
    and how to fill in the models nested in each."""

    def __init__(self, model: type[BaseModel]) -> None:
        self.fields: list[tuple[str, bool, Fill | None]] = [
            (name, info.default is None, _nested(info.annotation))
            for name, info in model.model_fields.items()
        ]
        self.names = frozenset(name for name, _, _ in self.fields)

    def fill(self, doc: Any) -> dict[str, Any]:
        if type(doc) is not dict or not self.names.issuperset(doc):
            raise _Unaccounted
        out: dict[str, Any] = {}
        for name, optional, nested in self.fields:
            if name in doc:
                value = doc[name]
                out[name] = value if nested is None or value is None else nested(value)
            elif optional:
                out[name] = None
            else:
                raise _Unaccounted
        return out


def _nested(annotation: Any) -> Fill | None:
    """How to fill in a field's value: a model, an optional one, or a list or mapping of them;
    None when the value holds no model (plain values, and `Any`: payloads and results)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return Shape(annotation).fill
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _nested(inner[0]) if len(inner) == 1 else None
    if origin is list and args:
        return _each_of_list(_nested(args[0]))
    if origin is dict and len(args) == 2:
        return _each_of_dict(_nested(args[1]))
    return None


def _each_of_list(each: Fill | None) -> Fill | None:
    if each is None:
        return None

    def fill(value: Any) -> Any:
        if type(value) is not list:
            raise _Unaccounted
        return [each(v) for v in value]

    return fill


def _each_of_dict(each: Fill | None) -> Fill | None:
    if each is None:
        return None

    def fill(value: Any) -> Any:
        if type(value) is not dict:
            raise _Unaccounted
        return {k: each(v) for k, v in value.items()}

    return fill


_TASK = Shape(Task)
_RECORD_FIELDS = frozenset(TaskRecord.model_fields)


def task_json(key: str, stored: bytes, revision: int) -> Any:
    """The task of a stored record as the API renders it (JSON types); `Unreadable` when the
    record does not decode."""
    try:
        doc = pydantic_core.from_json(stored)
        if type(doc) is not dict or not _RECORD_FIELDS.issuperset(doc):
            raise _Unaccounted
        return _TASK.fill(doc["task"])
    except (ValueError, KeyError, _Unaccounted):
        return decode(key, stored, revision).task.model_dump(mode="json")


def render(
    found: Iterable[tuple[str, bytes, int]], cursor: str | None
) -> tuple[bytes, list[Unreadable]]:
    """A `TaskList` document of the records (key, stored, revision) that decode, and those
    that do not."""
    items: list[Any] = []
    unreadable: list[Unreadable] = []
    for key, stored, revision in found:
        try:
            items.append(task_json(key, stored, revision))
        except Unreadable as err:
            unreadable.append(err)
    return pydantic_core.to_json({"items": items, "cursor": cursor}), unreadable
