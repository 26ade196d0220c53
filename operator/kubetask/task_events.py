"""One task's audit trail read back for a user (`GET /v1/tasks/{id}/events`, `kubetask
describe`): each revision of its record in KT_EVENTS (`events.py`), reduced to what changed."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from datetime import UTC, datetime

from nats import errors as nats_errors
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from . import names
from .models import TaskEvent
from .store import TaskRecord

# A task's trail is a few revisions per attempt; this bounds what one request reads and returns
# (the newest are kept) should a task be retried, paused and resumed without end.
MAX_EVENTS = 1000


# KT_EVENTS sources the task bucket asynchronously: a trail read just after a change may not
# hold it yet. Reading waits this long at most for the record as stored now to arrive.
SOURCING_WAIT = 3.0


async def read(
    js: JetStreamContext, account: str, task_id: str, latest: bytes | None = None
) -> list[TaskEvent]:
    """Oldest first, through one ordered consumer on the task's subject alone. With `latest`
    (the record as stored now) it goes on waiting, up to SOURCING_WAIT, until the trail holds
    it, so a user never sees a story without its end."""
    sub = await js.subscribe(
        names.event_subject(account, task_id),
        stream=names.EVENTS_STREAM,
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SOURCING_WAIT
    kept: deque[TaskEvent] = deque(maxlen=MAX_EVENTS)
    seen = latest is None
    try:
        remaining = int((await sub.consumer_info()).num_pending or 0)
        while remaining > 0 or not seen:
            wait = 5.0 if remaining > 0 else deadline - loop.time()
            if wait <= 0:
                break
            try:
                msg = await sub.next_msg(timeout=wait)
            except nats_errors.TimeoutError:
                if remaining > 0:
                    raise
                break
            remaining = int(msg.metadata.num_pending)
            kept.append(_event(msg.data, msg.metadata.timestamp))
            seen = seen or msg.data == latest
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return list(kept)


def _event(data: bytes, stored: datetime | None) -> TaskEvent:
    when = stored or datetime.now(UTC)
    if not data:
        return TaskEvent(time=when)
    try:
        status = TaskRecord.model_validate_json(data).task.status
    except ValueError:
        return TaskEvent(time=when, error="this revision of the record does not decode")
    return TaskEvent(
        time=when,
        phase=status.phase,
        attempts=status.attempts,
        executor=status.executor,
        error=status.error.split("\n", 1)[0] if status.error else None,
    )
