"""A page of `GET /v1/tasks`, rendered from the records as stored without validating each again.

A record is stored as `TaskRecord.model_dump_json(exclude_none=True)` (`store.encode`), so its
task differs from the API's rendering only by the fields left out for being None. Validating
each record into models and dumping it again was about half of a list's time in the gateway;
parsing it with pydantic-core and merging it over the models' fields, None each, gives the same
bytes in about 70% of the time (a page of 100 Succeeded records at a million: 2.29 → 1.64 ms).
The records were validated when they were written, by the components that alone may write
them.

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
    """A model's fields in declaration order with None for each that may be left out (its
    default is None), which must be there, and how to fill in the models nested in each.
    Filling is a dict merge, in C, plus a call per nested model: a loop over every field in
    Python cost as much as validating the record."""

    def __init__(self, model: type[BaseModel]) -> None:
        self.template: dict[str, Any] = {}
        self.required: set[str] = set()
        self.nested: list[tuple[str, Fill]] = []
        for name, info in model.model_fields.items():
            self.template[name] = None
            if info.default is not None:
                self.required.add(name)
            if (fill := _nested(info.annotation)) is not None:
                self.nested.append((name, fill))

    def fill(self, doc: Any) -> dict[str, Any]:
        if type(doc) is not dict or not self.required <= doc.keys():
            raise _Unaccounted
        out = {**self.template, **doc}
        if len(out) != len(self.template):
            raise _Unaccounted  # a field the model does not have
        for name, nested in self.nested:
            if (value := out[name]) is not None:
                out[name] = nested(value)
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
        return _each(list, _nested(args[0]))
    if origin is dict and len(args) == 2:
        return _each(dict, _nested(args[1]))
    return None


def _each(container: type, fill_one: Fill | None) -> Fill | None:
    """Fill in each model of a list, or each value of a mapping, of them."""
    if fill_one is None:
        return None

    def fill(value: Any) -> Any:
        if isinstance(value, list) and container is list:
            return [fill_one(v) for v in value]
        if isinstance(value, dict) and container is dict:
            return {k: fill_one(v) for k, v in value.items()}
        raise _Unaccounted

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
