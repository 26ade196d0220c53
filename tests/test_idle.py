"""Idle is free: a function with nothing to do costs the server fewer and fewer pull requests,
yet its next task is delivered at once — also after nats-server was killed and restarted —
and the backlog gauge is read per stream, not per function, with the same figures."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats
from harness import Api
from kubetask import metrics, queues
from kubetask.dispatch import backlog_gauge
from kubetask.dispatch.pull import Pull
from kubetask.embedded import free_port, start_nats
from kubetask.jetstream import connect
from kubetask.plane import DataPlane
from kubetask.rpc import Requester
from kubetask.settings import Settings
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, StreamConfig


async def test_an_idle_pull_backs_off_yet_delivers_at_once_across_a_nats_restart(
    tmp_path: Path,
) -> None:
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    server = start_nats(tmp_path / "js", port)
    nc = await connect(Settings(nats_url=url), "pull-test")
    watcher = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="IDLE", subjects=["idle.>"]))
        await js.add_consumer("IDLE", ConsumerConfig(durable_name="c", ack_policy="explicit"))
        requests: list[float] = []

        async def seen(_: Msg) -> None:
            requests.append(time.monotonic())

        await watcher.subscribe("$JS.API.CONSUMER.MSG.NEXT.IDLE.c", cb=seen)
        await watcher.flush()  # the server knows the subscription before the first request
        got: list[float] = []

        def deliver(msg: Msg) -> None:
            got.append(time.monotonic())
            asyncio.get_running_loop().create_task(msg.ack())

        pull = Pull(nc, "IDLE", "c", lambda: 4, deliver, expires=0.2, idle_expires=60)
        await pull.start()
        await asyncio.sleep(4)
        # At a fixed 0.2 s that would be 20 requests; growing from 0.2 s: 0.2, 0.8, 3.2 (one
        # or two more if a loaded machine answers late).
        assert 2 <= len(requests) <= 6, requests

        sent = time.monotonic()
        await js.publish("idle.a", b"1")
        # The standing request delivers it; without one it would wait for the next request,
        # up to the 60 s idle expiry. 2 s leaves room for a loaded machine.
        while not got:
            assert time.monotonic() - sent < 2, "an idle function's task waited"
            await asyncio.sleep(0.05)
        assert len(got) == 1

        await asyncio.sleep(3)  # idle again, its request lives longer and longer
        server.kill()
        server.wait()
        server = start_nats(tmp_path / "js", port)
        deadline = time.monotonic() + 10
        while not nc.is_connected:
            assert time.monotonic() < deadline, "did not reconnect"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        sent = time.monotonic()
        await js.publish("idle.a", b"2")
        while len(got) < 2:
            assert time.monotonic() - sent < 5, (
                "the pull forgotten by the restarted server was not renewed"
            )
            await asyncio.sleep(0.05)
        await pull.stop()
    finally:
        await watcher.close()
        await nc.close()
        server.kill()
        server.wait()


async def test_the_backlog_gauge_counts_each_functions_waiting_tasks(
    api: Api, plane: DataPlane
) -> None:
    argv, gate = api.gated("held")
    await api.function("held", command=argv, maxConcurrency=1)
    await api.function("quiet", command=["true"])
    await api.function("split", command=argv, maxConcurrency=2, partitions=2)
    first = (await api.submit("held"))["metadata"]["name"]
    await api.wait(first, {"Running"})
    ids = [first] + [(await api.submit("held"))["metadata"]["name"] for _ in range(3)]
    split = [(await api.submit("split"))["metadata"]["name"] for _ in range(6)]
    # Counting is what is tested, not how soon each partition starts its first task (one took
    # longer than 10 s once, in a loaded full run): a generous deadline, and the gate opened
    # whatever happens, so a failure here leaves no running tasks to later tests.
    deadline = time.monotonic() + 30
    try:
        while True:
            await backlog_gauge.collect_once(plane)
            held = metrics.BACKLOG.labels(api.account, "held")._value.get()
            quiet = metrics.BACKLOG.labels(api.account, "quiet")._value.get()
            parts = metrics.BACKLOG.labels(api.account, "split")._value.get()
            if (held, quiet, parts) == (3, 0, 4):  # 6 over two partitions, one running in each
                break
            assert time.monotonic() < deadline, (held, quiet, parts)
            await asyncio.sleep(0.2)
    finally:
        gate.write_text("open")
    for task_id in ids + split:
        assert (await api.wait(task_id))["status"]["phase"] == "Succeeded"
    await backlog_gauge.collect_once(plane)
    assert metrics.BACKLOG.labels(api.account, "held")._value.get() == 0


async def test_stream_depths_come_from_every_page_of_the_stream_list(tmp_path: Path) -> None:
    """Loops over idle queues read the stream list, 256 streams a page; a stream past the first
    page must not read as empty."""
    port = free_port()
    server = start_nats(tmp_path / "js", port)
    nc = await connect(Settings(nats_url=f"nats://127.0.0.1:{port}"), "depths-test")
    rpc = Requester(nc, timeout=10)
    await rpc.start()
    try:
        js = nc.jetstream()
        for i in range(300):
            await js.add_stream(StreamConfig(name=f"S{i:03d}", subjects=[f"s.{i}"]))
        for _ in range(3):
            await js.publish("s.7", b"x")
        await js.publish("s.299", b"x")
        depths = await queues.stream_depths(rpc)
        assert len(depths) == 300
        assert depths["S007"] == 3 and depths["S299"] == 1
        assert sum(depths.values()) == 4
    finally:
        await rpc.close()
        await nc.close()
        server.kill()
        server.wait()
