"""TaskFunction: its JetStream queue (stream, subject, consumer), its registration with the
dispatchers, backlog and readiness in status; on deletion (finalizer) the queue goes once the
function's tasks are drained or stopped."""

from __future__ import annotations

from typing import Any

import kopf

from .. import names, queues, quotas
from ..models import ObjectMeta, TaskFunction, TaskFunctionSpec
from .context import condition, pace_change, plane_of, set_status
from .handled import handled

RESOURCE = ("kubetask.io", "v1alpha1", "taskfunctions")


def model(name: str, namespace: Any, spec: Any) -> TaskFunction:
    return TaskFunction(
        metadata=ObjectMeta(name=name, namespace=namespace),
        spec=TaskFunctionSpec.model_validate(dict(spec)),
    )


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
@handled("TaskFunction")
async def reconcile(
    name: str,
    namespace: Any,
    spec: Any,
    meta: Any,
    status: Any,
    memo: Any,
    patch: kopf.Patch,
    body: Any,
    reason: str,
    **_: Any,
) -> None:
    plane = plane_of(memo)
    try:
        fn = model(name, namespace, spec)
    except ValueError as err:
        patch.status["ready"] = False
        patch.status["conditions"] = condition(
            "False", "InvalidSpec", str(err), status.get("conditions")
        )
        raise kopf.PermanentError(f"invalid spec: {err}") from err
    changed = plane.registry.function(namespace, name) != plane.registry.with_route(fn)
    if changed and reason != kopf.Reason.RESUME:  # an operator's restart changes nothing
        pace_change(memo, body, namespace)
    try:
        stream = await plane.mover.register(plane.registry, fn)
    except (queues.TooManyFunctions, quotas.OverQuota) as err:
        why = "TooManyFunctions" if isinstance(err, queues.TooManyFunctions) else "OverQuota"
        patch.status["ready"] = False
        patch.status["conditions"] = condition("False", why, str(err), status.get("conditions"))
        raise kopf.TemporaryError(str(err), delay=60) from err
    if changed:
        kopf.info(body, reason="Registered", message=f"queue {stream} ready; dispatchers notified")
    waiting, running = await queues.backlog(plane.js, fn)
    set_status(
        patch,
        status,
        {
            "queue": stream,
            "backlog": waiting + running,
            "ready": True,
            "observedGeneration": meta.get("generation"),
            "conditions": condition(
                "True", "QueueReady", f"stream {stream}", status.get("conditions")
            ),
        },
    )


@kopf.timer(*RESOURCE, interval=10, initial_delay=5)
async def report_backlog(
    name: str, namespace: Any, spec: Any, status: Any, memo: Any, patch: kopf.Patch, **_: Any
) -> None:
    fn = plane_of(memo).registry.function(namespace, name)
    if fn is None:
        return
    waiting, running = await queues.backlog(plane_of(memo).js, fn)
    if status.get("backlog") != waiting + running:
        patch.status["backlog"] = waiting + running
    # Where the platform put an `auto` function's queue, and why, follows the registry.
    if status.get("queue") != names.queue_label(fn):
        patch.status["queue"] = names.queue_label(fn)
    assignment = fn.status.queueAssignment if fn.status is not None else None
    shown = None if assignment is None else assignment.model_dump(mode="json")
    if status.get("queueAssignment") != shown:
        patch.status["queueAssignment"] = shown


@kopf.on.delete(*RESOURCE)
@handled("TaskFunction")
async def remove(name: str, namespace: Any, spec: Any, memo: Any, body: Any, **_: Any) -> None:
    plane = plane_of(memo)
    fn = plane.registry.function(namespace, name) or model(name, namespace, spec)
    try:
        waiting, running = await queues.backlog(plane.js, fn)
    except Exception:
        waiting = running = 0  # no queue: nothing to drain
    if waiting or running:
        kopf.info(body, reason="Draining", message=f"{waiting} waiting, {running} running")
        raise kopf.TemporaryError(f"waiting for {waiting + running} tasks to finish", delay=5)
    if plane.registry.function(namespace, name) is not None:
        pace_change(memo, body, namespace)
    await plane.registry.delete_function(namespace, name)
    await queues.remove_function_queue(plane.js, fn)
