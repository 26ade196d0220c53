"""User actions on a task — stop, pause, resume, delete — as state-machine transitions.

Shared by the HTTP API, the CLI (through it) and the operator (deleting a Task object stops it).
"""

from __future__ import annotations

from . import names, submission
from .logs import encode_line
from .models import TaskPhase
from .plane import DataPlane
from .states import DELETABLE, PAUSABLE, RESUMABLE, STOPPABLE, IllegalTransition
from .store import StaleRecord, TaskRecord, Versioned, new_token, now


class FunctionMissing(Exception):
    pass


async def stop(plane: DataPlane, current: Versioned) -> Versioned:
    """A waiting task ends Stopped at once; a running one goes Stopping and the dispatcher that
    runs it (told over a control subject) kills the attempt and records Stopped."""

    def mutate(r: TaskRecord) -> TaskRecord:
        if r.phase not in STOPPABLE:
            raise IllegalTransition(r.phase, TaskPhase.Stopped, "stop the task")
        if r.phase is TaskPhase.Running:
            r.task.status.phase = TaskPhase.Stopping
        else:
            r.task.status.phase = TaskPhase.Stopped
            r.task.status.timestamps.finished = now()
            r.task.status.nextAttemptAt = None
        return r

    task = current.record.task
    updated = await plane.store.transition(task.account, task.id, mutate, current)
    if updated.record.phase is TaskPhase.Stopping:
        await plane.nc.publish(names.stop_subject(task.account, task.id))
    else:  # ended here, not by a dispatcher: close its log the way a dispatcher would
        line = encode_line(
            updated.record.task.status.attempts, "system", "task Stopped", final=True
        )
        await plane.nc.publish(names.log_subject(task.account, task.id), line)
    await plane.nc.flush()
    return updated


async def pause(plane: DataPlane, current: Versioned) -> Versioned:
    def mutate(r: TaskRecord) -> TaskRecord:
        if r.phase not in PAUSABLE:
            raise IllegalTransition(r.phase, TaskPhase.Paused, "pause the task")
        r.task.status.phase = TaskPhase.Paused
        r.task.status.nextAttemptAt = None  # a resume queues it at once, backoff or not
        return r

    task = current.record.task
    return await plane.store.transition(task.account, task.id, mutate, current)


async def resume(plane: DataPlane, current: Versioned) -> Versioned:
    """Back through Pending with a fresh dispatch token; the queue-age clock restarts."""
    task = current.record.task
    fn = plane.registry.function(task.account, task.spec.function)
    if fn is None:
        raise FunctionMissing(task.spec.function)

    def mutate(r: TaskRecord) -> TaskRecord:
        if r.phase not in RESUMABLE:
            raise IllegalTransition(r.phase, TaskPhase.Pending, "resume the task")
        r.task.status.phase = TaskPhase.Pending
        r.task.status.timestamps.enqueued = None
        r.task.status.nextAttemptAt = None
        r.token = new_token()
        return r

    pending = await plane.store.transition(task.account, task.id, mutate, current)
    return await submission.enqueue(plane, fn, pending)


async def delete(plane: DataPlane, current: Versioned) -> None:
    """Decided on the record as it is when deleted: one that changed since it was read (a
    resume meanwhile) is read again, and a task deleted meanwhile is deleted."""
    task = current.record.task
    while True:
        phase = current.record.phase
        if phase not in DELETABLE:
            raise IllegalTransition(phase, phase, "delete the task (stop it first)")
        try:
            await plane.store.delete(current)
            return
        except StaleRecord:
            latest = await plane.store.get(task.account, task.id)
            if latest is None:
                return
            current = latest
