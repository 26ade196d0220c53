"""Republish tasks whose message was never confirmed in the queue.

Two crash windows leave a record without a message: a gateway dying between creating a record
and publishing it (Pending), and a dispatcher dying between recording a retry and scheduling it
(Retrying past its time). Republishing is always safe: only the message carrying the record's
current dispatch token can claim a task, and duplicates of it are recognised and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

from .. import queues, submission
from ..models import TaskPhase
from ..plane import DataPlane
from ..store import now
from .index import TaskIndex

log = logging.getLogger("kubetask.sweeper")


async def sweep_once(plane: DataPlane, index: TaskIndex) -> int:
    grace = timedelta(seconds=plane.settings.sweep_grace)
    cutoff = now() - grace
    republished = 0
    for s in list(index.repairable.values()):
        stale_pending = (
            s.phase is TaskPhase.Pending and s.submitted is not None and s.submitted < cutoff
        )
        overdue_retry = (
            s.phase is TaskPhase.Retrying and s.next_attempt is not None and s.next_attempt < cutoff
        )
        if not (stale_pending or overdue_retry):
            continue
        current = await plane.store.get(s.account, s.id)
        fn = plane.registry.function(s.account, s.function)
        if current is None or fn is None or current.record.phase is not s.phase:
            continue
        rec = current.record
        if rec.phase is TaskPhase.Pending:
            await submission.enqueue(plane, fn, current)
        else:
            await queues.enqueue(plane.rpc, fn, queues.QueuedRef(s.account, s.id, rec.token))
        republished += 1
        log.info("republished %s task %s/%s", s.phase.value, s.account, s.id)
    return republished


async def sweep_forever(plane: DataPlane, index: TaskIndex) -> None:
    interval = max(plane.settings.sweep_grace / 2, 0.5)
    while True:
        await asyncio.sleep(interval)
        with contextlib.suppress(Exception):
            await sweep_once(plane, index)
