"""Room kept in JetStream's storage for the tasks already accepted: past `FULL` of
`KUBETASK_STORE_MAX_BYTES`, submissions are refused with `507`.

At JetStream's limit every write fails ("insufficient resources"): a running task's next
record, its result, the delete that would free room, the history streams' own lines. On a disk
that filled first, each write waited out its timeout instead (seen: a submission answered 503
after 10 s, "retry in 1s", which would not mend it). Refusing new tasks a little before, those
accepted can still finish and be deleted. Records leave when their tasks are deleted or expire.

JetStream says how much it stores (`account_info`), read every `EVERY` seconds, and at start
before anything is admitted; the record bytes this process wrote since are added
(`TaskStore.written`), so a flood of large payloads, or of large results in a dispatcher,
between two reads does not go through the room kept. The history streams are counted as full
(`KUBETASK_LOGS_MAX_BYTES`, `KUBETASK_EVENTS_MAX_BYTES`): they grow to their caps after
submissions stop, as tasks run and print, and counted as they were, they took the store from
90% to past 95% with only waiting tasks in it (seen on a 64 MiB disk), so that nothing could
start (`dispatch/store_hold.py`) and nothing had ended to be deleted. Where the limit is not
known (0), nothing is refused here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from nats.js.errors import NotFoundError

from .. import jetstream, names
from ..plane import DataPlane
from ..sizes import in_binary_units

FULL = 0.9
EVERY = 1.0
# Room comes back when tasks are deleted or expire, neither of which a retry brings sooner.
RETRY_AFTER = 60


class StoreFull(Exception):
    pass


class StoreRoom:
    def __init__(self, plane: DataPlane, on_read: Callable[[], None] | None = None) -> None:
        """`on_read`: called after each read of JetStream's count."""
        self.js = plane.js
        self.store = plane.store
        settings = plane.settings
        self.limit = settings.store_max_bytes
        self._history = {
            names.LOGS_STREAM: settings.logs_max_bytes,
            names.EVENTS_STREAM: settings.events_max_bytes,
        }
        self._on_read = on_read
        self._stored = 0  # JetStream's count, as last read, with history at its caps
        self._written_then = 0  # `store.written` when it was read

    @property
    def used(self) -> int:
        return self._stored + self.store.written - self._written_then

    def past(self, share: float) -> bool:
        """Whether what is stored has reached `share` of the limit (never, with no limit)."""
        return bool(self.limit) and self.used >= self.limit * share

    async def read(self) -> None:
        if not self.limit:
            return
        with contextlib.suppress(*jetstream.UNAVAILABLE):
            written = self.store.written
            stored = (await self.js.account_info()).storage
            for stream, cap in self._history.items():
                try:
                    held = (await self.js.stream_info(stream)).state.bytes
                except NotFoundError:
                    held = 0  # not made yet: it will be, and fill to its cap
                stored += cap - held
            self._stored, self._written_then = stored, written
            if self._on_read is not None:
                self._on_read()

    async def run(self) -> None:
        """Read on, every `EVERY` seconds (`read` once first)."""
        while self.limit:
            await asyncio.sleep(EVERY)
            await self.read()

    def admit(self) -> None:
        if self.past(FULL):
            raise StoreFull(
                f"the platform's storage is nearly full ({in_binary_units(self.used)} of"
                f" {in_binary_units(self.limit)}, KUBETASK_STORE_MAX_BYTES): no task is accepted"
                " until tasks are deleted or expire; the tasks accepted go on"
            )
