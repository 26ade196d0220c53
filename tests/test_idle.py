"""Idle is free: a function with nothing to do costs the server fewer and fewer pull requests,
yet its next task is delivered at once — also after nats-server was killed and restarted —
and the backlog gauge is read per stream, not per function, with the same figures."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import nats
import pytest
from harness import Api
from kubetask import metrics, names, queues
from kubetask.dispatch import backlog_gauge, idle_consumers
from kubetask.dispatch.dispatcher import Dispatcher
from kubetask.dispatch.pull import Pull
from kubetask.embedded import free_port, start_nats
from kubetask.jetstream import connect
from kubetask.models import ObjectMeta, QueueMode, TaskFunction, TaskFunctionSpec
from kubetask.plane import DataPlane
from kubetask.rpc import Requester
from kubetask.settings import Settings
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, RetentionPolicy, StreamConfig
from nats.js.errors import NotFoundError


class PullLab:
    """A nats-server of the test's own with work-queue stream `S` (subjects `s.>`) and its
    consumer `c`, kubetask's connection to it, and a second connection that sees every pull
    request made on `c` (`requests`: when, and the request)."""

    def __init__(self, tmp_path: Path) -> None:
        self.store = tmp_path / "js"
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.server = start_nats(self.store, self.port)
        self.requests: list[tuple[float, dict[str, object]]] = []

    async def start(self, consumer: ConsumerConfig) -> None:
        self.nc = await connect(Settings(nats_url=self.url), "pull-test")
        self.watcher = await nats.connect(self.url)
        self.js = self.nc.jetstream()
        # A work queue, as kubetask's queues are: a consumer made again after nats-server
        # removed one delivers only what was never acknowledged.
        await self.js.add_stream(
            StreamConfig(name="S", subjects=["s.>"], retention=RetentionPolicy.WORK_QUEUE)
        )
        await self.js.add_consumer("S", consumer)

        async def seen(msg: Msg) -> None:
            self.requests.append((time.monotonic(), json.loads(msg.data)))

        self.seeing = await self.watcher.subscribe("$JS.API.CONSUMER.MSG.NEXT.S.c", cb=seen)
        await self.watcher.flush()  # the server knows the subscription before the first request

    def restart(self) -> None:
        self.server.kill()
        self.server.wait()
        self.server = start_nats(self.store, self.port)

    async def close(self) -> None:
        for conn in (getattr(self, "watcher", None), getattr(self, "nc", None)):
            if conn is not None:  # None: the test failed before connecting
                await conn.close()
        self.server.kill()
        self.server.wait()


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[PullLab]:
    lab = PullLab(tmp_path)
    yield lab
    await lab.close()


async def test_an_idle_pull_backs_off_yet_delivers_at_once_across_a_nats_restart(
    lab: PullLab,
) -> None:
    await lab.start(ConsumerConfig(durable_name="c", ack_policy="explicit"))
    got: list[float] = []

    def deliver(msg: Msg) -> None:
        got.append(time.monotonic())
        asyncio.get_running_loop().create_task(msg.ack())

    pull = Pull(lab.nc, "S", "c", lambda: 4, deliver, expires=0.2, idle_expires=60)
    await pull.start()
    await asyncio.sleep(4)
    # At a fixed 0.2 s that would be 20 requests; growing from 0.2 s: 0.2, 0.8, 3.2 (one or two
    # more if a loaded machine answers late).
    assert 2 <= len(lab.requests) <= 6, lab.requests

    sent = time.monotonic()
    await lab.js.publish("s.a", b"1")
    # The standing request delivers it; without one it would wait for the next request, up to
    # the 60 s idle expiry. 2 s leaves room for a loaded machine.
    while not got:
        assert time.monotonic() - sent < 2, "an idle function's task waited"
        await asyncio.sleep(0.05)
    assert len(got) == 1

    await asyncio.sleep(3)  # idle again, its request lives longer and longer
    lab.restart()
    deadline = time.monotonic() + 10
    while not lab.nc.is_connected:
        assert time.monotonic() < deadline, "did not reconnect"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    sent = time.monotonic()
    await lab.js.publish("s.a", b"2")
    while len(got) < 2:
        assert time.monotonic() - sent < 5, (
            "the pull forgotten by the restarted server was not renewed"
        )
        await asyncio.sleep(0.05)
    await pull.stop()


async def test_a_long_idle_pull_dozes_on_its_subject_and_wakes_at_its_next_task(
    lab: PullLab,
) -> None:
    """Past its longest request a pull keeps none open, watches its queue subject, and is woken
    by a publish there, by `rouse` (the backlog gauge's call, for a message no publish
    announced: here a redelivery), and by a reconnect after nats-server was restarted."""
    await lab.start(ConsumerConfig(durable_name="c", ack_policy="explicit", ack_wait=3.0))
    got: list[Msg] = []
    ack = True

    def deliver(msg: Msg) -> None:
        got.append(msg)
        if ack:
            asyncio.get_running_loop().create_task(msg.ack())

    async def delivered(count: int, within: float, why: str) -> None:
        deadline = time.monotonic() + within
        while len(got) < count:
            assert time.monotonic() < deadline, why
            await asyncio.sleep(0.02)

    def looked() -> bool:
        """The last request the watcher saw is the one look that does not wait."""
        return bool(lab.requests) and lab.requests[-1][1].get("no_wait") is True

    async def dozing() -> int:
        """Wait until the pull dozes; how many requests it has made by then."""
        deadline = time.monotonic() + 10
        while not (pull._dormant and pull._watching is not None and not pull._owed) or (
            not looked()
        ):
            assert time.monotonic() < deadline, ("the pull never dozed", lab.requests)
            await asyncio.sleep(0.02)
        return len(lab.requests)

    pull = Pull(lab.nc, "S", "c", lambda: 4, deliver, expires=0.1, idle_expires=0.4, watch="s.a")
    await pull.start()
    made = await dozing()  # after 0.1 and 0.4 s requests, one look that does not wait
    await asyncio.sleep(2)
    assert len(lab.requests) == made, "a dozing pull kept asking"

    await lab.js.publish("s.a", b"1")
    # Without the watch it would wait for nothing at all: no request is open.
    await delivered(1, 2, "a dozing pull missed the task published on its subject")

    ack = False  # the next one is left unacknowledged: redelivered after ack_wait, unannounced
    await dozing()
    await lab.js.publish("s.a", b"2")
    await delivered(2, 2, "the second task was missed")
    made = await dozing()  # within its ack_wait (3 s), or the redelivery would keep it awake
    await asyncio.sleep(3)  # the ack_wait passed: the server would redeliver to a request
    assert len(got) == 2 and len(lab.requests) == made
    pull.rouse()
    await delivered(3, 2, "rousing did not pull the redelivery")
    assert got[2].data == b"2"
    ack = True
    await got[2].ack()

    await dozing()
    lab.restart()
    # Published by another client at once, most likely before the pull's connection is back (it
    # retries every 0.5 s): the watch, subscribed again on the reconnect, misses it, so the look
    # after the reconnect is what finds it.
    publisher = await nats.connect(lab.url)
    await publisher.jetstream().publish("s.a", b"3")
    await publisher.close()
    await delivered(4, 10, "a dozing pull did not look again after a reconnect")
    await pull.stop()
    assert pull._watching is None


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
    # Three to each partition: with a partition of one task (running, nothing waiting) its
    # worker keeps a request open and the gauge rightly names no queue there.
    ids_by_partition: dict[int, list[str]] = {0: [], 1: []}
    for i in itertools.count():
        part = ids_by_partition[names.partition_of(f"split-{i}", 2)]
        if len(part) < 3:
            part.append(f"split-{i}")
        if sum(map(len, ids_by_partition.values())) == 6:
            break
    split = [
        (await api.submit("split", task_id=task_id))["metadata"]["name"]
        for part in ids_by_partition.values()
        for task_id in part
    ]
    # Counting is what is tested, not how soon each partition starts its first task (one took
    # longer than 10 s once, in a loaded full run): a generous deadline, and the gate opened
    # whatever happens, so a failure here leaves no running tasks to later tests.
    deadline = time.monotonic() + 30
    told: set[tuple[str, str, str]] = set()
    try:
        while True:
            told.clear()
            await backlog_gauge.BacklogGauge(plane, lambda *queue: told.add(queue)).collect()
            held = metrics.BACKLOG.labels(api.account, "held")._value.get()
            quiet = metrics.BACKLOG.labels(api.account, "quiet")._value.get()
            parts = metrics.BACKLOG.labels(api.account, "split")._value.get()
            if (held, quiet, parts) == (3, 0, 4):  # 6 over two partitions, one running in each
                break
            assert time.monotonic() < deadline, (held, quiet, parts)
            await asyncio.sleep(0.2)
    finally:
        gate.write_text("open")
    # It names the queues holding messages, each partition apart, so a dozing pull there wakes.
    mine = {(a, f) for a, f, _ in told if a == api.account}
    assert mine == {(api.account, "held"), (api.account, "split")}, told
    assert len({s for _, f, s in told if f == "split"}) == 2, told
    for task_id in ids + split:
        assert (await api.wait(task_id))["status"]["phase"] == "Succeeded"
    await backlog_gauge.BacklogGauge(plane).collect()
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


async def test_a_dozing_function_wakes_for_its_next_task_and_for_its_retry(
    api: Api, dispatcher: Dispatcher
) -> None:
    """Through the session's dispatcher, connected as NATS user `dispatcher` (the suite lets a
    function doze after one empty 5 s pull): a task published while its function dozes starts
    at once (the watch on the queue subject; the gauge alone would take up to its 5 s period),
    and a retry JetStream moves in from its schedule, which no core subscriber sees, still
    runs (the gauge rouses the function)."""
    marker = api.workdir / "dozer-failed-once"
    await api.function(
        "dozer",
        command=api.script(
            "dozer",
            f"""
            import pathlib, sys
            marker = pathlib.Path({str(marker)!r})
            if not marker.exists():
                marker.write_text("x")
                sys.exit(3)
            """,
        ),
    )
    await api.async_config(
        "dozer", function="dozer", maxAsyncRetryAttempts=1, retryBackoff={"initialSeconds": 12}
    )

    async def dozes() -> None:
        deadline = time.monotonic() + 30
        while True:
            pulls = [
                w.pull
                for (a, f, _), w in dispatcher.workers.items()
                if (a, f) == (api.account, "dozer")
            ]
            if pulls and all(p is not None and p._dormant and p._watching for p in pulls):
                return
            assert time.monotonic() < deadline, "the function never dozed"
            await asyncio.sleep(0.1)

    first = (await api.submit("dozer"))["metadata"]["name"]
    await api.wait(first, {"Retrying"})
    await dozes()  # before its retry is due
    done = await api.wait(first, timeout=40)
    assert (done["status"]["phase"], done["status"]["attempts"]) == ("Succeeded", 2)

    for _ in range(2):
        await dozes()
        task_id = (await api.submit("dozer"))["metadata"]["name"]
        stamps = (await api.wait(task_id))["status"]["timestamps"]
        waited = datetime.fromisoformat(stamps["started"]) - datetime.fromisoformat(
            stamps["submitted"]
        )
        assert waited.total_seconds() < 1.5, f"a dozing function's task waited {waited}"


async def _removed(js: nats.js.JetStreamContext, stream: str, consumer: str, within: float) -> None:
    """Wait until nats-server has removed the consumer for idleness."""
    deadline = time.monotonic() + within
    while True:
        try:
            await js.consumer_info(stream, consumer)
        except NotFoundError:
            return
        assert time.monotonic() < deadline, f"consumer {stream}/{consumer} was never removed"
        await asyncio.sleep(0.2)


async def test_a_consumer_removed_while_its_pull_dozes_is_revived_by_the_next_task(
    lab: PullLab,
) -> None:
    """nats-server removes a consumer nobody pulls from (its inactive threshold); the dozing
    pull's next task finds no consumer (503), has it made again, and is delivered."""
    config = ConsumerConfig(durable_name="c", ack_policy="explicit", inactive_threshold=1.0)
    await lab.start(config)
    got: list[Msg] = []
    revived = 0

    def deliver(msg: Msg) -> None:
        got.append(msg)
        asyncio.get_running_loop().create_task(msg.ack())

    async def revive() -> None:
        nonlocal revived
        revived += 1
        await lab.js.add_consumer("S", config)

    pull = Pull(
        lab.nc,
        "S",
        "c",
        lambda: 4,
        deliver,
        expires=0.1,
        idle_expires=0.4,
        watch="s.a",
        revive=revive,
    )
    await pull.start()
    await _removed(lab.js, "S", "c", within=10)
    assert pull._dormant and not revived

    async def delivered(n: int, within: float) -> None:
        await lab.js.publish("s.a", str(n).encode())
        deadline = time.monotonic() + within
        while len(got) < n:
            assert time.monotonic() < deadline, "the task waited in a queue without a consumer"
            await asyncio.sleep(0.02)
        assert got[-1].data == str(n).encode() and revived == n

    # With a subscriber on the pull's request subject (the lab's watcher), a request to no
    # consumer gets no 503 at all: the pull revives the consumer once the request is overdue
    # (its 0.1 s expiry, plus a second).
    await delivered(1, within=4)
    await _removed(lab.js, "S", "c", within=10)  # idle again: removed again
    await lab.seeing.unsubscribe()
    await lab.watcher.flush()
    await delivered(2, within=2)  # the 503 answers at once
    await pull.stop()


