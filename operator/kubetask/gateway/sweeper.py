"""Republish tasks whose message was never confirmed in the queue.

Three crash windows leave a record without a message: a gateway dying between creating a
task's record and publishing its message (Queued), a resume interrupted between its two steps
(Pending), and a dispatcher dying between recording a retry and scheduling it (Retrying past its
time). A Queued task is only known to have lost its message when its queue holds nothing as old
as it (messages leave a work queue when acked, so the oldest left bounds what is still there);
until then it may simply be waiting its turn. Republishing is always safe: only the message
carrying the record's current dispatch token can claim a task, and duplicates of it are
recognised and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta

from .. import names, queues, submission
from ..models import TaskFunction, TaskPhase
from ..plane import DataPlane
from ..store import now
from .index import Summary
from .indexing import Indexer

log = logging.getLogger("kubetask.sweeper")


class _Queues:
    """The oldest message of each queue, read once per sweep and only when needed."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self._oldest: dict[str, datetime | Exception | None] = {}

    async def may_hold(
        self, fn: TaskFunction, task_id: str, enqueued: datetime, grace: timedelta
    ) -> bool:
        queue = names.queue_for(fn, task_id)
        stream = queue.stream
        if stream not in self._oldest:
            try:
                self._oldest[stream] = await queues.oldest(self.plane.rpc, queue)
            except Exception as err:
                self._oldest[stream] = err
        oldest = self._oldest[stream]
        if isinstance(oldest, Exception):
            return True  # cannot tell: leave it for the next sweep
        # `grace` also absorbs clock differences between the gateway and the server.
        return oldest is not None and enqueued >= oldest - grace


def _overdue(s: Summary, cutoff: datetime) -> bool:
    if s.phase is TaskPhase.Queued:
        return s.enqueued is not None and s.enqueued < cutoff
    if s.phase is TaskPhase.Pending:
        return s.submitted is not None and s.submitted < cutoff
    return s.next_attempt is not None and s.next_attempt < cutoff


async def sweep_once(plane: DataPlane, repairable: list[Summary]) -> int:
    grace = timedelta(seconds=plane.settings.sweep_grace)
    cutoff = now() - grace
    held = _Queues(plane)
    republished = 0
    for s in repairable:
        if not _overdue(s, cutoff):
            continue
        fn = plane.registry.function(s.account, s.function)
        if fn is None:
            continue
        if s.phase is TaskPhase.Queued:
            assert s.enqueued is not None
            if await held.may_hold(fn, s.id, s.enqueued, grace):
                continue
        current = await plane.store.get(s.account, s.id)
        if current is None or current.record.phase is not s.phase:
            continue
        rec = current.record
        if rec.phase is TaskPhase.Queued:
            await submission.publish_created(plane, fn, current)
        elif rec.phase is TaskPhase.Pending:
            await submission.enqueue(plane, fn, current)
        else:
            await queues.enqueue(plane.rpc, fn, queues.QueuedRef(s.account, s.id, rec.token))
        republished += 1
        log.info("republished %s task %s/%s", s.phase.value, s.account, s.id)
    return republished


async def sweep_forever(plane: DataPlane, indexer: Indexer) -> None:
    interval = max(plane.settings.sweep_grace / 2, 0.5)
    while True:
        await asyncio.sleep(interval)
        with contextlib.suppress(Exception):
            await sweep_once(plane, await indexer.run(indexer.index.repairable))
