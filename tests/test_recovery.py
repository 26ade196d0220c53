"""Crash windows that real kills hit only by luck, reproduced by writing the state they leave.

A gateway that dies between creating a task's record and publishing its message leaves a Queued
record with no message; a dispatcher that dies between recording a retry and scheduling it
leaves a Retrying one; a resume interrupted between its two steps leaves a Pending one. The
gateway's sweeper must republish all three. (The state is written directly: the fault is a few
microseconds wide, too narrow to hit with a kill on purpose.)
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from harness import Api
from kubetask import names
from kubetask.gateway.index import TaskIndex
from kubetask.gateway.sweeper import sweep_once
from kubetask.models import StageTimestamps, Task, TaskMeta, TaskPhase, TaskSpec, TaskStatus
from kubetask.plane import DataPlane
from kubetask.store import TaskRecord, new_token, now
from kubetask.watch import LazyMirror


async def _orphan(plane: DataPlane, api: Api, task_id: str, phase: TaskPhase) -> None:
    old = now() - timedelta(seconds=30)
    status = TaskStatus(phase=phase, timestamps=StageTimestamps(submitted=old, enqueued=old))
    if phase is TaskPhase.Retrying:
        status.attempts = 1
        status.nextAttemptAt = old
    record = TaskRecord(
        task=Task(
            metadata=TaskMeta(name=task_id, namespace=api.account),
            spec=TaskSpec(function="fine", payload=None),
            status=status,
        ),
        token=new_token(),
    )
    await plane.store.create(record)


async def test_sweeper_republishes_orphaned_queued_retrying_and_pending_tasks(
    api: Api, plane: DataPlane
) -> None:
    await api.function("fine", command=["sh", "-c", "echo done"])
    await _orphan(plane, api, "lost-submit", TaskPhase.Queued)
    await _orphan(plane, api, "lost-retry", TaskPhase.Retrying)
    await _orphan(plane, api, "lost-resume", TaskPhase.Pending)
    submitted = await api.wait("lost-submit", timeout=20)
    retried = await api.wait("lost-retry", timeout=20)
    resumed = await api.wait("lost-resume", timeout=20)
    assert submitted["status"]["phase"] == "Succeeded" and submitted["status"]["attempts"] == 1
    assert retried["status"]["phase"] == "Succeeded" and retried["status"]["attempts"] == 2
    assert resumed["status"]["phase"] == "Succeeded" and resumed["status"]["result"] == "done"


async def test_a_queued_task_waiting_its_turn_is_not_republished(
    api: Api, plane: DataPlane
) -> None:
    """Its message is still in the queue (older than the grace), so the sweeper leaves it."""
    gate = api.workdir / "gate"
    argv = api.script(
        "gated",
        f"""
        import os, time
        while not os.path.exists({str(gate)!r}):
            time.sleep(0.05)
        print("ran")
    """,
    )
    await api.function("gated", command=argv, maxConcurrency=1)
    first = (await api.submit("gated", 1))["metadata"]["name"]
    waiting = (await api.submit("gated", 2))["metadata"]["name"]
    await api.wait(first, {"Running"})
    await asyncio.sleep(plane.settings.sweep_grace * 2.5)  # several sweeps see it overdue
    index = TaskIndex()
    mirror = LazyMirror(plane.rpc, names.TASKS_BUCKET, index.apply)
    await mirror.caught_up()
    await mirror.stop()
    for other in index.repairable():
        if other.account != api.account:
            index.drop(other.account, other.id)
    assert [(s.account, s.id) for s in index.repairable()] == [(api.account, waiting)]
    assert await sweep_once(plane, index.repairable()) == 0
    gate.write_text("open")
    for task_id in (first, waiting):
        assert (await api.wait(task_id))["status"]["phase"] == "Succeeded"
