"""Mirror a KV bucket into memory, applying every change through a callback: `BucketMirror`
follows each change as it happens (small, rarely written buckets), `LazyMirror` reads the
changes in batches when asked (the busy task bucket)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from .rpc import Requester
from .store import kv_deleted

# A long catch-up commits every this many batches, so a stop keeps most of its progress.
COMMIT_EVERY = 25
# The largest batch asked for while far behind. nats-server counts what is left after a batch
# for every batch direct get, and in a stream of a million keys that count walks its whole
# subject tree (~50 ms, twice if writes arrive meanwhile): at 200 a batch a catch-up ran at
# about 1,000 records a second. A batch of this size costs a few MB of messages at once.
CATCH_UP_BATCH = 5000

# (key, value or None when deleted, revision)
Apply = Callable[[str, bytes | None, int], None]


class BucketMirror:
    def __init__(self, kv: KeyValue, apply: Apply) -> None:
        self.kv = kv
        self._apply = apply
        self._task: asyncio.Task[None] | None = None
        self.last_revision = 0
        self._advanced = asyncio.Event()

    async def start(self) -> None:
        """Return once every value present at start-up has been applied."""
        watcher = await self.kv.watchall()
        loaded: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def run() -> None:
            async for entry in watcher:
                if entry is None:
                    if not loaded.done():
                        loaded.set_result(None)
                    continue
                deleted = entry.operation in (KV_DEL, KV_PURGE)
                self._apply(entry.key, None if deleted else entry.value, entry.revision or 0)
                self.last_revision = max(self.last_revision, entry.revision or 0)
                self._advanced.set()
                self._advanced = asyncio.Event()
                if not loaded.done() and entry.delta == 0:
                    loaded.set_result(None)

        self._task = asyncio.create_task(run(), name=f"mirror-{self.kv._name}")
        self._watcher = watcher
        await loaded

    async def caught_up(self, timeout: float = 5.0) -> None:
        """Wait until every write acknowledged before this call is mirrored (read-your-writes)."""
        info = await self.kv._js.stream_info(self.kv._stream)
        target = info.state.last_seq
        deadline = asyncio.get_running_loop().time() + timeout
        while self.last_revision < target:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._advanced.wait(), remaining)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self._watcher.stop()  # type: ignore[no-untyped-call]
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class LazyMirror:
    """Mirror a busy bucket by reading its stream in batches, not by following every write.

    The bucket keeps one revision per key, so reading on from the last sequence seen returns
    only the latest value of each key written since — one message per task, however many
    phases it went through meanwhile — and one batch direct get returns up to `batch` of them.
    With `applied`, reading starts after that sequence (a persistent index that has it).
    `settle`, when given, is awaited after each batch's changes were handed to `apply` — with
    the sequence reached when they should be made durable (at the end of each catch-up and
    every `COMMIT_EVERY` batches of a long one: a commit costs more than the rows it carries),
    else None — so an owner that applies elsewhere (a thread) is done before the next batch
    and before `caught_up()` returns.
    Readers call `caught_up()` before answering; a background pass every `interval` seconds
    keeps the mirror at most that stale for everyone else (the sweeper). Passes are short and
    frequent, and yield between batches, so catching up never holds the gateway's loop for long.
    """

    def __init__(
        self,
        rpc: Requester,
        bucket: str,
        apply: Apply,
        interval: float = 0.25,
        batch: int = 200,
        applied: int = 0,
        settle: Callable[[int | None], Awaitable[None]] | None = None,
    ) -> None:
        self.rpc = rpc
        self._stream = f"KV_{bucket}"
        self._prefix = f"$KV.{bucket}."
        self._apply = apply
        self.interval = interval
        self.batch = batch
        self.last_revision = applied
        self._settle = settle
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Return once every value present at start-up has been applied."""
        await self.caught_up()
        self._task = asyncio.create_task(self._refresh_forever(), name=f"mirror-{self._stream}")

    async def caught_up(self) -> None:
        """Apply every write acknowledged before this call (read-your-writes)."""
        async with self._lock:
            batches = 0
            size = self.batch
            while True:
                # No subject filter: the bucket's stream holds nothing but its keys, and a
                # filter only gives nats-server subjects to match.
                request: dict[str, object] = {"seq": self.last_revision + 1, "batch": size}
                msgs, more = await self.rpc.batch_get(self._stream, request)
                size = max(self.batch, min(more, CATCH_UP_BATCH))
                for msg in msgs:
                    self._apply_stored(msg.headers or {}, msg.data)
                batches += 1 if msgs else 0
                done = not msgs or more == 0
                if batches and self._settle is not None:
                    durable = done or batches % COMMIT_EVERY == 0
                    await self._settle(self.last_revision if durable else None)
                if done:
                    return
                await asyncio.sleep(0)  # let requests in between batches

    def _apply_stored(self, headers: dict[str, str], data: bytes) -> None:
        revision = int(headers["Nats-Sequence"])
        key = headers["Nats-Subject"][len(self._prefix) :]
        self._apply(key, None if kv_deleted(headers) else data, revision)
        self.last_revision = max(self.last_revision, revision)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            with contextlib.suppress(Exception):  # NATS away for a moment: next pass catches up
                await self.caught_up()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
