"""Deliver a finished task's record to its onSuccess / onFailure destination, at least once.

The record follows DESIGN.md §4 (Lambda's invocation record). Delivery is retried a few times in
place; if it still fails the whole terminal step is retried later through JetStream redelivery,
so a destination that is down for a while still gets the record once it is back.

- function: submitted as a new task of that function with the record as payload, under a
  derived id, so a repeated delivery is de-duplicated like any submission; a chain of them
  ends after `destination_chains.MAX_DEPTH` (`destination_chains.py`).
- subject: published with a Nats-Msg-Id into the stream that captures the subject (or, when no
  stream does, as a plain NATS message — at most once, to whoever is subscribed then). Only
  subjects in the account's own namespace (`out.<account>.…`, `grammar.py`) are accepted, and
  they are published over a connection whose NATS user may publish nowhere else.
- webhook: POSTed as JSON, never to a denied network (`webhooks.py`); any 2xx counts as
  delivered.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import urlsplit

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from .. import grammar, jetstream, names, submission
from ..metrics import DESTINATION_FAILURES
from ..models import (
    AsyncConfig,
    Destination,
    DestinationKind,
    DestinationRecord,
    RequestContext,
    ResponseContext,
    TaskFunction,
    TaskPhase,
    TaskStatus,
)
from ..networks import Network, denied
from ..plane import DataPlane
from ..store import TaskExists, now
from . import destination_chains
from .policy import Policy, TaskContext
from .webhooks import WebhookRefused, Webhooks

Condition = Literal["Success", "RetriesExhausted", "EventAgeExceeded", "Stopped"]
_CONDITIONS: dict[TaskPhase, Condition] = {
    TaskPhase.Succeeded: "Success",
    TaskPhase.Failed: "RetriesExhausted",
    TaskPhase.Expired: "EventAgeExceeded",
}
IN_PLACE_ATTEMPTS = 4


class DestinationUndeliverable(Exception):
    pass


def target_problem(account: str, dest: Destination) -> str | None:
    """Why an account may not deliver to `dest` whatever is registered; None when it may."""
    if dest.kind is DestinationKind.subject:
        return grammar.subject_destination_problem(account, dest.target)
    if dest.kind is DestinationKind.function and not grammar.is_name(dest.target):
        return f"destination function {dest.target!r} is not a valid name"
    return None


def config_problem(
    cfg: AsyncConfig,
    function: Callable[[str, str], TaskFunction | None] | None = None,
    denied_networks: tuple[Network, ...] = (),
) -> str | None:
    """Why an AsyncConfig's destinations are refused (422 in the API, a condition on
    Kubernetes); None when they are acceptable. With `function`, a destination function must
    also be registered (the API's rule; on Kubernetes it may come later). A webhook written
    as an address in `denied_networks` would never be called (`webhooks.py` refuses it at
    each delivery), so it is refused now; a name is resolved only at delivery."""
    dests = cfg.spec.destinationConfig
    for dest in (dests.onSuccess, dests.onFailure):
        if dest is None:
            continue
        problem = target_problem(cfg.account, dest)
        if problem is not None:
            return problem
        if dest.kind is DestinationKind.webhook:
            host = urlsplit(dest.target).hostname or ""
            net = denied(host, denied_networks)
            if net is not None:
                return (
                    f"webhook destination {dest.target!r}: {host} is in a denied network "
                    f"({net}, KUBETASK_WEBHOOK_DENIED_NETWORKS); it would never be called"
                )
        if (
            function is not None
            and dest.kind is DestinationKind.function
            and function(cfg.account, dest.target) is None
        ):
            return f"destination function {dest.target!r} is not registered in {cfg.account!r}"
    return None


def build_record(ctx: TaskContext) -> DestinationRecord:
    task = ctx.record.task
    status = task.status
    condition = _CONDITIONS[status.phase]
    ok = status.phase is TaskPhase.Succeeded
    return DestinationRecord(
        timestamp=status.timestamps.finished or now(),
        requestContext=RequestContext(
            requestId=task.id,
            functionArn=names.function_arn(task.account, task.spec.function),
            condition=condition,
            approximateInvokeCount=status.attempts,
        ),
        requestPayload=task.spec.payload,
        # As Lambda reports an async invocation: the function was invoked (200) and failed
        # (`functionError`); only a task that never ran has no invocation to report.
        responseContext=ResponseContext(
            statusCode=200 if ok or status.attempts else 500,
            functionError=None if ok else ("Unhandled" if status.attempts else condition),
        ),
        responsePayload=status.result if ok else failure_payload(status),
    )


def failure_payload(status: TaskStatus) -> dict[str, Any]:
    """Lambda's error shape, plus the evidence a process leaves: exit code and output tails."""
    message = (status.error or "").split("\n", 1)[0]
    if status.timestamps.started is None:
        kind = "EventAgeExceeded"
    elif message.startswith("timed out"):
        kind = "Timeout"
    elif status.exitCode is not None:
        kind = "ExitCode"
    else:
        kind = "Error"
    return {
        "errorMessage": message,
        "errorType": kind,
        "exitCode": status.exitCode,
        "stdoutTail": status.stdoutTail,
        "stderrTail": status.stderrTail,
    }


class Destinations(Policy):
    def __init__(self) -> None:
        self._webhooks: Webhooks | None = None
        self._nc: jetstream.Connection | None = None
        self._connecting = asyncio.Lock()

    async def _publisher(self, plane: DataPlane) -> tuple[jetstream.Connection, JetStreamContext]:
        """The connection subject destinations go out on: as the `destinations` NATS user,
        which may publish only into accounts' `out.` namespaces, so even a rule this module
        missed could not reach the platform's subjects. Without configured credentials (NATS
        without users) it is the dispatcher's own."""
        settings = plane.settings
        if not settings.destinations_user:
            return plane.nc, plane.js
        async with self._connecting:
            if self._nc is None:
                self._nc = await jetstream.connect(
                    settings,
                    "kubetask-destinations",
                    settings.destinations_user,
                    settings.destinations_password,
                )
        return self._nc, self._nc.jetstream(timeout=10)

    async def on_terminal(self, ctx: TaskContext) -> None:
        phase = ctx.record.phase
        if phase not in _CONDITIONS:
            return
        cfg = ctx.config.destinationConfig
        dest = cfg.onSuccess if phase is TaskPhase.Succeeded else cfg.onFailure
        if dest is None:
            return
        record = build_record(ctx)
        delay = 0.25
        for attempt in range(IN_PLACE_ATTEMPTS):
            try:
                await self._deliver(ctx, dest, record)
                return
            except WebhookRefused as err:
                # Asking again cannot help; the task's log says why no record came.
                DESTINATION_FAILURES.labels(ctx.account, ctx.function.name).inc()
                self._say(ctx, f"its webhook was not called: {err}")
                return
            except Exception as err:
                DESTINATION_FAILURES.labels(ctx.account, ctx.function.name).inc()
                if attempt == IN_PLACE_ATTEMPTS - 1:
                    raise DestinationUndeliverable(
                        f"{dest.kind.value} {dest.target}: {err}"
                    ) from err
                await asyncio.sleep(delay)
                delay *= 2

    async def _deliver(
        self, ctx: TaskContext, dest: Destination, record: DestinationRecord
    ) -> None:
        body = record.model_dump(mode="json")
        task_id = ctx.task_id
        suffix = "-on-success" if record.requestContext.condition == "Success" else "-on-failure"
        if dest.kind is DestinationKind.function:
            await self._submit(
                ctx, dest.target, destination_chains.chained_id(task_id, suffix), body
            )
        elif dest.kind is DestinationKind.subject:
            problem = target_problem(ctx.account, dest)
            if problem is not None:  # stored before the rule existed, or written around the API
                raise DestinationUndeliverable(problem)
            data = json.dumps(body).encode()
            nc, js = await self._publisher(ctx.plane)
            try:
                await js.find_stream_name_by_subject(dest.target)
            except NotFoundError:
                await nc.publish(dest.target, data)
                await nc.flush()
                return
            await js.publish(
                dest.target, data, headers={"Nats-Msg-Id": f"{ctx.account}.{task_id}{suffix}"}
            )
        else:
            if self._webhooks is None:
                self._webhooks = Webhooks(ctx.plane.settings.webhook_denied_networks)
            headers = {"X-Kubetask-Task-Id": task_id, "X-Kubetask-Account": ctx.account}
            status = await self._webhooks.post(ctx.account, dest.target, body, headers)
            if not 200 <= status < 300:
                raise DestinationUndeliverable(f"webhook answered HTTP {status}")

    async def _submit(self, ctx: TaskContext, target: str, task_id: str, body: Any) -> None:
        fn = ctx.plane.registry.function(ctx.account, target)
        if fn is None:
            raise DestinationUndeliverable(f"function {target!r} is not registered")
        source = ctx.record.task
        if destination_chains.depth(source) >= destination_chains.MAX_DEPTH:
            deep = destination_chains.MAX_DEPTH
            self._say(ctx, f"its record was not sent to function {target}: the task is the "
                      f"last of {deep} destinations in a row (a loop?)")  # fmt: skip
            return
        annotations = destination_chains.annotate(source)
        try:
            await submission.submit(ctx.plane, fn, task_id, body, annotations)
        except TaskExists as taken:
            if not destination_chains.carries(taken.existing.record.task, source, target):
                self._say(ctx, f"its record was not sent to function {target}: task id "
                          f"{task_id} is another task's")  # fmt: skip

    @staticmethod
    def _say(ctx: TaskContext, what: str) -> None:
        """Into the task's final log line."""
        ctx.note = f"{ctx.note}; {what}" if ctx.note else what

    async def close(self) -> None:
        if self._webhooks is not None:
            await self._webhooks.close()
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()
