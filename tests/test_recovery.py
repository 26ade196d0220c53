"""Crash windows that real kills hit only by luck, reproduced by writing the state they leave.

A dispatcher that dies between recording a retry and scheduling it leaves a Retrying record with
no message; a resume interrupted between its two steps leaves a Pending one. The gateway's
sweeper must republish both. (The state is written directly: the fault is a few microseconds
wide, too narrow to hit with a kill on purpose.)
"""

from __future__ import annotations

from datetime import timedelta

from harness import Api
from kubetask.models import StageTimestamps, Task, TaskMeta, TaskPhase, TaskSpec, TaskStatus
from kubetask.plane import DataPlane
from kubetask.store import TaskRecord, new_token, now


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


async def test_sweeper_republishes_orphaned_retrying_and_pending_tasks(
    api: Api, plane: DataPlane
) -> None:
    await api.function("fine", command=["sh", "-c", "echo done"])
    await _orphan(plane, api, "lost-retry", TaskPhase.Retrying)
    await _orphan(plane, api, "lost-resume", TaskPhase.Pending)
    retried = await api.wait("lost-retry", timeout=20)
    resumed = await api.wait("lost-resume", timeout=20)
    assert retried["status"]["phase"] == "Succeeded" and retried["status"]["attempts"] == 2
    assert resumed["status"]["phase"] == "Succeeded" and resumed["status"]["result"] == "done"