class _Listing:
    """The part of a registry the backlog gauge reads, listing one function no dispatcher
    knows (registered, the session's dispatcher would take its task at once)."""

    def __init__(self, fn: TaskFunction, queue: names.Queue) -> None:
        self.generation = 1
        self.functions = {(fn.account, fn.name): fn}
        self._streams = {queue.stream: [(fn, queue)]}

    def by_stream(self) -> dict[str, list[tuple[TaskFunction, names.Queue]]]:
        return self._streams


async def test_binding_to_a_removed_consumer_dozes_unless_tasks_wait(
    plane: DataPlane, api: Api
) -> None:
    """A dispatcher starting on a function whose consumer nats-server removed dozes at once if
    its queue holds nothing, and otherwise makes the consumer again, with the function's
    limits, so the waiting tasks are delivered; the backlog gauge counts such tasks and rouses
    the function; a consumer nats-server never removes is never made again."""
    quick = dataclasses.replace(plane.settings, consumer_idle=0.5)
    fn = TaskFunction(  # registered nowhere: no dispatcher pulls from its queue
        metadata=ObjectMeta(name="unbound", namespace=api.account),
        spec=TaskFunctionSpec(command=["true"], maxConcurrency=7, queueMode=QueueMode.dedicated),
    )
    [queue] = names.queues_of(fn)
    await queues.ensure_function_queue(plane.js, fn, quick)
    try:
        await _removed(plane.js, queue.stream, queue.consumer, within=10)
        assert await idle_consumers.Consumers(plane.js, quick).bind(fn, queue) is True
        with pytest.raises(NotFoundError):
            await plane.js.consumer_info(queue.stream, queue.consumer)
        assert await queues.queue_backlog(plane.js, queue) == (0, 0)

        await plane.js.publish(queue.subject, b"waiting")
        # What the API and the backlog gauge read for it: the task waits, though no consumer
        # says so; the gauge rouses the function, as for a retry moved in from its schedule.
        assert await queues.queue_backlog(plane.js, queue) == (1, 0)
        told: set[tuple[str, str, str]] = set()
        listed = dataclasses.replace(plane, registry=_Listing(fn, queue))
        await backlog_gauge.BacklogGauge(listed, lambda *q: told.add(q)).collect()
        assert told == {(api.account, "unbound", queue.stream)}
        assert metrics.BACKLOG.labels(api.account, "unbound")._value.get() == 1
        assert await idle_consumers.Consumers(plane.js, quick).bind(fn, queue) is False
        info = await plane.js.consumer_info(queue.stream, queue.consumer)
        assert (info.num_pending, info.config.max_ack_pending) == (1, 7)
        assert info.config.inactive_threshold == 0.5
    finally:
        await queues.remove_function_queue(plane.js, fn)

    # The small accounts' stream keeps its consumers, so one missing there was removed with
    # its function: a dispatcher that has not heard yet must not make it again.
    shared = fn.model_copy(
        update={"spec": fn.spec.model_copy(update={"queueMode": QueueMode.shared})}
    )
    [queue] = names.queues_of(shared)
    await queues.ensure_function_queue(plane.js, shared, quick)
    assert (
        await plane.js.consumer_info(queue.stream, queue.consumer)
    ).config.inactive_threshold in (None, 0)
    await queues.remove_function_queue(plane.js, shared)
    consumers = idle_consumers.Consumers(plane.js, quick)
    with pytest.raises(NotFoundError):
        await consumers.bind(shared, queue)
    assert consumers.reviver(shared, queue) is None
    with pytest.raises(NotFoundError):
        await plane.js.consumer_info(queue.stream, queue.consumer)


