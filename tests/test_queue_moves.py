"""Changing a function's queueMode is live: the running attempt finishes on the instance it
started on (no "instance unreachable", no attempt spent), the backlog moves to the new queue
and runs at once, and the old queue's consumer is removed once it is drained."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
from harness import SLOW_SERVER, Api
from kubetask import names, queue_moves, queues
from kubetask.models import ObjectMeta, QueueMode, TaskFunction, TaskFunctionSpec
from kubetask.plane import DataPlane
from nats.js.errors import NotFoundError


@pytest.mark.parametrize("runtime", ["server", "command"])
async def test_changing_queue_mode_interrupts_nothing(
    api: Api, plane: DataPlane, runtime: str
) -> None:
    if runtime == "server":
        server = {"command": api.script("slow", SLOW_SERVER), "maxInstances": 1, "concurrency": 3}
        spec = {"server": server}
    else:
        spec = {"command": api.script("sleepy", SLEEPER)}
    spec["maxConcurrency"] = 1
    await api.function("mover", **spec)
    await api.submit("mover", 2.0, task_id="running")
    await api.wait("running", {"Running"})
    for i in range(5):
        await api.submit("mover", 0.05, task_id=f"waiting-{i}")
    changed_at = time.monotonic()
    # More room at the same time, so waiting tasks start (on the same warm instance, in server
    # mode) while the running one goes on across the change.
    spec["maxConcurrency"] = 3
    await api.function("mover", **spec, queueMode="dedicated")
    moved = await api.call("GET", "/v1/functions/mover", 200)
    assert moved["status"]["queue"] == f"KT_QF_{api.account}_mover"
    # New submissions go to the new queue straight away.
    await api.submit("mover", 0.05, task_id="after")
    for task_id in ["running", *(f"waiting-{i}" for i in range(5)), "after"]:
        done = await api.wait(task_id, timeout=30)
        assert done["status"]["phase"] == "Succeeded", done["status"]
        assert done["status"]["attempts"] == 1, done["status"]
    # No stall: the backlog ran beside the running task.
    assert time.monotonic() - changed_at < 6
    # The old consumer is gone once drained; the account stream itself stays.
    for _ in range(100):
        try:
            await plane.js.consumer_info(f"KT_Q_{api.account}", "fn_mover")
        except NotFoundError:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the old consumer was not removed")
    # And back again: the dedicated stream is removed once drained.
    await api.submit("mover", 1.0, task_id="running-2")
    await api.wait("running-2", {"Running"})
    await api.submit("mover", 0.05, task_id="waiting-back")
    await api.function("mover", **spec, queueMode="account")
    for task_id in ("running-2", "waiting-back"):
        done = await api.wait(task_id, timeout=30)
        assert done["status"]["phase"] == "Succeeded" and done["status"]["attempts"] == 1
    for _ in range(100):
        try:
            await plane.js.stream_info(f"KT_QF_{api.account}_mover")
        except NotFoundError:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the old dedicated stream was not removed")


SLEEPER = """
    import json, sys, time
    time.sleep(json.load(sys.stdin))
    print("{}")
"""


async def test_a_move_takes_the_tasks_of_a_queue_whose_consumer_was_removed_while_idle(
    api: Api, plane: DataPlane
) -> None:
    """nats-server removes an idle function's consumer, not the tasks its stream holds; an
    unfinished move (found by a starting gateway) still finds such a queue, and draining it
    moves every task."""
    quick = dataclasses.replace(plane.settings, consumer_idle=0.5)
    spec = TaskFunctionSpec(command=["true"], queueMode=QueueMode.dedicated)
    fn = TaskFunction(metadata=ObjectMeta(name="stranded", namespace=api.account), spec=spec)
    spec = spec.model_copy(update={"queueMode": QueueMode.account})
    moved = fn.model_copy(update={"spec": spec})  # registered nowhere: nobody pulls
    [old], [new] = names.queues_of(fn), names.queues_of(moved)
    await queues.ensure_function_queue(plane.js, fn, quick)
    try:
        for i in range(3):
            await plane.js.publish(old.subject, b"task %d" % i)
        deadline = time.monotonic() + 10
        while True:
            try:
                await plane.js.consumer_info(old.stream, old.consumer)
            except NotFoundError:
                break
            assert time.monotonic() < deadline, "nats-server kept the idle consumer"
            await asyncio.sleep(0.2)
        await queues.ensure_function_queue(plane.js, moved, quick)
        assert await queue_moves.leftovers(plane.js, moved) == [old]
        assert await queue_moves.drain(plane.js, old, moved, quick, poll=0.05) == 3
        assert await queues.queue_backlog(plane.js, new) == (3, 0)
        with pytest.raises(NotFoundError):
            await plane.js.stream_info(old.stream)
    finally:
        await queues.remove_function_queue(plane.js, fn)
        await queues.remove_function_queue(plane.js, moved)
        await plane.js.purge_stream(new.stream, subject=new.subject)
