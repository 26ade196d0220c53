"""Room kept in JetStream's storage for the tasks already accepted: past `FULL` of
`KUBETASK_STORE_MAX_BYTES`, submissions are refused with `507`.

At JetStream's limit every write fails ("insufficient resources"): a running task's next
record, its result, the delete that would free room, the history streams' own lines. On a disk
that filled first, each write waited out its timeout instead (seen: a submission answered 503
after 10 s, "retry in 1s", which would not mend it). Refusing new tasks a little before, those
accepted can still finish and be deleted. Records leave when their tasks are deleted or expire.

JetStream says how much it stores (`account_info`), read every `EVERY` seconds; the records
this gateway created since are added, so a flood of large payloads between two reads does not
go through the room kept. Where the limit is not known (0), nothing is refused here.
"""

from __future__ import annotations

import asyncio
import contextlib

from nats.js import JetStreamContext

from .. import jetstream
from ..sizes import in_binary_units

FULL = 0.9
EVERY = 1.0
# Room comes back when tasks are deleted or expire, neither of which a retry brings sooner.
RETRY_AFTER = 60


class StoreFull(Exception):
    pass


class StoreRoom:
    def __init__(self, js: JetStreamContext, limit: int) -> None:
        self.js = js
        self.limit = limit
        self.used = 0

    async def run(self) -> None:
        while self.limit:
            with contextlib.suppress(*jetstream.UNAVAILABLE):
                self.used = (await self.js.account_info()).storage
            await asyncio.sleep(EVERY)

    def created(self, nbytes: int) -> None:
        self.used += nbytes

    def admit(self) -> None:
        if self.limit and self.used >= self.limit * FULL:
            raise StoreFull(
                f"the platform's storage is nearly full ({in_binary_units(self.used)} of"
                f" {in_binary_units(self.limit)}, KUBETASK_STORE_MAX_BYTES): no task is accepted"
                " until tasks are deleted or expire; the tasks accepted go on"
            )
