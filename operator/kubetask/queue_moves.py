"""Moving a function's backlog when its queue changes (account stream <-> dedicated stream), by
its `queueMode` or by the platform's assignment of an `auto` function (`queue_routes.py`).

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
import logging

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from . import names, queues
from .models import QueueMode, TaskFunction
from .registry import Registry
from .settings import Settings

log = logging.getLogger("kubetask.queues")
BATCH = 256


# Gateways follow the registry within a second; this leaves them room.
SETTLE = 2.0


def previous(fn: TaskFunction) -> TaskFunction:
    """The function as it was on its other queue (only the queue's naming differs)."""
    now = names.queue_mode(fn)
    other = QueueMode.account if now is QueueMode.dedicated else QueueMode.dedicated
    spec = fn.spec.model_copy(update={"queueMode": other})
    return fn.model_copy(update={"spec": spec, "status": None})


async def left_behind(js: JetStreamContext, fn: TaskFunction) -> bool:
    """Whether the function's consumer still exists on its other queue."""
    old = previous(fn)
    try:
        await js.consumer_info(names.stream_for(old), names.consumer_name(old))
    except NotFoundError:
        return False
    return True


async def move_backlog(
    js: JetStreamContext, fn: TaskFunction, settings: Settings, poll: float = 0.2
) -> int:
    """Drain the old queue of `fn` into its current one; returns how many messages moved."""
    settled = asyncio.get_running_loop().time() + SETTLE
    old = previous(fn)
    stream, consumer = names.stream_for(old), names.consumer_name(old)
    moved = 0
    try:
        await js.consumer_info(stream, consumer)
        # Attempts still running on the old consumer must not hold the waiting ones back.
        config = queues.consumer_config(old, settings)
        config.max_ack_pending = old.spec.maxConcurrency + BATCH
        await js.add_consumer(stream, config)
        sub = await js.pull_subscribe_bind(consumer, stream)
    except NotFoundError:
        return 0
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                for msg in await sub.fetch(BATCH, timeout=poll):
                    headers = {"Nats-Msg-Id": f"moved.{stream}.{msg.metadata.sequence.stream}"}
                    await js.publish(names.queue_subject(fn), msg.data, headers=headers)
                    await msg.ack()
                    moved += 1
            info = await js.consumer_info(stream, consumer)
            drained = not info.num_pending and not info.num_ack_pending
            if drained and asyncio.get_running_loop().time() >= settled:
                break
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    with contextlib.suppress(NotFoundError):
        await js.delete_consumer(stream, consumer)
    if names.queue_mode(old) is QueueMode.dedicated:
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(stream)
    log.info("moved %d waiting tasks of %s/%s to %s", moved, fn.account, fn.name, stream)
    return moved


class Mover:
    """Runs at most one move per function, in the background."""

    def __init__(self, js: JetStreamContext, settings: Settings) -> None:
        self.js = js
        self.settings = settings
        self._moves: dict[tuple[str, str], tuple[QueueMode, asyncio.Task[int]]] = {}

    def start(self, fn: TaskFunction) -> None:
        """Move the backlog into `fn`'s queue. A move the other way that is still going is
        cancelled first: it would otherwise delete what is now the current consumer."""
        key = (fn.account, fn.name)
        running = self._moves.get(key)
        if running is not None and not running[1].done() and running[0] is names.queue_mode(fn):
            return
        self._cancel_other(fn)
        task = asyncio.create_task(self._move(fn), name=f"move-{fn.account}-{fn.name}")
        self._moves[key] = (names.queue_mode(fn), task)

    def _cancel_other(self, fn: TaskFunction) -> None:
        running = self._moves.get((fn.account, fn.name))
        if running is not None and running[0] is not names.queue_mode(fn):
            running[1].cancel()

    async def _move(self, fn: TaskFunction) -> int:
        while True:
            try:
                return await move_backlog(self.js, fn, self.settings)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # NATS away for a moment: try again
                log.warning("moving the queue of %s/%s: %s; retrying", fn.account, fn.name, err)
                await asyncio.sleep(1)

    async def resume_all(self, functions: list[TaskFunction]) -> None:
        """Finish moves a stopped gateway left unfinished."""
        for fn in functions:
            with contextlib.suppress(Exception):
                if await left_behind(self.js, fn):
                    self.start(fn)

    async def register(self, registry: Registry, fn: TaskFunction) -> str:
        """Create the function's queue, register it, and move its backlog if its queue changed;
        returns the stream name. The one path by which functions are registered."""
        before = registry.function(fn.account, fn.name)
        fn = registry.with_route(fn)
        self._cancel_other(fn)  # before the queue is (re)configured, which it must not undo
        stream = await queues.ensure_function_queue(self.js, fn, self.settings)
        if before != fn:
            await registry.put_function(fn)
            await registry.caught_up()
        if before is not None and names.queue_mode(before) is not names.queue_mode(fn):
            self.start(fn)
        return stream

    async def close(self) -> None:
        tasks = [task for _, task in self._moves.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
