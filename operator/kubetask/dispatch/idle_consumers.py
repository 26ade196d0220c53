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

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from .. import names, queues
from ..models import TaskFunction
from ..settings import Settings


async def bind(
    js: JetStreamContext, fn: TaskFunction, queue: names.Queue, settings: Settings
) -> bool:
    """Check the queue's consumer before pulling from it; True if it is gone and nothing waits,
    so the worker should start dozing. A consumer gone while tasks wait is created again. Raises
    whatever else JetStream answers: a queue still being created is retried by the caller."""
    try:
        await js.consumer_info(queue.stream, queue.consumer)
        return False
    except NotFoundError as err:
        if not queues.consumer_gone(err):
            raise
    if not await queues.held(js, queue):
        return True
    await queues.revive_consumer(js, fn, queue, settings)
    return False
