"""A function's consumer comes and goes with its work.

Ten thousand idle durable consumers cost nats-server about 2% of a core doing nothing, their
timers alone (bench/README.md, "Idle functions"). So a consumer has an inactivity threshold
(`Settings.consumer_idle`): once no dispatcher has asked it for tasks for that long, and every
task it delivered has been acknowledged (nats-server counts a delivery's `ack_wait` and its
heartbeats as use), nats-server removes it. Nothing is lost with it: the stream is a work
queue, which keeps a message until it is acknowledged, and the record in KV is the truth.

A dozing pull (`pull.py`) asks nothing, so a removed consumer is only noticed when a task wakes
the function: its pull request finds no consumer (503, no responders), and it creates it again
as registering the function made it (`queues.revive_consumer`), then pulls. A dispatcher
starting on a function whose consumer is gone dozes straight away unless tasks already wait; a
task published in the instant between that look and its watch is found by the backlog gauge,
which treats a missing consumer as one with every held task waiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from nats.js import JetStreamContext

from .. import names, queues
from ..models import TaskFunction
from ..settings import Settings

# Consumer calls one dispatcher makes at once. A burst over ten thousand functions whose
# consumers were all gone sent ten thousand creations to nats-server's API together; over a
# thousand timed out (5 s) and were tried again a second later. A dispatcher starting binds
# ten thousand the same way.
CONCURRENT = 16


class Consumers:
    """A dispatcher's calls about its functions' consumers, CONCURRENT at a time."""

    def __init__(self, js: JetStreamContext, settings: Settings) -> None:
        self._js = js
        self._settings = settings
        self._slots = asyncio.Semaphore(CONCURRENT)

    async def bind(self, fn: TaskFunction, queue: names.Queue) -> bool:
        """Check the queue's consumer before pulling from it; True if it is gone and nothing
        waits, so the worker should start dozing. A consumer gone while tasks wait is created
        again. Raises whatever else JetStream answers: a queue still being created is retried
        by the caller."""
        async with self._slots:
            if not self.removable(queue):  # kept by nats-server: missing, it is an error
                await self._js.consumer_info(queue.stream, queue.consumer)
                return False
            if await queues.consumer_info(self._js, queue) is not None:
                return False
            if not await queues.held(self._js, queue):
                return True
            await queues.revive_consumer(self._js, fn, queue, self._settings)
            return False

    def removable(self, queue: names.Queue) -> bool:
        """Whether nats-server removes the queue's consumer when idle. One that it keeps is
        gone only because the function or its queue was: not to be made again by a dispatcher
        that has not heard yet, since nothing would ever remove it."""
        return queues.idle_threshold(queue, self._settings) is not None

    def reviver(self, fn: TaskFunction, queue: names.Queue) -> Callable[[], Awaitable[None]] | None:
        """What the pull on `queue` calls when it finds no consumer; None if it is not to."""
        if not self.removable(queue):
            return None

        async def revive() -> None:
            async with self._slots:
                await queues.revive_consumer(self._js, fn, queue, self._settings)

        return revive
