"""One task's audit trail read back for a user (`GET /v1/tasks/{id}/events`, `kubetask
describe`): each revision of its record in KT_EVENTS (`events.py`), reduced to what changed."""

from __future__ import annotations

import asyncio
from collections import deque
from datetime import UTC, datetime

from nats.aio.client import Client
from nats.js.errors import NotFoundError

from . import direct_reads, names
from .models import TaskEvent
from .store import TaskRecord

# A task's trail is a few revisions per attempt; this bounds what one request reads and returns
# (the newest are kept) should a task be retried, paused and resumed without end.
MAX_EVENTS = 1000


# KT_EVENTS sources the task bucket asynchronously: a trail read just after a change may not
# hold it yet. Reading waits this long at most for the record as stored now to arrive.
SOURCING_WAIT = 3.0
# While it waits, how often it asks whether KT_EVENTS has taken the revision at all.
SOURCED_EVERY = 0.2
# The header JetStream puts on a sourced message: `<stream> <sequence there> ...`.
SOURCE_HEADER = "Nats-Stream-Source"


async def read(
    nc: Client,
    account: str,
    task_id: str,
    latest: bytes | None = None,
    revision: int | None = None,
) -> list[TaskEvent]:
    """Oldest first, by direct gets of the task's subject (`direct_reads.py`). With `latest`
    (the record as stored now, at `revision` of the task bucket) it goes on waiting, up to
    SOURCING_WAIT, until the trail holds it, so a user never sees a story without its end;
    but not once KT_EVENTS has taken that revision and the trail still lacks it: its oldest
    revisions were dropped (the stream's cap, the account's quota), and waiting would only
    make every read of an old task's trail take SOURCING_WAIT."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SOURCING_WAIT
    kept: deque[TaskEvent] = deque(maxlen=MAX_EVENTS)
    seen = latest is None
    last = 0
    taken = False
    subject = names.event_subject(account, task_id)
    while True:
        batch = await direct_reads.after(nc, names.EVENTS_STREAM, subject, last)
        for msg in batch.messages:
            kept.append(_event(msg.data, msg.time))
            seen = seen or msg.data == latest
            last = msg.sequence
        if batch.pending:
            continue
        if seen or taken:
            break
        if revision is not None and await _taken(nc, revision):
            taken = True  # one more read: whatever of this task's it took before that answer
            continue
        wait = min(deadline - loop.time(), SOURCED_EVERY)
        if wait <= 0:
            break
        await asyncio.sleep(wait)
    return list(kept)


async def _taken(nc: Client, revision: int) -> bool:
    """Whether KT_EVENTS has taken the task bucket's revisions up to `revision`: it takes them
    in order, so its newest message says how far it got."""
    try:
        newest = await nc.jetstream().get_msg(names.EVENTS_STREAM, subject=names.ALL_EVENTS)
    except NotFoundError:
        return False
    source = (newest.headers or {}).get(SOURCE_HEADER, "").split()
    return len(source) > 1 and source[1].isdigit() and int(source[1]) >= revision


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
