"""Mirror a KV bucket into memory, applying every change through a callback: `BucketMirror`
follows each change as it happens (small, rarely written buckets), `LazyMirror` reads the
changes in batches when asked (the busy task bucket)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from .cancellation import cancel_and_wait
from .rpc import STATUS, Requester
from .store import kv_deleted

# A long catch-up commits every this many batches, so a stop keeps most of its progress.
COMMIT_EVERY = 25
# The largest batch asked for while far behind: a few MB of messages at once.
CATCH_UP_BATCH = 5000
# How long a fetch waits for a message when the mirror's consumer has seen none yet (its count
# of what is pending is updated a moment after a write is acknowledged); also what one costs
# when every message up to the stream's end was deleted before it could be read.
FETCH_EXPIRES = 1.0
# Applied between two turns of the event loop while a fetch's messages are handed over.
APPLY_CHUNK = 256
# An abandoned mirror's consumer (its gateway killed) goes away after this long unused.
CONSUMER_IDLE = 300.0

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
        await cancel_and_wait(self._task)


def ack_subject(reply: str) -> tuple[int, int]:
    """(stream sequence, messages pending) of a message a consumer delivered, from its ack
    subject: `$JS.ACK.<stream>.<consumer>.<delivered>.<seq>.<cseq>.<time>.<pending>`, or with a
    domain and an account hash after `ACK` (and maybe a token at the end). Cheaper than
    nats-py's `Msg.metadata`, which builds three objects per message."""
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[8])
    return int(tokens[7]), int(tokens[10])


class ConsumerLost(Exception):
    """The mirror's consumer is gone (nats-server restarted, or it was idle too long)."""


