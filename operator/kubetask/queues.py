"""Task queues on JetStream: a stream per account (or per function, or per partition of a
function), a subject and a durable pull consumer per function and partition (`names.Queue`).

The consumer's `max_ack_pending` is the function's max concurrency, so the limit holds across any
number of dispatchers without them talking to each other. Messages carry only the task id and
dispatch token; the record in KV is the truth. Retries are scheduled messages (`Nats-Schedule`),
so a task waiting out its backoff holds no concurrency slot.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import pydantic_core
from nats.js import JetStreamContext
from nats.js import errors as js_errors
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

from . import grammar, names
from .jetstream import NO_ROOM, ensure_stream
from .models import TaskFunction
from .rpc import Requester
from .settings import Settings

# JetStream's error code for a consumer that does not exist (its stream's is 10059).
CONSUMER_NOT_FOUND = 10014


class QueueFull(Exception):
    pass


class TooManyFunctions(Exception):
    """The queue a function would share already serves as many functions as it may."""


class QueueUnavailable(Exception):
    """The queue did not take the message (gone, or JetStream did not answer in time)."""


# A record up to this size travels with its task's first message (see `QueuedRef.record`).
CARRY_LIMIT = 16 * 1024


@dataclass(frozen=True)
class QueuedRef:
    """What a queue message says: the task, the dispatch token it carries and, on a task's first
    message, the record as created (`record`, stored at `revision`), so the dispatcher can claim
    it without reading it first. Encoded as a JSON line, then the record's stored JSON."""

    account: str
    task_id: str
    token: str
    revision: int | None = None
    record: bytes | None = None

    def encode(self) -> bytes:
        ref = pydantic_core.to_json({"a": self.account, "id": self.task_id, "t": self.token})
        if self.record is None or self.revision is None or len(self.record) > CARRY_LIMIT:
            return ref
        return b"%s\n%d\n%s" % (ref, self.revision, self.record)

    @classmethod
    def decode(cls, data: bytes) -> QueuedRef:
        """Raises ValueError for anything a gateway could not have written: a message whose
        names are outside the grammar would otherwise become a subject or a key."""
        ref, _, carried = data.partition(b"\n")
        raw = pydantic_core.from_json(ref)
        account, task_id, token = raw["a"], raw["id"], raw["t"]
        if not (grammar.is_name(account) and grammar.is_task_id(task_id)):
            raise ValueError("account or task id outside the grammar")
        if not isinstance(token, str):
            raise ValueError("dispatch token is not a string")
        if not carried:
            return cls(account, task_id, token)
        revision, _, record = carried.partition(b"\n")
        return cls(account, task_id, token, int(revision), record)

    @property
    def msg_id(self) -> str:
        return f"{self.account}.{self.task_id}.{self.token}"


def stream_config(queue: names.Queue, settings: Settings) -> StreamConfig:
    return StreamConfig(
        name=queue.stream,
        subjects=list(queue.stream_subjects),
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        # JetStream refuses `discard: new` together with message schedules, and `discard: old`
        # with a limit would silently drop accepted tasks; so the stream has no count limit and
        # the gateway refuses new tasks past `queue_max_msgs` (see `QueueDepth`).
        discard=DiscardPolicy.OLD,
        allow_msg_schedules=True,
        duplicate_window=settings.dedup_window,
        max_consumers=settings.queue_max_functions,
    )


def consumer_config(fn: TaskFunction, queue: names.Queue, settings: Settings) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=queue.consumer,
        filter_subject=queue.subject,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait,
        # The function's concurrency, shared out among its partitions.
        max_ack_pending=max(1, fn.spec.maxConcurrency // fn.spec.partitions),
        max_deliver=-1,
        max_waiting=512,
        inactive_threshold=idle_threshold(queue, settings),
    )


def idle_threshold(queue: names.Queue, settings: Settings) -> float | None:
    """How long nats-server keeps the consumer once nothing uses it (`consumer_idle`): ten
    thousand idle durable consumers cost nats-server about 2% of a core doing nothing, their
    timers alone (bench/README.md, "Idle functions"), so an idle function keeps none. The
    small accounts' stream keeps its consumers: how many it holds is how full it is."""
    if settings.consumer_idle <= 0 or queue.stream == names.SHARED_STREAM:
        return None
    return settings.consumer_idle


async def revive_consumer(
    js: JetStreamContext, fn: TaskFunction, queue: names.Queue, settings: Settings
) -> None:
    """Create the consumer nats-server removed while the function was idle, as registering
    the function made it. Everything it held stays in the stream (a work queue keeps a message
    until it is acknowledged), so the new one delivers the same tasks."""
    await js.add_consumer(queue.stream, consumer_config(fn, queue, settings))


