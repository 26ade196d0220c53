"""Keeping the gateway's task index current, without making the gateway wait for it.

The gateway listens at once. The index resumes from the stream sequence it stored (everything
when it has none) in the background; until it has caught up, `/healthz` answers 503 with the
progress, so a supervisor or a load balancer sends queries elsewhere, while submissions and
reads by id — which never touch the index — are served. A query that arrives anyway waits for
the index to catch up (read-your-writes), as it always has.

Every SQLite call runs on one thread of its own (`run`), never on the gateway's event loop: a
busy account's records arrive thousands a second, and applying and committing them on the
loop delayed every request in the gateway, a neighbour's submission included (bench/noisy.py,
same code: with the index on disk instead of in memory the flooding account's 20,000 took
16.6 s instead of 11.6 and its neighbour's submit->start p99 was 32 ms instead of 20; on this
thread, 14.6 s and 17 ms). One thread, in order, also keeps read-your-writes: a query queued
after a batch sees it. SQLite leaves Python's lock while it works, so the loop runs meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from .. import names
from ..cancellation import cancel_and_wait
from ..plane import DataPlane
from ..watch import LazyMirror
from .index import TaskIndex, wal_bytes
from .query_turns import QueryTurns

STREAM = f"KV_{names.TASKS_BUCKET}"
log = logging.getLogger("kubetask.gateway")
# The background pass (lists, counts and deletes catch up on demand anyway). A task written
# several times within it is read once (the bucket keeps one revision per key), so a longer
# pass reads less: at one a second, a busy account's task is read about once instead of 3-4.
PASS_EVERY = 1.0
# Records read per fetch once caught up. The reads share the gateway's NATS connection with
# its submissions, whose acknowledgements queue behind whatever a fetch delivers: 5,000 at a
# time put a light account's submit->start p99 at 12-17 ms under a neighbour's flood, 500 at
# 9 ms (bench/noisy.py; a connection of the mirror's own measured no better).
FETCH = 500
# How often each account's records are counted again: one small query over the accounts.
USAGE_EVERY = 1.0
P = ParamSpec("P")
T = TypeVar("T")


class Indexer:
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="task-index")
        self._index: TaskIndex | None = None
        self._changes: list[tuple[str, bytes | None, int]] = []
        self.mirror: LazyMirror | None = None
        self.target = 0
        self._loading: asyncio.Task[None] | None = None
        self.turns = QueryTurns()
        self.poison_found = asyncio.Event()  # a record the index could not read awaits quarantine
        # Each account's records and bytes as stored, read every USAGE_EVERY once loaded
        # (`record_quota.py`).
        self.usage: dict[str, tuple[int, int]] = {}
        self._counting: asyncio.Task[None] | None = None

    @property
    def index(self) -> TaskIndex:
        """Call its SQLite methods only through `run`."""
        assert self._index is not None, "the index is opened by start()"
        return self._index

    async def run(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`call` on the index's thread, after everything handed to it before."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, lambda: call(*args, **kwargs))

    async def query(
        self, account: str | None, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """`run` for a request's query, when it is `account`'s turn (`query_turns.py`; None:
        an admin's query over every account)."""
        async with self.turns.turn(account or ""):
            return await self.run(call, *args, **kwargs)

    async def start(self) -> None:
        info = await self.plane.js.stream_info(STREAM)
        self.target = info.state.last_seq
        settings = self.plane.settings
        wal = wal_bytes(settings.store_max_bytes)
        self._index = await self.run(TaskIndex, settings.index_path or None, wal)
        applied = await self.run(self.index.resume, str(info.created), self.target)
        self.mirror = LazyMirror(
            self.plane.rpc,
            names.TASKS_BUCKET,
            lambda key, value, revision: self._changes.append((key, value, revision)),
            applied=applied,
            settle=self._settle,
            interval=PASS_EVERY,
            batch=FETCH,
        )
        log.info(
            "task index resumed at sequence %d of %d (%s)",
            applied,
            self.target,
            self.plane.settings.index_path or "in memory",
        )
        self._loading = asyncio.create_task(self._load(self.mirror, applied), name="index-load")
        self._counting = asyncio.create_task(self._count_forever(), name="index-usage")

    async def _load(self, mirror: LazyMirror, applied: int) -> None:
        began = time.monotonic()
        while True:  # NATS away for a moment must not leave the gateway without an index
            try:
                await mirror.start()
                break
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("indexing task records failed (%s); going on in a second", err)
                await asyncio.sleep(1)
        log.info(
            "task index caught up: sequences %d to %d read in %.1f s",
            applied + 1,
            mirror.last_revision,
            time.monotonic() - began,
        )

    async def _count_forever(self) -> None:
        assert self._loading is not None
        await asyncio.shield(self._loading)
        while True:
            try:
                self.usage = await self.run(self.index.usage)
            except sqlite3.Error as err:  # stale for a second rather than for good
                log.warning("counting each account's records failed: %s", err)
            await asyncio.sleep(USAGE_EVERY)

    async def _settle(self, commit_at: int | None) -> None:
        changes, self._changes = self._changes, []
        await self.run(self._apply, changes, commit_at)
        if self.index.poisoned:
            self.poison_found.set()

    def _apply(self, changes: list[tuple[str, bytes | None, int]], commit_at: int | None) -> None:
        for key, value, revision in changes:
            self.index.apply(key, value, revision)
        if commit_at is not None:
            self.index.commit(commit_at)

    @property
    def loaded(self) -> bool:
        return self._loading is not None and self._loading.done()

    def progress(self) -> str:
        done = self.mirror.last_revision if self.mirror is not None else 0
        return f"indexing task records: at sequence {done} of {self.target}"

    async def caught_up(self) -> None:
        """Every write acknowledged before this call is in the index."""
        assert self.mirror is not None and self._loading is not None
        await asyncio.shield(self._loading)
        await self.mirror.caught_up()

    async def stop(self) -> None:
        await cancel_and_wait(self._counting, self._loading)
        if self.mirror is not None:
            await self.mirror.stop()
        if self._index is not None:
            await self.run(self._index.close)
        self._thread.shutdown(wait=False)
