"""An attempt that ends while NATS is away keeps its outcome until NATS is back.

Why: an attempt's outcome is recorded with compare-and-set writes to the task's record, and
while nats-server restarts a write fails at once ("connection reconnecting"). The dispatcher
used to hand the message back then: the finished attempt was thrown away, the next delivery
found the task Running, took it over as lost, and the function ran again. Seen: eight
one-second tasks each ran twice when nats-server was killed as they ended, and under
`bench/chaos.py` a task whose attempts had been lost to killed dispatchers was failed
("attempt 4 lost") while its last attempt ran. Now the outcome is tried again every `PAUSE`
for up to `patience` (half of `ack_wait`, so the message has not been redelivered meanwhile),
each time on the record as stored, and only while that still shows this attempt's claim: a
stop asked meanwhile still wins, and a task another delivery claimed since is left to it,
message and all. Past the patience the message is handed back as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from enum import Enum

from .. import jetstream
from ..models import TaskPhase
from ..store import TaskRecord

PAUSE = 0.1


class Claim(Enum):
    OURS = "the record still shows this attempt's claim (a stop may have been asked)"
    WRITTEN = "this attempt's outcome was written before the answer was lost"
    TAKEN = "another delivery claimed the task since: its message, not ours to hand back"


def claim_of(record: TaskRecord, seq: int, attempt: int) -> Claim:
    """Whose the task is now. Only OURS and WRITTEN may touch the message: a hand-back of a
    message another dispatcher now runs would have it delivered again mid-attempt."""
    if record.claimSeq != seq or record.task.status.attempts != attempt:
        return Claim.TAKEN
    if record.phase in (TaskPhase.Running, TaskPhase.Stopping):
        return Claim.OURS
    return Claim.WRITTEN


async def keep_trying(step: Callable[[], Awaitable[None]], patience: float) -> None:
    """Run `step` again while NATS is unavailable, for `patience` seconds; then let the last
    failure through."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while True:
        await asyncio.sleep(PAUSE)
        try:
            await step()
            return
        except jetstream.UNAVAILABLE:
            if loop.time() >= deadline:
                raise
