"""Accepting a task: the one path shared by HTTP submissions, kubectl-applied Tasks and
function destinations (chaining), so de-duplication and queueing behave the same for all.

Order matters for crash safety: the record is created first (a second submission of the id gets
the existing task, forever, not only within JetStream's dedup window), then the message is
published, then the record is marked Queued. A crash between the first two leaves a Pending
record, which the sweeper republishes; a duplicate message is harmless because only the message
carrying the record's current dispatch token can claim the task.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from typing import Any

from . import metrics, queues
from .models import StageTimestamps, Task, TaskFunction, TaskMeta, TaskPhase, TaskSpec, TaskStatus
from .plane import DataPlane
from .states import IllegalTransition
from .store import TaskGone, TaskRecord, Versioned, new_token, now


def generate_id() -> str:
    """Sortable by submission time, unique without coordination."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(5)}"


async def submit(
    plane: DataPlane, fn: TaskFunction, task_id: str | None, payload: Any
) -> Versioned:
    """Create and enqueue; raises `store.TaskExists` for a known id, `queues.QueueFull` when the
    queue refuses (the record is then removed, so the client may simply try again)."""
    await plane.depth.admit(fn)
    record = TaskRecord(
        task=Task(
            metadata=TaskMeta(name=task_id or generate_id(), namespace=fn.account),
            spec=TaskSpec(function=fn.name, payload=payload),
            status=TaskStatus(timestamps=StageTimestamps(submitted=now())),
        ),
        token=new_token(),
    )
    created = await plane.store.create(record)
    try:
        await enqueue(plane, fn, created)
    except queues.QueueFull:
        await plane.store.delete(created)
        raise
    metrics.SUBMITTED.labels(fn.account, fn.name).inc()
    return created


async def enqueue(plane: DataPlane, fn: TaskFunction, current: Versioned) -> Versioned:
    """Publish a Pending record's message and mark it Queued (the dispatcher may already have
    claimed it, which is fine)."""
    rec = current.record
    await queues.enqueue(plane.js, fn, queues.QueuedRef(rec.task.account, rec.task.id, rec.token))

    def queued(r: TaskRecord) -> TaskRecord:
        if r.phase is not TaskPhase.Pending or r.token != rec.token:
            raise IllegalTransition(r.phase, TaskPhase.Queued)
        r.task.status.phase = TaskPhase.Queued
        r.task.status.timestamps.enqueued = r.task.status.timestamps.enqueued or now()
        return r

    with contextlib.suppress(IllegalTransition, TaskGone):
        return await plane.store.transition(rec.task.account, rec.task.id, queued, current)
    return current
