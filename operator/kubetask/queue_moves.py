"""Moving a function's backlog when its queues change — account stream, a stream of its own, or
partitions (`queueMode`, `partitions`, or the platform's assignment of an `auto` function,
`queue_routes.py`).

The new queue exists before the function is re-registered, so new submissions go there at once;
dispatchers follow the registry to the new consumer and let attempts they are running finish on
the old one. What still waits in the old queue is republished into the new one (a message only
points at its record, so a copy is as good as the original; a duplicate is dropped by its
dispatch token) and acknowledged in the old one; once the old consumer has nothing waiting and
nothing in flight, and at least SETTLE seconds after the move began (a gateway that had not yet
seen the change may still publish there), it is deleted, and a dedicated stream with it. A move
interrupts no running task and spends no attempt. Whoever registers functions (gateway, operator)
or assigns queues (`queue_routes.py`) starts a move, and the gateway finishes any it finds
unfinished when it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from . import names, queues, quotas
from .models import QueueAssignment, QueueMode, TaskFunction
from .registry import Registry
from .settings import Settings
from .store import now

log = logging.getLogger("kubetask.queues")
BATCH = 256
# Gateways follow the registry within a second; this leaves them room.
SETTLE = 2.0
SMALL_ACCOUNT = "a small account (KUBETASK_SMALL_ACCOUNTS): it shares the small accounts' stream"


def streams(fn: TaskFunction) -> frozenset[str]:
    return frozenset(q.stream for q in names.queues_of(fn))


def _layouts(fn: TaskFunction) -> list[TaskFunction]:
    """The function on the account's stream, a dedicated one and the small accounts' one (not
    partitioned)."""
    variants = []
    for mode in (QueueMode.account, QueueMode.dedicated, QueueMode.shared):
        spec = fn.spec.model_copy(update={"queueMode": mode, "partitions": 1})
        variants.append(fn.model_copy(update={"spec": spec, "status": None}))
    return variants


async def leftovers(js: JetStreamContext, fn: TaskFunction) -> list[names.Queue]:
    """Queues other than its current ones where the function still has a consumer, or tasks
    whose consumer nats-server removed while idle: a move that did not finish (its process
    stopped)."""
    current = streams(fn)
    candidates = [q for variant in _layouts(fn) for q in names.queues_of(variant)]
    for index in await partition_indexes(js, fn):
        candidates.append(names.partition_queue(fn.account, fn.name, index))
    found = []
    for queue in candidates:
        if queue.stream in current:
            continue
        with contextlib.suppress(NotFoundError):
            if await _used(js, queue):
                found.append(queue)
    return found


async def _used(js: JetStreamContext, queue: names.Queue) -> bool:
    if await queues.consumer_info(js, queue) is not None:
        return True
    return await queues.held(js, queue) > 0


async def partition_indexes(js: JetStreamContext, fn: TaskFunction) -> list[int]:
    """The partitions of the function that have a stream now, whatever its spec says."""
    body = json.dumps({"subject": f"kt.qp.{fn.account}.{fn.name}.*"}).encode()
    found = await js._api_request(f"{js._prefix}.STREAM.NAMES", body, timeout=js._timeout)
    return sorted(int(name.rsplit("_", 1)[1]) for name in found.get("streams") or [])


def _target(fn: TaskFunction, msg: Msg) -> str:
    """Where a waiting message goes in the function's current queues (by its task's partition;
    one that cannot be read goes to the first, where the dispatcher quarantines it)."""
    try:
        task_id = queues.QueuedRef.decode(msg.data).task_id
    except (ValueError, KeyError, TypeError):
        return names.queues_of(fn)[0].subject
    return names.queue_for(fn, task_id).subject


async def drain(
    js: JetStreamContext, old: names.Queue, fn: TaskFunction, settings: Settings, poll: float = 0.2
) -> int:
    """Move what waits in `old` into the function's current queues, then remove `old` once it
    has nothing waiting or in flight (and SETTLE seconds have passed); returns how many moved."""
    settled = asyncio.get_running_loop().time() + SETTLE
    moved = 0
    try:
        # A consumer nats-server removed while idle (`dispatch/idle_consumers.py`) is made
        # again, since its stream may still hold tasks for it; one it keeps is gone only if a
        # drain already removed it.
        if queues.idle_threshold(old, settings) is None:
            await js.consumer_info(old.stream, old.consumer)
        # Attempts still running on the old consumer must not hold the waiting ones back.
        config = queues.consumer_config(fn, old, settings)
        config.max_ack_pending = fn.spec.maxConcurrency + BATCH
        await js.add_consumer(old.stream, config)
        sub = await js.pull_subscribe_bind(old.consumer, old.stream)
    except NotFoundError:  # nothing left to move
        return 0
    try:
        while True:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                # nats-py's fetch can turn a cancellation into its own timeout, which this
                # loop would otherwise take for an empty poll and go on for ever.
                raise asyncio.CancelledError
            with contextlib.suppress(TimeoutError):
                for msg in await sub.fetch(BATCH, timeout=poll):
                    headers = {"Nats-Msg-Id": f"moved.{old.stream}.{msg.metadata.sequence.stream}"}
                    await js.publish(_target(fn, msg), msg.data, headers=headers)
                    await msg.ack()
                    moved += 1
            info = await js.consumer_info(old.stream, old.consumer)
            drained = not info.num_pending and not info.num_ack_pending
            if drained and asyncio.get_running_loop().time() >= settled:
                break
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    await queues.remove_queue(js, old)
    log.info("moved %d waiting tasks of %s/%s from %s", moved, fn.account, fn.name, old.stream)
    return moved


class Mover:
    """Drains each old queue of a function once, in the background."""

    def __init__(self, js: JetStreamContext, settings: Settings) -> None:
        self.js = js
        self.settings = settings
        self._moves: dict[tuple[str, str, str], asyncio.Task[int]] = {}

    def start(self, fn: TaskFunction, old: list[names.Queue]) -> None:
        """Drain `old` into `fn`'s queues. A drain of a queue that is current again is
        cancelled first: it would otherwise delete a consumer in use."""
        self._cancel_current(fn)
        current = streams(fn)
        for queue in old:
            if queue.stream in current:
                continue
            key = (fn.account, fn.name, queue.stream)
            running = self._moves.get(key)
            if running is not None and not running.done():
                running.cancel()  # restarted with the function as it is now
            self._moves[key] = asyncio.create_task(
                self._drain(fn, queue), name=f"move-{fn.account}-{fn.name}-{queue.stream}"
            )

    def _cancel_current(self, fn: TaskFunction) -> None:
        current = streams(fn)
        for (account, name, stream), task in self._moves.items():
            if (account, name) == (fn.account, fn.name) and stream in current:
                task.cancel()

    async def _drain(self, fn: TaskFunction, old: names.Queue) -> int:
        while True:
            try:
                return await drain(self.js, old, fn, self.settings)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # NATS away for a moment: try again
                log.warning("moving the queue of %s/%s: %s; retrying", fn.account, fn.name, err)
                await asyncio.sleep(1)

    async def resume_all(self, functions: list[TaskFunction]) -> None:
        """Finish moves a stopped gateway left unfinished."""
        for fn in functions:
            with contextlib.suppress(Exception):
                old = await leftovers(self.js, fn)
                if old:
                    self.start(fn, old)

    async def register(self, registry: Registry, fn: TaskFunction) -> str:
        """Create the function's queues, register it, and move its backlog if its queues
        changed; returns its queue label. The one path by which functions are registered."""
        before = registry.function(fn.account, fn.name)
        await self._place(registry, fn)
        fn = registry.with_route(fn)
        self._check_account(registry, fn)
        self._check_room(registry, fn)
        self._cancel_current(fn)  # before the queues are (re)configured, which it must not undo
        label = await queues.ensure_function_queue(self.js, fn, self.settings)
        if before != fn:
            await registry.put_function(fn)
            await registry.caught_up()
        if before is not None:
            self.start(fn, names.queues_of(before))
        return label

    def _check_account(self, registry: Registry, fn: TaskFunction) -> None:
        """Refuse a function past its account's quotas: a count of functions, and of streams
        of their own (each a stream in nats-server, which every account shares). Only what
        adds to a count is refused: an account over a quota since it was lowered keeps what it
        has, and its functions can still be updated."""
        use = registry.account_use(fn.account)
        before = registry.function(fn.account, fn.name)
        added = sum(not q.shared for q in names.queues_of(fn))
        if before is not None:
            added -= sum(not q.shared for q in names.queues_of(before))
        own = use.own_queues + added
        limits = self.settings
        if before is None and use.functions >= limits.account_max_functions:
            raise queues.TooManyFunctions(
                f"account {fn.account!r} already has {limits.account_max_functions} functions "
                "(KUBETASK_ACCOUNT_MAX_FUNCTIONS); delete one first"
            )
        data = registry.encode(fn)
        quotas.check_bytes(registry, "function", fn.account, fn.name, data)
        if added > 0 and own > limits.account_max_own_queues:
            raise queues.TooManyFunctions(
                f"account {fn.account!r} would hold {own} queues of its functions' own (dedicated"
                f" or partitions), over its {limits.account_max_own_queues} "
                "(KUBETASK_ACCOUNT_MAX_OWN_QUEUES); use fewer partitions or queueMode: auto"
            )

    def _check_room(self, registry: Registry, fn: TaskFunction) -> None:
        """Refuse a function its queue's stream has no room for, counting the functions
        registered there: the stream's consumer limit alone no longer counts them, since
        nats-server removes idle functions' consumers (`dispatch/idle_consumers.py`), and a
        function let in while they were gone would find no room when they came back. The
        limit stays on the stream for two gateways registering at once."""
        streams = registry.by_stream()
        for queue in names.queues_of(fn):
            members = streams.get(queue.stream, ())
            others = [f for f, _ in members if (f.account, f.name) != (fn.account, fn.name)]
            if len(others) >= self.settings.queue_max_functions:
                raise queues.too_many_functions(queue, self.settings)

    async def _place(self, registry: Registry, fn: TaskFunction) -> None:
        """An `auto` function of a small account (`KUBETASK_SMALL_ACCOUNTS`) starts in the
        stream small accounts share, while it has room: recorded as the platform's assignment,
        which every gateway and dispatcher follows whatever its own settings, and which
        `queue_routes.py` may later change like any other. Registered again once its account
        is no longer listed, it goes back to the account's stream."""
        if not names.routed(fn.spec):
            return
        small = self.settings.small_account(fn.account)
        route = registry.routes.get((fn.account, fn.name))
        if route is not None:
            if route[0].mode is QueueMode.shared and not small:  # its account no longer listed
                if await registry.unassign_queue(fn.account, fn.name, route[1]):
                    await registry.caught_up()
            return
        if not small:
            return
        with contextlib.suppress(NotFoundError):  # not made yet: room for everyone
            info = await self.js.stream_info(names.SHARED_STREAM)
            if info.state.consumer_count >= self.settings.queue_max_functions:
                return  # full: the account's own stream, rather than a refusal
        assignment = QueueAssignment(mode=QueueMode.shared, reason=SMALL_ACCOUNT, since=now())
        if await registry.assign_queue(fn.account, fn.name, assignment):
            await registry.caught_up()

    async def close(self) -> None:
        tasks = list(self._moves.values())
        for task in tasks:
            task.cancel()
        if tasks:  # bounded: a stop must not hang on a move (it resumes at the next start)
            await asyncio.wait(tasks, timeout=5)