class LazyMirror:
    """Mirror a busy bucket by reading its stream in batches, not by following every write.

    The bucket keeps one revision per key, so reading on from the last sequence seen returns
    only the latest value of each key written since — one message per task, however many
    phases it went through meanwhile. The reads go through a consumer of the mirror's own
    (ephemeral, no acks, in memory), fetched `batch` messages at a time. Not batch direct
    gets: nats-server holds the stream's write lock out for the whole of one (it isolates the
    read from writes), so every record write of every account waited behind each catch-up of
    thousands of records — the tail of a light account's submissions under a neighbour's
    flood (bench/noisy.py: B's record write p99 28 ms, max 75) — and each one also counted
    what was left, a walk of the subject tree at a million keys. A consumer reads message by
    message and keeps its count as the stream changes.
    With `applied`, reading starts after that sequence (a persistent index that has it).
    `settle`, when given, is awaited after each batch's changes were handed to `apply` — with
    the sequence reached when they should be made durable (at the end of each catch-up and
    every `COMMIT_EVERY` batches of a long one: a commit costs more than the rows it carries),
    else None — so an owner that applies elsewhere (a thread) is done before the next batch
    and before `caught_up()` returns.
    Readers call `caught_up()` before answering; a background pass every `interval` seconds
    keeps the mirror at most that stale for everyone else (the sweeper). Passes yield between
    batches, so catching up never holds the gateway's loop for long.
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
        self._consumer: str | None = None
        self._inbox: Subscription | None = None
        self._replies = ""
        self._reply = ""  # this fetch's: a late answer to an earlier one must not end it
        self._fetches = 0
        self._delivered: list[Msg] = []
        self._ended: asyncio.Event = asyncio.Event()
        self._wanted = 0
        self._status: str | None = None

    async def start(self) -> None:
        """Return once every value present at start-up has been applied."""
        await self.caught_up()
        self._task = asyncio.create_task(self._refresh_forever(), name=f"mirror-{self._stream}")

    async def caught_up(self) -> None:
        """Apply every write acknowledged before this call (read-your-writes)."""
        async with self._lock:
            info = await self.rpc.api(f"$JS.API.STREAM.INFO.{self._stream}")
            target = int(info["state"]["last_seq"])
            batches = 0
            size = self.batch
            lost = 0
            while self.last_revision < target:
                try:
                    msgs, pending, at_end = await self._fetch(size)
                except ConsumerLost:
                    lost += 1
                    if lost > 2:
                        raise
                    continue  # a new consumer reads on from the last sequence applied
                size = CATCH_UP_BATCH if pending >= CATCH_UP_BATCH else self.batch
                for i, msg in enumerate(msgs, 1):
                    self._apply_stored(msg)
                    if i % APPLY_CHUNK == 0:
                        await asyncio.sleep(0)  # thousands at once would hold the loop
                if at_end:  # the consumer read to the stream's end: the rest was deleted
                    self.last_revision = max(self.last_revision, target)
                batches += 1
                done = self.last_revision >= target
                if self._settle is not None:
                    durable = done or batches % COMMIT_EVERY == 0
                    await self._settle(self.last_revision if durable else None)
                if not done:
                    await asyncio.sleep(0)  # let requests in between batches

    async def _fetch(self, size: int) -> tuple[list[Msg], int, bool]:
        """The next messages of the mirror's consumer, how many are pending after them, and
        whether it ran out of messages (rather than reaching `size`)."""
        consumer = self._consumer or await self._create_consumer()
        self._fetches += 1
        self._reply = f"{self._replies}.{self._fetches}"
        self._wanted, self._status = size, None
        self._ended.clear()
        request = {"batch": size, "no_wait": True, "expires": int(FETCH_EXPIRES * 1e9)}
        await self.rpc.nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{self._stream}.{consumer}",
            json.dumps(request).encode(),
            reply=self._reply,
        )
        try:
            await asyncio.wait_for(self._ended.wait(), FETCH_EXPIRES + self.rpc.timeout)
        except TimeoutError:
            self._consumer = None  # not answering: a fresh one next time
            raise
        msgs, self._delivered = self._delivered, []
        status = self._status
        if status is not None and status not in ("404", "408"):  # 404 ran out, 408 found none
            self._consumer = None  # gone (503: nobody answers), deleted (409): read on anew
            raise ConsumerLost(status)
        pending = ack_subject(msgs[-1].reply)[1] if msgs else 0
        return msgs, pending, status is not None

    def _on_message(self, msg: Msg) -> None:
        """Messages come in order whichever fetch asked for them; a status ends only its own
        (it comes on that fetch's reply subject, messages on their own subjects)."""
        if msg.headers and STATUS in msg.headers:
            if msg.subject == self._reply:
                self._status = msg.headers[STATUS]
                self._ended.set()
            return
        self._delivered.append(msg)
        if len(self._delivered) >= self._wanted:
            self._ended.set()

    async def _create_consumer(self) -> str:
        if self._inbox is None:
            self._replies = self.rpc.nc.new_inbox()
            self._inbox = await self.rpc.nc.subscribe_direct(f"{self._replies}.*", self._on_message)
        name = f"kt_mirror_{secrets.token_hex(8)}"
        config = {
            "name": name,
            "deliver_policy": "by_start_sequence",
            "opt_start_seq": self.last_revision + 1,
            "ack_policy": "none",
            "mem_storage": True,
            "num_replicas": 1,
            "inactive_threshold": int(CONSUMER_IDLE * 1e9),
        }
        await self.rpc.api(
            f"$JS.API.CONSUMER.CREATE.{self._stream}.{name}",
            json.dumps({"stream_name": self._stream, "config": config}).encode(),
        )
        self._consumer = name
        return name

    def _apply_stored(self, msg: Msg) -> None:
        revision = ack_subject(msg.reply)[0]
        if revision <= self.last_revision:
            return  # delivered again after a new consumer started where the last one was
        value = None if kv_deleted(msg.headers or {}) else msg.data
        self._apply(msg.subject[len(self._prefix) :], value, revision)
        self.last_revision = revision

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            with contextlib.suppress(Exception):  # NATS away for a moment: next pass catches up
                await self.caught_up()

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        async with self._lock:
            if self._consumer is not None:
                with contextlib.suppress(Exception):
                    await self.rpc.api(f"$JS.API.CONSUMER.DELETE.{self._stream}.{self._consumer}")
                self._consumer = None
            if self._inbox is not None:
                with contextlib.suppress(Exception):
                    await self.rpc.nc.unsubscribe_direct(self._inbox)
                self._inbox = None