async def ensure_function_queue(js: JetStreamContext, fn: TaskFunction, settings: Settings) -> str:
    """Create or update the streams and consumers a function needs; returns its queue label."""
    for queue in names.queues_of(fn):
        await ensure_stream(js, stream_config(queue, settings), settings)
        try:
            await js.add_consumer(queue.stream, consumer_config(fn, queue, settings))
        except BadRequestError as err:
            if err.err_code == 10026:  # maximum consumers limit reached
                raise too_many_functions(queue, settings) from None
            raise
    return names.queue_label(fn)


def too_many_functions(queue: names.Queue, settings: Settings) -> TooManyFunctions:
    return TooManyFunctions(
        f"queue {queue.stream} already serves {settings.queue_max_functions} "
        "functions (KUBETASK_QUEUE_MAX_FUNCTIONS); give this one a queue of its "
        "own (queueMode: dedicated) or delete one"
    )


async def remove_queue(js: JetStreamContext, queue: names.Queue) -> None:
    """Drop the consumer; a stream of the function's own goes too, a shared one stays."""
    with contextlib.suppress(NotFoundError):
        await js.delete_consumer(queue.stream, queue.consumer)
    if not queue.shared:
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(queue.stream)


async def remove_function_queue(js: JetStreamContext, fn: TaskFunction) -> None:
    for queue in names.queues_of(fn):
        await remove_queue(js, queue)


# How long an unread queue's depth and drain rate are kept (a read costs one API call).
FORGET_AFTER = 600.0


class QueueDepth:
    """Admission control: how many messages a stream holds, re-read at most every `ttl` seconds
    and counted up locally in between, so checking costs nothing on the hot path. In the stream
    small accounts share, each account's part is counted on its own (its subjects), so one
    account's backlog throttles that account only."""

    def __init__(
        self, rpc: Requester, limit: int, ttl: float = 0.5, forget_after: float = FORGET_AFTER
    ) -> None:
        self.rpc = rpc
        self.limit = limit
        self.ttl = ttl
        self._known: dict[str, tuple[float, int]] = {}
        # Tasks leaving each queue per second (an average over recent reads): what a throttled
        # client is told to wait for.
        self.drain: dict[str, float] = {}
        # Queues not submitted to for `forget_after` are forgotten, looked for once in a while:
        # a queue of its own comes and goes with its function, and a tenant registering,
        # submitting to and deleting functions in a loop grew every gateway by one entry each.
        self.forget_after = forget_after
        self._forgot = time.monotonic()

    def known(self, fn: TaskFunction) -> tuple[str, int, float]:
        """(queue, tasks waiting as last read and counted since, drain rate), from memory; a
        partitioned function's queue is all its partitions together."""
        label, key = _depth_key(fn)
        return label, self._known.get(key, (0.0, 0))[1], self.drain.get(key, 0.0)

    async def refresh(self, fn: TaskFunction) -> tuple[str, float, int]:
        """Re-read the queue's depth if the last read is older than `ttl`; returns (queue,
        when read, depth). Whoever refuses a submission must still call this, or a queue that
        drained would look full for ever."""
        label, key = _depth_key(fn)
        now = time.monotonic()
        read_at, depth = self._known.get(key, (0.0, 0))
        if now - read_at > self.ttl:
            stored = 0
            for queue in names.queues_of(fn):
                stored += await self._stored(queue, fn.account)
            if read_at:  # what was there plus what came in, less what is there now, left
                left = max(0, depth - stored) / (now - read_at)
                self.drain[key] = 0.5 * self.drain.get(key, left) + 0.5 * left
            read_at, depth = now, stored
            self._known[key] = (read_at, depth)
        if now - self._forgot > self.forget_after / 10:
            self._forget(now)
        return label, read_at, depth

    def _forget(self, now: float) -> None:
        self._forgot = now
        for key in [
            k for k, (read_at, _) in self._known.items() if read_at < now - self.forget_after
        ]:
            del self._known[key]
            self.drain.pop(key, None)

    async def _stored(self, queue: names.Queue, account: str) -> int:
        request = b""
        if queue.stream == names.SHARED_STREAM:
            request = pydantic_core.to_json({"subjects_filter": names.shared_subjects(account)})
        try:
            info = await self.rpc.api(f"$JS.API.STREAM.INFO.{queue.stream}", request)
        except Exception as err:
            raise QueueUnavailable(str(err) or type(err).__name__) from err
        if request:
            return sum((info["state"].get("subjects") or {}).values())
        return int(info["state"]["messages"])

    async def admit(self, fn: TaskFunction) -> None:
        _, read_at, depth = await self.refresh(fn)
        if depth >= self.limit:
            raise QueueFull(f"{depth} tasks waiting, the limit is {self.limit}")
        self._known[_depth_key(fn)[1]] = (read_at, depth + 1)


