"""A background task whose cancellation nats-py swallowed still stops, and the stop is bounded.

nats-py catches `CancelledError` where it hands its writes to the flusher
(`Client._flush_pending`): a task cancelled while it waits there for the flush queue carries
on. Here that happens for real, with a one-slot flush queue, and `cancel_and_wait` still ends
the task. A CI run once hung in the test
session's teardown on exactly this (the dispatcher's lease task, awaited after one cancel).
"""

from __future__ import annotations

import asyncio

import nats
from kubetask.cancellation import cancel_and_wait
from kubetask.settings import Settings


async def test_a_cancellation_nats_swallowed_still_stops_the_task(settings: Settings) -> None:
    nc = await nats.connect(
        settings.nats_url,
        user=settings.nats_user,
        password=settings.nats_password,
        flusher_queue_size=1,
    )
    try:
        published = asyncio.Event()
        sub = await nc.subscribe("scratch.b")

        async def publisher() -> None:
            await nc.publish("scratch.a", b"1")  # the one slot of the flush queue is taken
            await sub.unsubscribe()  # flushes too: waits for the slot, and is cancelled there
            published.set()
            await asyncio.sleep(3600)

        task = asyncio.create_task(publisher())
        await asyncio.sleep(0)  # the task runs until it waits for the flush queue
        async with asyncio.timeout(10):
            await cancel_and_wait(task)
        assert task.cancelled()
        assert published.is_set(), "nats-py no longer swallows a cancel: this test shows nothing"
    finally:
        await nc.close()
