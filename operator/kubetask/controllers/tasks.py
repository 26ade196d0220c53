"""Task: a `kubectl apply`ed Task is submitted through the same path as an HTTP submission,
held to the same payload rules, the same back-pressure and the same room kept in the store,
de-duplicated by its name (re-applying never runs it again); a daemon mirrors the task's state
into `status` until it is terminal; deleting the object stops the task."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import kopf

from .. import actions, metrics, submission
from ..gateway.store_room import RETRY_AFTER, StoreFull
from ..gateway.throttle import Throttled
from ..models import TaskPhase
from ..states import TERMINAL, IllegalTransition
from ..store import TaskExists
from .context import condition, plane_of
from .handled import handled
from .kube import patch_status

RESOURCE = ("kubetask.io", "v1alpha1", "tasks")
POLL_SECONDS = 1.0
RESULT_SUMMARY_CHARS = 256


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@handled("Task")
async def submit(name: str, namespace: Any, spec: Any, memo: Any, body: Any, **_: Any) -> None:
    plane = plane_of(memo)
    fn = plane.registry.function(namespace, spec["function"])
    if fn is None:
        raise kopf.TemporaryError(f"function {spec['function']!r} is not registered", delay=5)
    try:
        submission.check_payload(spec.get("payload"), plane.settings.max_payload_bytes)
    except submission.PayloadRefused as err:
        await submission.refuse(plane, fn, name, f"refused: {err}")
        kopf.warn(body, reason="Refused", message=str(err))
        return
    try:
        memo.store_room.admit()
    except StoreFull as err:
        kopf.info(body, reason="StoreFull", message=f"{err}; submitted in {RETRY_AFTER}s")
        raise kopf.TemporaryError(str(err), delay=RETRY_AFTER) from None
    try:
        memo.records.admit(fn.account)
        await memo.throttle.admit(fn)
    except Throttled as err:
        # Retried when the account may submit again; the object waits, unsubmitted, and its
        # events say why (kopf posts none for a handler that will be retried).
        metrics.THROTTLED.labels(fn.account, fn.name, err.reason).inc()
        kopf.info(body, reason="Throttled", message=f"{err}; submitted in {err.retry_after}s")
        raise kopf.TemporaryError(f"throttled: {err}", delay=err.retry_after) from None
    try:
        created = await submission.submit(plane, fn, name, spec.get("payload"))
    except TaskExists:
        return  # applied before (or the operator restarted): never submitted twice
    memo.records.created(fn.account, len(created.raw))
    kopf.info(body, reason="Submitted", message=f"queued for function {fn.name}")


def status_of(task: Any, previous: Any) -> dict[str, Any]:
    st = task.status
    out: dict[str, Any] = st.model_dump(mode="json", exclude={"result", "conditions"})
    if st.result is not None:
        out["result"] = json.dumps(st.result)[:RESULT_SUMMARY_CHARS]
    done = st.phase in TERMINAL
    out["conditions"] = condition(
        "True" if done else "False",
        st.phase.value,
        st.error or "",
        previous.get("conditions"),
        type_="Finished",
    )
    return out


@kopf.daemon(*RESOURCE, cancellation_timeout=5)
async def mirror(
    name: str, namespace: Any, status: Any, memo: Any, body: Any, stopped: Any, **_: Any
) -> None:
    """Copy the record's state into the object until it ends, posting an Event per phase.
    (A daemon runs beside the handlers, so it patches through the API itself.)"""
    plane = plane_of(memo)
    last_phase = status.get("phase")
    while not stopped:
        current = await plane.store.get(namespace, name)
        if current is not None:
            task = current.record.task
            new_status = status_of(task, status)
            if new_status != {k: status.get(k) for k in new_status}:
                await patch_status("tasks", namespace, name, new_status)
            if task.status.phase.value != last_phase:
                last_phase = task.status.phase.value
                kopf.info(
                    body,
                    reason=last_phase,
                    message=f"attempts {task.status.attempts}"
                    + (f": {task.status.error}" if task.status.error else ""),
                )
            if task.status.phase in TERMINAL:
                return
        await asyncio.sleep(POLL_SECONDS)


@kopf.on.delete(*RESOURCE)
@handled("Task")
async def stop(name: str, namespace: Any, memo: Any, **_: Any) -> None:
    plane = plane_of(memo)
    current = await plane.store.get(namespace, name)
    if current is None:
        return
    if current.record.phase not in TERMINAL and current.record.phase is not TaskPhase.Paused:
        try:
            current = await actions.stop(plane, current)
        except IllegalTransition:
            pass
        if current.record.phase is TaskPhase.Stopping:
            raise kopf.TemporaryError("waiting for the running attempt to stop", delay=1)
    latest = await plane.store.get(namespace, name)
    if latest is not None:
        try:
            await actions.delete(plane, latest)  # so the name can be used for a new task
        except IllegalTransition as err:
            raise kopf.TemporaryError(str(err), delay=1) from err