async def test_a_function_whose_consumer_was_removed_while_idle_runs_its_next_tasks(
    api: Api, plane: DataPlane
) -> None:
    """Through the session's gateway and dispatcher (the suite lets nats-server remove a
    consumer 8 s after its function dozes): the function still reads as ready with nothing
    waiting, its next tasks start at once and all succeed, its consumer is back with the
    function's concurrency, and a retry due while the consumer is gone again still runs (its
    move from the schedule announces nothing: the backlog gauge finds it, or the gateway's
    sweeper republishes it once overdue; this test does not tell which)."""
    marker = api.workdir / "revenant-failed-once"
    await api.function(
        "revenant",
        maxConcurrency=3,
        command=api.script(
            "revenant",
            f"""
            import pathlib, sys
            marker = pathlib.Path({str(marker)!r})
            if "fail" in sys.stdin.read() and not marker.exists():
                marker.write_text("x")
                sys.exit(3)
            """,
        ),
    )
    stream, consumer = names.account_stream(api.account), "fn_revenant"
    first = (await api.submit("revenant", "ok"))["metadata"]["name"]
    assert (await api.wait(first))["status"]["phase"] == "Succeeded"
    await _removed(plane.js, stream, consumer, within=60)

    status = (await api.call("GET", "/v1/functions/revenant", 200))["status"]
    assert (status["ready"], status["backlog"]) == (True, 0), status
    ids = [(await api.submit("revenant", "ok"))["metadata"]["name"] for _ in range(5)]
    for task_id in ids:
        done = await api.wait(task_id)
        assert (done["status"]["phase"], done["status"]["attempts"]) == ("Succeeded", 1)
    stamps = (await api.wait(ids[0]))["status"]["timestamps"]
    waited = datetime.fromisoformat(stamps["started"]) - datetime.fromisoformat(stamps["submitted"])
    assert waited.total_seconds() < 1.5, f"the first task after the removal waited {waited}"
    info = await plane.js.consumer_info(stream, consumer)
    assert info.config.max_ack_pending == 3

    await api.async_config(
        "revenant",
        function="revenant",
        maxAsyncRetryAttempts=1,
        retryBackoff={"initialSeconds": 25},
    )
    retried = (await api.submit("revenant", "fail"))["metadata"]["name"]
    await api.wait(retried, {"Retrying"})
    await _removed(plane.js, stream, consumer, within=25)  # before the retry is due
    done = await api.wait(retried, timeout=60)
    assert (done["status"]["phase"], done["status"]["attempts"]) == ("Succeeded", 2)
