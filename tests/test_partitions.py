"""Partitioned functions: a function's queue split into N streams, each leased to one
dispatcher; tasks spread over the partitions by id, run within the function's concurrency, and
survive a change in the number of partitions with none lost or run twice. A partition count the
function's concurrency cannot carry, or partitions on the account's shared queue, are refused."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

from harness import Api, all_succeed, read_lines
from kubetask import names
from kubetask.controllers.context import OperatorConfig
from kubetask.controllers.deployments import desired_replicas, total_backlog
from kubetask.dispatch.dispatcher import Dispatcher
from kubetask.dispatch.leases import Leases, member_key
from kubetask.models import ObjectMeta, TaskFunction, TaskFunctionSpec
from kubetask.plane import DataPlane

RECORDER = """
    import json, os, sys, time
    task = os.environ["KUBETASK_TASK_ID"]
    with open(sys.argv[1], "a") as f:
        f.write(task + "\\n")
    time.sleep(json.load(sys.stdin) or 0)
    print("{}")
"""


async def test_partitions_that_cannot_work_are_refused(api: Api) -> None:
    too_many = await api.function("p", 422, command=["true"], partitions=4, maxConcurrency=2)
    assert "maxConcurrency" in str(too_many), too_many
    shared = await api.function("p", 422, command=["true"], partitions=2, queueMode="account")
    assert "queueMode" in str(shared), shared
    await api.function("p", 422, command=["true"], partitions=65, maxConcurrency=100)


async def test_tasks_spread_over_partitions_and_survive_a_new_count(
    api: Api, plane: DataPlane, dispatcher: Dispatcher, tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    command = [*api.script("recorder", RECORDER), str(ran)]
    created = await api.function("split", command=command, partitions=4, maxConcurrency=8)
    assert created["status"]["queue"] == f"KT_QP_{api.account}_split_{{0..3}}"
    fn = plane.registry.function(api.account, "split")
    assert fn is not None
    queues = names.queues_of(fn)
    assert [q.partition for q in queues] == [0, 1, 2, 3]
    for q in queues:  # each partition runs its share of the function's concurrency
        info = await plane.js.consumer_info(q.stream, q.consumer)
        assert info.config.max_ack_pending == 2, info.config
    assert dispatcher.leases is not None
    # The only dispatcher leases every partition (it also holds earlier tests' partitions).
    mine = {f"p.{api.account}.split.{i}" for i in range(4)}
    deadline = time.monotonic() + 15
    while not mine <= set(dispatcher.leases.held):
        assert time.monotonic() < deadline, sorted(dispatcher.leases.held)
        await asyncio.sleep(0.1)
    ids = [f"t{i:03d}" for i in range(120)]
    for task_id in ids:
        await api.submit("split", 0.2 if task_id < "t008" else 0, task_id=task_id)
    waiting = (await api.get("t119"))["status"]["waiting"]
    if waiting is not None:  # still queued: it says which partition
        home = names.queue_for(fn, "t119")
        assert (waiting["queue"], waiting["partition"]) == (home.stream, home.partition)
    # Fewer partitions while tasks wait: those of the partitions that go are moved.
    await api.function("split", command=command, partitions=2, maxConcurrency=8)
    await all_succeed(api, "split", len(ids))
    assert Counter(read_lines(ran)) == Counter(ids), "every task ran exactly once"
    spread = Counter(names.partition_of(t, 4) for t in ids)
    assert len(spread) == 4 and min(spread.values()) >= 15, spread
    for index in (2, 3):
        for _ in range(100):
            try:
                await plane.js.stream_info(f"KT_QP_{api.account}_split_{index}")
            except Exception:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"partition {index} was not removed")


async def test_the_operator_wants_a_dispatcher_per_partition_with_work(
    api: Api, plane: DataPlane
) -> None:
    await api.function("wide", command=["sleep", "3"], partitions=4, maxConcurrency=8)
    for i in range(12):
        await api.submit("wide", task_id=f"w{i:02d}")
    backlog, busy = await total_backlog(plane)
    assert busy == len({names.partition_of(f"w{i:02d}", 4) for i in range(12)}) == 4
    few = OperatorConfig(target_backlog=1000, dispatcher_min=1, dispatcher_max=10)
    assert desired_replicas(few, backlog, busy) == 4  # the backlog alone would ask for 1
    assert desired_replicas(OperatorConfig(dispatcher_max=3), backlog, busy) == 3
    for i in range(12):
        await api.call("POST", f"/v1/tasks/w{i:02d}/stop")


def test_every_dispatcher_gets_an_even_share_of_each_functions_partitions() -> None:
    """Whatever the dispatchers' ids, n partitions over m dispatchers give each n/m (give or
    take one): computed by each dispatcher alone, from the members it sees."""
    fns = [
        TaskFunction(
            metadata=ObjectMeta(name=f"f{i}", namespace="acct"),
            spec=TaskFunctionSpec(command=["true"], maxConcurrency=64, partitions=p),
        )
        for i, p in enumerate([2, 4, 5, 8])
    ]
    registry = SimpleNamespace(partitioned=lambda: fns)
    rnd = random.Random(4)
    for _ in range(200):
        ids = [
            f"host-{rnd.randrange(99999)}-{rnd.getrandbits(16):04x}"
            for _ in range(rnd.choice([2, 3]))
        ]
        held: Counter[str] = Counter()
        owners: Counter[str] = Counter()
        for me in ids:
            leases = Leases(None, registry, me, 10.0, lambda: None)  # type: ignore[arg-type]
            leases.seen = {member_key(other): time.monotonic() for other in ids}
            for key in leases.wanted():
                held[key] += 1
                owners[(me, key.rsplit(".", 1)[0])] += 1
        assert all(count == 1 for count in held.values())
        assert len(held) == sum(fn.spec.partitions for fn in fns)
        for fn in fns:
            shares = [owners[(me, f"p.acct.{fn.name}")] for me in ids]
            assert max(shares) - min(shares) <= 1, (fn.spec.partitions, shares)


async def test_a_queued_tasks_position_counts_its_own_partition_only(api: Api) -> None:
    """The other partitions are consumed beside a task's, not before it: counting their tasks
    put a task 8th in line where 3 were ahead of it."""
    argv, gate = api.gated("held")
    await api.function("lined", command=argv, partitions=2, maxConcurrency=2)
    busy = {names.partition_of(f"busy{i}", 2): f"busy{i}" for i in range(20)}
    assert len(busy) == 2
    try:
        for task_id in busy.values():  # one running in each partition
            await api.submit("lined", task_id=task_id)
        for task_id in busy.values():
            await api.wait(task_id, {"Running"})
        ids = [f"q{i:02d}" for i in range(10)]
        for task_id in ids:
            await api.submit("lined", task_id=task_id)
        for n, task_id in enumerate(ids):
            mine = names.partition_of(task_id, 2)
            before = sum(names.partition_of(other, 2) == mine for other in ids[:n])
            waiting = (await api.get(task_id))["status"]["waiting"]
            assert (waiting["partition"], waiting["position"]) == (mine, before + 1), waiting
    finally:
        gate.write_text("open")
    await all_succeed(api, "lined", 12)
