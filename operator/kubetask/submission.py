"""Accepting a task: the one path shared by HTTP submissions, kubectl-applied Tasks and
function destinations (chaining), so de-duplication and queueing behave the same for all.

Two round trips, in this order: the record is created (a create fails if the id exists, so a
second submission of an id gets the existing task for as long as it is kept, not only within
JetStream's dedup window), then the message is published, carrying the record as created and its
revision, so a dispatcher can claim the task without reading it first. A publish that fails
takes the record back. A gateway that dies between the two steps leaves a Queued record with no
message; the sweeper finds it (its queue holds nothing that old) and publishes it.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import pydantic_core

from . import metrics, queues, strict_json
from .models import StageTimestamps, Task, TaskFunction, TaskMeta, TaskPhase, TaskSpec, TaskStatus
from .plane import DataPlane
from .states import IllegalTransition
from .store import TaskExists, TaskGone, TaskRecord, Versioned, new_token, now, random_hex


class PayloadRefused(ValueError):
    """A payload no function is given; `status` is the HTTP answer for it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def check_payload(payload: Any, limit: int) -> None:
    """The payload rules, for every way a client submits (HTTP, a kubectl-applied Task): finite
    numbers only (a literal like 1e400 parses to infinity, which JSON cannot carry on to the
    function), and at most `limit` bytes as the function will get it."""
    if payload is None:
        return
    try:
        strict_json.check_finite(payload)
    except strict_json.NotJson as err:
        raise PayloadRefused(422, f"payload: {err}") from None
    size = len(pydantic_core.to_json(payload))
    if size > limit:
        raise PayloadRefused(413, f"payload is {size} bytes; the limit is {limit} bytes")


def generate_id() -> str:
    """Sortable by submission time, unique without coordination."""
    return f"{int(time.time() * 1000):011x}{random_hex(10)}"


async def submit(
    plane: DataPlane,
    fn: TaskFunction,
    task_id: str | None,
    payload: Any,
    annotations: dict[str, str] | None = None,
) -> Versioned:
    """Enqueue and record; raises `store.TaskExists` for a known id and `queues.QueueFull` when
    the queue refuses (nothing was accepted then, so the client may simply try again)."""
    await plane.depth.admit(fn)
    submitted = now()
    record = TaskRecord(
        task=Task(
            metadata=TaskMeta(
                name=task_id or generate_id(), namespace=fn.account, annotations=annotations or {}
            ),
            spec=TaskSpec(function=fn.name, payload=payload),
            status=TaskStatus(
                phase=TaskPhase.Queued,
                timestamps=StageTimestamps(submitted=submitted, enqueued=submitted),
            ),
        ),
        token=new_token(),
    )
    created = await plane.store.create(record)
    try:
        await publish_created(plane, fn, created)
    except BaseException:
        with contextlib.suppress(Exception):  # else the sweeper publishes it after all
            await plane.store.delete(created)
        raise
    metrics.of(metrics.SUBMITTED, fn.account, fn.name).inc()
    return created


async def refuse(plane: DataPlane, fn: TaskFunction, task_id: str, reason: str) -> None:
    """Record as Failed a task refused before it was queued. Only for a kubectl-applied Task:
    its object exists whatever is answered, and its status must say why it never ran (an HTTP
    client is told by its answer instead). Its payload is not kept."""
    at = now()
    record = TaskRecord(
        task=Task(
            metadata=TaskMeta(name=task_id, namespace=fn.account),
            spec=TaskSpec(function=fn.name, payload=None),
            status=TaskStatus(
                phase=TaskPhase.Failed,
                error=reason,
                timestamps=StageTimestamps(submitted=at, finished=at),
            ),
        ),
        token=new_token(),
    )
    with contextlib.suppress(TaskExists):
        await plane.store.create(record)


async def publish_created(plane: DataPlane, fn: TaskFunction, created: Versioned) -> None:
    """Publish the message of a Queued record, with the record as stored."""
    rec = created.record
    ref = queues.QueuedRef(rec.task.account, rec.task.id, rec.token, created.revision, created.raw)
    await queues.enqueue(plane.rpc, fn, ref)


async def enqueue(plane: DataPlane, fn: TaskFunction, current: Versioned) -> Versioned:
    """Publish a Pending (resumed) record's message and mark it Queued; the dispatcher may already
    have claimed it, which is fine, and then the record as it is now is returned, not the
    Pending one. A crash in between leaves it Pending for the sweeper."""
    rec = current.record
    await queues.enqueue(plane.rpc, fn, queues.QueuedRef(rec.task.account, rec.task.id, rec.token))

    def queued(r: TaskRecord) -> TaskRecord:
        if r.phase is not TaskPhase.Pending or r.token != rec.token:
            raise IllegalTransition(r.phase, TaskPhase.Queued)
        r.task.status.phase = TaskPhase.Queued
        r.task.status.timestamps.enqueued = r.task.status.timestamps.enqueued or now()
        return r

    try:
        return await plane.store.transition(rec.task.account, rec.task.id, queued, current)
    except IllegalTransition:
        return await plane.store.get(rec.task.account, rec.task.id) or current
    except TaskGone:
        return current
