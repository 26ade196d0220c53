"""Mirror a KV bucket into memory, applying every change through a callback: `BucketMirror`
follows each change as it happens (small, rarely written buckets), `LazyMirror` reads the
changes in batches when asked (the busy task bucket)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import NamedTuple, cast

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import Header
from nats.js.kv import KeyValue

from .cancellation import cancel_and_wait
from .jetstream import Connection
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
# How often nats-server tells a following mirror that nothing changed; two missed mean its
# consumer is gone.
HEARTBEAT = 5.0
LAST_CONSUMER = Header.LAST_CONSUMER.value

log = logging.getLogger("kubetask.watch")

# (key, value or None when deleted, revision)
Apply = Callable[[str, bytes | None, int], None]


class BucketMirror:
    """Follow a small bucket's every change through an ordered push consumer of its own.

    nats-py's watcher keeps a task per watch that looks for a flow-control answer to send four
    times a second, forever: with three buckets in a gateway and four in a dispatcher, most of
    what an idle component cost (bench/idle.py). Here messages are applied in the connection's
    read loop (`subscribe_direct`), so when a flow-control request arrives everything before it
    has been applied, and it is answered at once. A gap in the consumer's sequence, a heartbeat
    that says messages were missed, or heartbeats that stop (nats-server restarted, the
    consumer lost) start a new consumer after the last revision applied."""

    def __init__(self, kv: KeyValue, apply: Apply, heartbeat: float = HEARTBEAT) -> None:
        self.kv = kv
        self._apply = apply
        self.heartbeat = heartbeat
        self.last_revision = 0
        self._advanced = asyncio.Event()
        self._inbox: Subscription | None = None
        self._deliver = ""
        self._consumer = ""
        self._delivered = 0  # the consumer's sequence of the last message applied
        self._heard = 0.0  # loop time of the last message or heartbeat
        self._loaded: asyncio.Future[None] | None = None
        self._restart = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._answers: set[asyncio.Task[None]] = set()

    @property
    def _nc(self) -> Connection:
        return cast(Connection, self.kv._js._nc)  # every component connects through one

    @property
    def _stream(self) -> str:
        return str(self.kv._stream)

    @property
    def _prefix(self) -> str:
        return str(self.kv._pre)

    async def start(self) -> None:
        """Return once every value present at start-up has been applied."""
        loop = asyncio.get_running_loop()
        self._loaded = loop.create_future()
        self._deliver = self._nc.new_inbox()
        self._inbox = await self._nc.subscribe_direct(self._deliver, self._on_message)
        await self._follow()
        self._nc.on_reconnect.add(self._restart.set)  # nats-server may have lost the consumer
        self._task = asyncio.create_task(self._keep_following(), name=f"mirror-{self._stream}")
        await self._loaded

    async def _follow(self) -> None:
        """A new consumer: every key's latest value at first, then what came after the last
        revision applied."""
        old, self._consumer = self._consumer, f"kt_watch_{secrets.token_hex(8)}"
        self._delivered = 0
        self._heard = asyncio.get_running_loop().time()
        config: dict[str, object] = {
            "name": self._consumer,
            "deliver_subject": self._deliver,
            "filter_subject": f"{self._prefix}>",
            "ack_policy": "none",
            "flow_control": True,
            "idle_heartbeat": int(self.heartbeat * 1e9),
            "mem_storage": True,
            "num_replicas": 1,
            "inactive_threshold": int(CONSUMER_IDLE * 1e9),
        }
        if self.last_revision:
            config.update(deliver_policy="by_start_sequence", opt_start_seq=self.last_revision + 1)
        else:
            config["deliver_policy"] = "last_per_subject"
        created = await self._nc.request(
            f"$JS.API.CONSUMER.CREATE.{self._stream}.{self._consumer}",
            json.dumps({"stream_name": self._stream, "config": config}).encode(),
            timeout=10,
        )
        info = json.loads(created.data)
        if "error" in info:
            raise RuntimeError(f"watching {self._stream}: {info['error']}")
        if info.get("num_pending", 0) == 0:
            self._mark_loaded()
        if old:
            await self._delete(old)

    def _on_message(self, msg: Msg) -> None:
        headers = msg.headers or {}
        if STATUS in headers:
            self._heard = asyncio.get_running_loop().time()
            if msg.reply:  # a flow-control request: everything before it is applied
                answer = asyncio.create_task(self._nc.publish(msg.reply, b""))
                self._answers.add(answer)
                answer.add_done_callback(self._answers.discard)
            elif headers.get(LAST_CONSUMER, str(self._delivered)) != str(self._delivered):
                self._restart.set()  # a heartbeat of a consumer that sent more than we saw
            return
        consumer, stream_seq, consumer_seq, pending = delivery(msg.reply)
        if consumer != self._consumer:
            return  # a consumer given up on delivered it
        if consumer_seq != self._delivered + 1:
            self._restart.set()  # one was lost on the way: read on anew from the last applied
            return
        self._delivered = consumer_seq
        self._heard = asyncio.get_running_loop().time()
        if stream_seq > self.last_revision:
            value = None if kv_deleted(headers) else msg.data
            self._apply(msg.subject[len(self._prefix) :], value, stream_seq)
            self.last_revision = stream_seq
            self._advanced.set()
            self._advanced = asyncio.Event()
        if pending == 0:
            self._mark_loaded()

    def _mark_loaded(self) -> None:
        if self._loaded is not None and not self._loaded.done():
            self._loaded.set_result(None)

    async def _keep_following(self) -> None:
        """A new consumer when messages were lost, or when nothing, not even a heartbeat, came
        for two heartbeats' time."""
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._restart.wait(), 2 * self.heartbeat)
            if not self._restart.is_set() and loop.time() - self._heard < 2 * self.heartbeat:
                continue
            self._restart.clear()
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # NATS away: try again after the next wait
                log.warning("following %s again failed: %s", self._stream, err)
                self._restart.set()
                await asyncio.sleep(1)

    async def caught_up(self, timeout: float = 5.0) -> None:
        """Wait until every write acknowledged before this call is mirrored (read-your-writes)."""
        info = await self.kv._js.stream_info(self._stream)
        target = info.state.last_seq
        deadline = asyncio.get_running_loop().time() + timeout
        while self.last_revision < target:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._advanced.wait(), remaining)

    async def stop(self) -> None:
        self._nc.on_reconnect.discard(self._restart.set)
        await cancel_and_wait(self._task)
        if self._inbox is not None:
            with contextlib.suppress(Exception):
                await self._nc.unsubscribe_direct(self._inbox)
        if self._consumer:
            await self._delete(self._consumer)

    async def _delete(self, consumer: str) -> None:
        """Best effort: one left behind goes away after CONSUMER_IDLE."""
        with contextlib.suppress(Exception):
            await self._nc.request(
                f"$JS.API.CONSUMER.DELETE.{self._stream}.{consumer}", b"", timeout=2
            )


class Delivery(NamedTuple):
    consumer: str
    stream_seq: int
    consumer_seq: int
    pending: int


def delivery(reply: str) -> Delivery:
    """What a consumer's message says of itself in its ack subject:
    `$JS.ACK.<stream>.<consumer>.<delivered>.<seq>.<cseq>.<time>.<pending>`, or with a domain
    and an account hash after `ACK` (and maybe a token at the end). Cheaper than nats-py's
    `Msg.metadata`, which builds three objects per message."""
    tokens = reply.split(".")
    at = 3 if len(tokens) == 9 else 5
    return Delivery(tokens[at], int(tokens[at + 2]), int(tokens[at + 3]), int(tokens[at + 5]))


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
        pending = delivery(msgs[-1].reply).pending if msgs else 0
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
        revision = delivery(msg.reply).stream_seq
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