def _depth_key(fn: TaskFunction) -> tuple[str, str]:
    """(the function's queue as people read it, what its depth is kept under)."""
    label = names.queue_label(fn)
    return label, f"{label}/{fn.account}" if label == names.SHARED_STREAM else label


def _publish_error(err: Exception) -> Exception:
    if isinstance(err, js_errors.APIError) and err.err_code in NO_ROOM:
        return err  # JetStream's storage is full, not the queue: a 507 (`gateway/errors.py`)
    text = str(err).lower()
    if "maximum" in text or "resource" in text or "storage" in text:
        return QueueFull(str(err))
    return QueueUnavailable(str(err) or type(err).__name__)


async def enqueue(rpc: Requester, fn: TaskFunction, ref: QueuedRef) -> int:
    """Publish a runnable task; returns its stream sequence. Duplicate publishes are absorbed."""
    subject = names.queue_for(fn, ref.task_id).subject
    try:
        return await rpc.publish(subject, ref.encode(), {"Nats-Msg-Id": ref.msg_id})
    except Exception as err:
        raise _publish_error(err) from err


async def schedule(js: JetStreamContext, fn: TaskFunction, ref: QueuedRef, at: datetime) -> None:
    """Have JetStream move the task into its queue at `at` (millisecond resolution)."""
    stamp = at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    queue = names.queue_for(fn, ref.task_id)
    try:
        await js.publish(
            queue.schedule_subject(ref.task_id),
            ref.encode(),
            headers={
                "Nats-Schedule": f"@at {stamp}",
                "Nats-Schedule-Target": queue.subject,
                "Nats-Msg-Id": f"{ref.msg_id}.sched",
            },
        )
    except Exception as err:
        raise _publish_error(err) from err


async def oldest(rpc: Requester, queue: names.Queue) -> datetime | None:
    """When the oldest message still in the queue's stream was stored; None if it holds none.
    A task whose message would be older than that has no message any more."""
    state = (await rpc.api(f"$JS.API.STREAM.INFO.{queue.stream}"))["state"]
    if not state["messages"]:
        return None
    return datetime.fromisoformat(state["first_ts"])


async def stream_depths(rpc: Requester) -> dict[str, int]:
    """Messages held by every stream, from the stream list: a page answers for 256 streams, so a
    loop over ten thousand idle functions' queues asks once per period instead of once per
    stream, and looks closer only at the streams that hold something."""
    depths: dict[str, int] = {}
    offset = 0
    while True:
        page = await rpc.api("$JS.API.STREAM.LIST", pydantic_core.to_json({"offset": offset}))
        streams = page.get("streams") or []
        for info in streams:
            depths[info["config"]["name"]] = int(info["state"]["messages"])
        offset += len(streams)
        if not streams or offset >= int(page.get("total", 0)):
            return depths


async def held_by_subject(
    js: JetStreamContext, members: list[tuple[TaskFunction, names.Queue]]
) -> dict[tuple[str, str], int]:
    """Messages each function's queue subject holds in one stream (`members` are the stream's
    functions and queues), from one stream-info request filtered to the stream's queue
    subjects — waiting and claimed-not-yet-acknowledged alike."""
    queue = members[0][1]
    filter_ = queue.subject if len(members) == 1 else queue.stream_subjects[0]
    info = await js.stream_info(queue.stream, subjects_filter=filter_)
    held = info.state.subjects or {}
    return {(fn.account, fn.name): held.get(q.subject, 0) for fn, q in members}


async def queue_backlog(js: JetStreamContext, queue: names.Queue) -> tuple[int, int]:
    """(waiting, in flight) for one queue's consumer. A consumer removed while idle has nothing
    in flight (nats-server keeps one with unacknowledged deliveries), so whatever its subject
    holds waits."""
    info = await consumer_info(js, queue)
    if info is None:
        return await held(js, queue), 0
    return int(info.num_pending or 0), int(info.num_ack_pending or 0)


async def consumer_info(js: JetStreamContext, queue: names.Queue) -> ConsumerInfo | None:
    """The queue's consumer; None if nats-server removed it (idle), while its stream exists."""
    try:
        info: ConsumerInfo = await js.consumer_info(queue.stream, queue.consumer)
    except NotFoundError as err:
        if err.err_code != CONSUMER_NOT_FOUND:
            raise
        return None
    return info


async def held(js: JetStreamContext, queue: names.Queue) -> int:
    """Messages the queue's subject holds in its stream, waiting or in flight."""
    info = await js.stream_info(queue.stream, subjects_filter=queue.subject)
    return int((info.state.subjects or {}).get(queue.subject, 0))


async def backlog(js: JetStreamContext, fn: TaskFunction) -> tuple[int, int]:
    """(waiting, in flight) for the function, all its partitions together."""
    waiting = running = 0
    for queue in names.queues_of(fn):
        w, r = await queue_backlog(js, queue)
        waiting, running = waiting + w, running + r
    return waiting, running
