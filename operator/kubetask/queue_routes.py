"""The platform's queue assignment for `auto` functions: the account's shared stream by default
(the small accounts' stream for an account listed as small, `queue_moves.Mover._place`), a
stream of its own while the function's backlog would crowd its neighbours, and back again after
it has been idle a while.

Why move at all: the functions of an account share one stream, each with a consumer filtered to
its subject. A function with tens of thousands of tasks waiting makes that stream large; its
neighbours' consumers then skip past its messages and every stream-wide operation costs more.
A stream of its own isolates that cost, and costs a stream while it exists, hence recycling.

- **dedicate** when the function's waiting tasks reach `dedicate_backlog` and the stream it
  shares (its account's, or the small accounts') has other functions in it;
- **recycle** once the dedicated stream has held nothing, waiting or running, for
  `recycle_after` seconds. The gap between the two (tens of thousands waiting vs. empty for
  minutes) is the hysteresis: a function at the threshold does not flap.

An assignment is a key in the `kt_routes` bucket, written with compare-and-set, so any number of
gateways may run this loop: one wins each change and moves the backlog (`queue_moves.py`); every
gateway and dispatcher follows the change through its registry mirror within a second. The new
queue exists before the assignment is written, a running task finishes where it started, and a
moved task spends no attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from . import metrics, names, queues
from .models import QueueAssignment, QueueMode, TaskFunction, TaskFunctionStatus
from .plane import DataPlane
from .settings import env_float, env_int
from .store import now

# A small account's function gets its assignment written just before the function itself, so
# a route without a function is stale only once it is older than a registration can take.
# Without this, another gateway's sweep in between took the new function off the shared stream.
REGISTERING_SECONDS = 60.0

log = logging.getLogger("kubetask.queues")


@dataclass(frozen=True)
class RouteSettings:
    dedicate_backlog: int = field(
        default_factory=lambda: env_int("KUBETASK_DEDICATE_BACKLOG", 10_000, 1)
    )
    recycle_after: float = field(
        default_factory=lambda: env_float("KUBETASK_RECYCLE_AFTER", 600.0, 1)
    )
    period: float = field(default_factory=lambda: env_float("KUBETASK_ROUTE_PERIOD", 5.0, 0.1))


class Router:
    def __init__(self, plane: DataPlane, settings: RouteSettings | None = None) -> None:
        self.plane = plane
        self.settings = settings or RouteSettings()
        self._idle_since: dict[tuple[str, str], float] = {}

    async def run(self) -> None:
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # NATS away for a moment: the next sweep tries again
                log.warning("queue assignment sweep failed: %s", err)
            await asyncio.sleep(self.settings.period)

    async def sweep(self) -> None:
        """One pass, reading every stream's depth from the stream list: the functions of a
        shared stream are looked at only when the stream holds a dedicating backlog at all, and
        then only those whose own subject holds one (one request for the whole stream), so ten
        thousand idle functions cost a request or two, not ten thousand."""
        registry = self.plane.registry
        depths = await queues.stream_depths(self.plane.rpc)
        for stream, members in list(registry.by_stream().items()):
            first, queue = members[0]
            if queue.shared:
                # The depth first: the functions of an idle stream are not even looked at.
                if len(members) < 2 or depths.get(stream, 0) < self.settings.dedicate_backlog:
                    continue
                held = await queues.held_by_subject(self.plane.js, members)
                for fn, _ in members:
                    if (
                        names.routed(fn.spec)
                        and held[(fn.account, fn.name)] >= self.settings.dedicate_backlog
                    ):
                        await self._maybe_dedicate(fn)
            elif queue.partition is None and names.routed(first.spec):  # a stream of its own
                await self._maybe_recycle(first)
        for (account, name), (route, revision) in list(registry.routes.items()):
            current = registry.function(account, name)
            if current is None and (now() - route.since).total_seconds() < REGISTERING_SECONDS:
                continue  # written just before its function (`queue_moves._place`)
            if current is None or not names.routed(current.spec):
                await registry.unassign_queue(account, name, revision)  # stale: nothing moves

    async def _maybe_dedicate(self, fn: TaskFunction) -> None:
        limit = self.plane.settings.account_max_own_queues
        if self.plane.registry.account_use(fn.account).own_queues >= limit:
            return  # its account holds all the streams of its own it may: it stays shared
        with contextlib.suppress(Exception):  # a consumer being replaced has no backlog yet
            waiting, _ = await queues.backlog(self.plane.js, fn)
            if waiting >= self.settings.dedicate_backlog:
                reason = (
                    f"{waiting} tasks waiting in the shared queue {names.queue_label(fn)} (at"
                    f" least {self.settings.dedicate_backlog}): a queue of its own keeps its"
                    " backlog out of its neighbours' way"
                )
                await self._assign(fn, QueueMode.dedicated, reason)

    async def _maybe_recycle(self, fn: TaskFunction) -> None:
        key = (fn.account, fn.name)
        try:
            waiting, inflight = await queues.backlog(self.plane.js, fn)
        except Exception:
            return
        if waiting or inflight:
            self._idle_since.pop(key, None)
            return
        idle_since = self._idle_since.setdefault(key, time.monotonic())
        if time.monotonic() - idle_since >= self.settings.recycle_after:
            small = self.plane.settings.small_account(fn.account)
            await self._assign(fn, QueueMode.shared if small else QueueMode.account, "idle")
            self._idle_since.pop(key, None)

    async def _assign(self, fn: TaskFunction, mode: QueueMode, reason: str) -> None:
        """Create the new queue, write the assignment (unless another gateway changed it first),
        then move what waits in the old queue. Back to the account's stream is no assignment."""
        registry = self.plane.registry
        route = registry.routes.get((fn.account, fn.name))
        if route is None and mode is QueueMode.account:
            return  # there already
        assignment = QueueAssignment(mode=mode, reason=reason, since=now())
        if mode is QueueMode.account:
            target = fn.model_copy(update={"status": None})
        else:
            status = TaskFunctionStatus(queueAssignment=assignment)
            target = fn.model_copy(update={"status": status})
        await queues.ensure_function_queue(self.plane.js, target, self.plane.settings)
        if route is None:
            if not await registry.assign_queue(fn.account, fn.name, assignment):
                return
        elif mode is QueueMode.account:
            if not await registry.unassign_queue(fn.account, fn.name, route[1]):
                return
        elif not await registry.reassign_queue(fn.account, fn.name, assignment, route[1]):
            return
        log.info("queue of %s/%s -> %s: %s", fn.account, fn.name, names.queue_label(target), reason)
        metrics.QUEUE_MOVES.labels(fn.account, fn.name, mode.value).inc()
        metrics.of(metrics.DEDICATED, fn.account, fn.name).set(
            1 if mode is QueueMode.dedicated else 0
        )
        self.plane.mover.start(target, names.queues_of(fn))
