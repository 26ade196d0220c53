"""Consume every function's queue, claim tasks with compare-and-set and run them.

One worker per function pulls from the function's durable consumer only as many messages as it
has free slots; the consumer's max_ack_pending enforces the function's concurrency across all
dispatchers. A claimed message is kept alive with heartbeats (`in_progress`) while its attempt
runs, so if this process dies JetStream hands the message to another dispatcher after
`ack_wait`, which takes the task over (the kernel has already killed our attempt: executors
die with their parent).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from nats.aio.msg import Msg

from .. import jetstream, metrics, names, quarantine, queues
from ..cancellation import cancel_and_wait
from ..executors import (
    CommandExecutor,
    Execution,
    Executor,
    FunctionUsers,
    Invocation,
    JobExecutor,
    Outcome,
    Placement,
    ServerExecutor,
    WarmPodExecutor,
)
from ..fairness import DISPATCH_LEAST_PER_ACCOUNT, Fairness
from ..logs import LogWriter
from ..models import ExecutorRef, TaskFunction, TaskPhase
from ..plane import DataPlane
from ..registrant import registered_by
from ..states import TERMINAL, WAITING, IllegalTransition
from ..store import (
    Mutation,
    StaleRecord,
    TaskGone,
    TaskRecord,
    Unreadable,
    Versioned,
    new_token,
    now,
)
from ..tallies import count_down, count_up
from . import backlog_gauge, hold_answers, idle_consumers, outcome_patience, pod_identity
from .account_concurrency import AccountConcurrency, NoPart
from .accounting import Accounting
from .aimd import Window
from .destinations import Destinations
from .leases import Leases, member_key
from .log_budget import LogBudget
from .log_pacing import LogPacing
from .max_age import MaxEventAge
from .node_budget import NodeBudget
from .placement import Placements
from .pod_identity import executor_ref
from .policy import Policy, Retry, TaskContext
from .pull import Pull
from .retries import Retries
from .share_lending import Counted
from .start_rate import StartRate
from .store_hold import StoreHold

log = logging.getLogger("kubetask.dispatcher")

# How long a message may wait for its record to appear (see `_record_for`).
RECORD_GRACE = 10.0
# A terminal step (destinations) that keeps failing is retried this often, then dropped.
MAX_FINALIZE_DELIVERIES = 50
FINALIZE_RETRY_DELAY = 30.0
# An attempt still running after this long gets its "started" log line; a quicker one is told in
# its final line instead, which saves a log message on every millisecond task.
ANNOUNCE_AFTER = 0.25


def default_policies() -> list[Policy]:
    return [MaxEventAge(), Retries(), Destinations(), Accounting()]


class Heartbeat:
    """Tell JetStream every `interval` that a claimed message is still being worked on. A timer,
    not a task: most attempts end long before the first beat, and then it costs nothing."""

    def __init__(self, msg: Msg, interval: float) -> None:
        self.msg = msg
        self.interval = interval
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_later(interval, self._beat)
        self._sending: set[asyncio.Task[None]] = set()

    def _beat(self) -> None:
        task = self._loop.create_task(self.msg.in_progress())
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)
        self._timer = self._loop.call_later(self.interval, self._beat)

    def cancel(self) -> None:
        self._timer.cancel()


@dataclass
class Slot:
    """A task this dispatcher is working on; a stop request may arrive before it has started."""

    stop_requested: bool = False
    execution: Execution | None = None
    announced: bool = False  # the attempt's "started" line is in the log


# A worker consumes one queue of one function: (account, function, stream).
WorkerKey = tuple[str, str, str]


def _runs_differently(old: TaskFunction, new: TaskFunction) -> bool:
    """What its attempts are started from: the spec, and whose rights they run with (an admin
    registering a tenant's function again changes only that)."""
    return old.spec != new.spec or registered_by(old) != registered_by(new)


@dataclass
class FunctionWorker:
    fn: TaskFunction
    queue: names.Queue
    task: asyncio.Task[None] | None = None
    inflight: set[asyncio.Task[None]] = field(default_factory=set)
    pull: Pull | None = None
    window: Window = field(init=False)
    rate: StartRate | None = None
    process: bool = False  # its attempts are processes here, in the node's process budget

    def __post_init__(self) -> None:
        # Only a warm instance can answer busy (`aimd.py`).
        self.window = Window(self.fn.spec.maxConcurrency, probing=self.fn.spec.server is not None)

    def wake(self) -> None:
        if self.pull is not None:
            self.pull.wake()


class Dispatcher:
    def __init__(
        self,
        plane: DataPlane,
        policies: list[Policy] | None = None,
        own_ports: tuple[int, ...] = (),
    ) -> None:
        """`own_ports`: where this process listens (its metrics), which no tenant's function
        may answer on (`platform_ports.py`)."""
        self.plane = plane
        self.own_ports = own_ports
        self.policies = policies if policies is not None else default_policies()
        self.host = socket.gethostname()
        self.id = f"{self.host}-{os.getpid()}-{secrets.token_hex(2)}"
        self.executor_ref = executor_ref(self.id, self.host)  # what each attempt records
        # Processes here, or on Kubernetes pods: a Job per attempt of a `command` function (whose
        # pods take nothing of this node's process budget), a `server` function's warm pods.
        self.jobs = plane.settings.executor == "kubernetes"
        self.users = FunctionUsers()
        # On Kubernetes no pod is made in the platform's namespace (`reserved_namespaces.py`).
        platform = pod_identity.namespace()
        self.command: Executor = (
            JobExecutor(platform=platform) if self.jobs else CommandExecutor(self.users)
        )
        self.logs = LogWriter(plane.nc, plane.store.retention.headers)
        self.consumers = idle_consumers.Consumers(plane.js, plane.settings)
        self.workers: dict[WorkerKey, FunctionWorker] = {}
        # The streams each function has workers on, so a change looks at its own workers only.
        self._streams: dict[tuple[str, str], set[str]] = {}
        self.slots: dict[tuple[str, str], Slot] = {}
        # Tasks whose attempt ended while NATS was away, their outcome not yet recorded.
        self.unrecorded: set[tuple[str, str]] = set()
        self.fairness = Fairness(
            plane.settings.fair_share(
                plane.settings.dispatch_fair_slots,
                least_per_account=DISPATCH_LEAST_PER_ACCOUNT,
                lend_after=plane.settings.dispatch_lend_after,
            )
        )
        # Looked up on each call, so a test that puts in a Fairness of its own is followed.
        self.budget = NodeBudget(
            weight=lambda account: self.fairness.weight(account),
            active=lambda: self.fairness.active() if self.fairness.settings.enabled else [],
            shared=lambda: self.fairness.settings.enabled and self.shared(),
            least=DISPATCH_LEAST_PER_ACCOUNT,
        )
        # Functions with workers here, by account (`shared`).
        self._functions_here: dict[str, int] = {}
        me = member_key(self.id)
        self.concurrency = AccountConcurrency(
            plane.settings.concurrency_limit,
            lambda: self.leases.members() if self.leases is not None else (me,),
            me,
            lambda account: self.leases is not None and self.leases.holds_any_of(account),
        )
        # Starts held while JetStream's storage is nearly full (`store_hold.py`).
        self.store_hold = StoreHold(plane)
        settings = self.plane.settings
        self.log_pacing = LogPacing(
            settings.account_log_rate, settings.account_log_burst, settings.dispatcher_log_rate
        )
        self.server: Executor = (
            WarmPodExecutor(platform)
            if self.jobs
            else ServerExecutor(self.budget.settings.instances, self.users)
        )
        self._closing = False
        self._background: list[asyncio.Task[None]] = []
        self.placements = Placements(plane.store, self.id, self.host)
        self.leases: Leases | None = None

    async def start(self) -> None:
        await self.store_hold.room.read()  # before anything starts
        if not self.jobs:
            self.users.announce(self.plane.settings.nats_url, self.own_ports)
        kv = await self.plane.js.key_value(names.LEASES_BUCKET)
        registry = self.plane.registry
        self.leases = Leases(
            kv,
            registry,
            self.id,
            self.plane.settings.lease_ttl,
            self._sync_partitioned,
            lambda: self.concurrency.rebalanced(),  # looked up then: tests put in their own
        )
        await self.leases.start()
        registry.on_function_change(self._sync)
        for (account, name), fn in list(registry.functions.items()):
            self._sync(account, name, fn)
        await self.plane.nc.subscribe(f"{names.STOP_SUBJECT_PREFIX}.>", cb=self._on_stop)
        await hold_answers.listen(self)
        self._background.append(
            asyncio.create_task(backlog_gauge.collect_forever(self.plane, self._rouse))
        )
        self._background.append(asyncio.create_task(self.store_hold.room.run()))

    # -- function workers ------------------------------------------------------------------

    def _consumes(self, fn: TaskFunction, queue: names.Queue) -> bool:
        """Every dispatcher consumes a function's one queue; a partition only its lessee."""
        if queue.partition is None:
            return True
        return self.leases is not None and self.leases.holds(fn, queue.partition)

    def _sync_partitioned(self) -> None:
        """Leases changed: only partitioned functions' workers depend on them."""
        for fn in list(self.plane.registry.partitioned()):
            self._sync(fn.account, fn.name, fn)

    def shared(self) -> bool:
        """Functions of more than one account run here."""
        return len(self._functions_here) > 1

    def _sync(self, account: str, name: str, fn: TaskFunction | None) -> None:
        """Run a worker for each of the function's queues this dispatcher consumes, and no
        other. A changed function gets new workers (its queues or limits may have moved);
        attempts the old ones started run on to the end, counted against the new ones' slots."""
        was_here = (account, name) in self._streams
        self._sync_workers(account, name, fn)
        here = (account, name) in self._streams
        if here and not was_here:
            count_up(self._functions_here, account)
        elif was_here and not here:
            count_down(self._functions_here, account)

    def _sync_workers(self, account: str, name: str, fn: TaskFunction | None) -> None:
        wanted = {}
        if fn is not None and not self._closing:
            wanted = {q.stream: q for q in names.queues_of(fn) if self._consumes(fn, q)}
        inherited: list[asyncio.Task[None]] = []
        streams = self._streams.setdefault((account, name), set())
        for stream in list(streams):
            worker = self.workers[(account, name, stream)]
            if fn is None or stream not in wanted or _runs_differently(worker.fn, fn):
                if worker.task is not None:
                    worker.task.cancel()
                del self.workers[(account, name, stream)]
                streams.discard(stream)
                inherited += worker.inflight
        if not streams and not wanted:
            del self._streams[(account, name)]
        for stream, queue in wanted.items():
            if (account, name, stream) not in self.workers:
                assert fn is not None
                self._start_worker(fn, queue, inherited)
                inherited = []

    def _start_worker(
        self, fn: TaskFunction, queue: names.Queue, inherited: list[asyncio.Task[None]]
    ) -> None:
        worker = FunctionWorker(fn, queue, inflight=set(inherited))

        def finished(task: asyncio.Task[None]) -> None:
            worker.inflight.discard(task)
            worker.wake()

        for task in inherited:
            task.add_done_callback(finished)
        worker.task = asyncio.create_task(
            self._consume(worker), name=f"consume-{fn.account}-{fn.name}-{queue.stream}"
        )
        self.workers[(fn.account, fn.name, queue.stream)] = worker
        self._streams.setdefault((fn.account, fn.name), set()).add(queue.stream)

    async def _consume(self, worker: FunctionWorker) -> None:
        fn = worker.fn
        stream, consumer = worker.queue.stream, worker.queue.consumer
        key = (fn.account, fn.name, stream)
        settings = self.plane.settings
        while True:
            # The queue is created by whoever registers the function (gateway or operator), before
            # registering it; a dispatcher only binds, or re-creates a consumer nats-server
            # removed while the function was idle.
            try:
                dozing = await self.consumers.bind(fn, worker.queue)
                break
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("cannot bind to queue of %s/%s: %s; retrying", fn.account, fn.name, err)
                await asyncio.sleep(1)
        window = worker.window
        gauge = metrics.of(metrics.WINDOW, fn.account, fn.name)
        process = worker.process = self._local_process(fn)
        rate = worker.rate = self._start_rate(fn, worker.queue)

        def free() -> int:
            window.judge(len(worker.inflight))
            gauge.set(window.allowed())
            if self._closing:
                return 0
            allowed = window.allowed() - len(worker.inflight)
            for fair in (
                self.fairness.free(fn.account, worker.wake),
                self.fairness.most_at_once(fn.account),
                self.concurrency.free(fn.account, worker.wake),
                self.store_hold.free(worker.wake),
            ):
                if fair is not None:
                    allowed = min(allowed, fair)
            if rate is not None and allowed > 0:
                allowed = min(allowed, rate.room(worker.wake))
            if allowed <= 0:
                return 0
            return min(allowed, self.budget.room(fn.account, process, worker.wake))

        def deliver(msg: Msg) -> None:
            counted = Counted(self.fairness, fn.account)
            ended = self.concurrency.delivered_one(fn.account)
            if rate is not None:
                rate.take()
            if self._closing:  # delivered while the pull was being stopped: hand it back
                t = asyncio.create_task(msg.nak())
            else:
                t = asyncio.create_task(self._handle_cut_off(fn, msg))
            worker.inflight.add(t)
            t.add_done_callback(functools.partial(self._done, worker.inflight, key, counted, ended))

        worker.pull = Pull(
            self.plane.nc,
            stream,
            consumer,
            free,
            deliver,
            idle_expires=settings.pull_idle_expires,
            watch=worker.queue.subject,
            revive=self.consumers.reviver(fn, worker.queue),
        )
        try:
            await worker.pull.start(dozing)
            await asyncio.Future()  # messages arrive on the pull's callback until cancelled
        finally:
            if rate is not None:
                rate.close()
            await worker.pull.stop()

    def _start_rate(self, fn: TaskFunction, queue: names.Queue) -> StartRate | None:
        """The function's `maxStartsPerSecond` as this worker's share (`start_rate.py`)."""
        per_second = fn.spec.maxStartsPerSecond
        if per_second is None:
            return None
        if queue.partition is not None:
            partitions = fn.spec.partitions
            return StartRate(per_second, lambda: partitions)
        leases = self.leases
        return StartRate(per_second, lambda: leases.dispatchers() if leases is not None else 1)

    def _rouse(self, account: str, name: str, stream: str) -> None:
        """The backlog gauge found tasks in a function's queue that no publish announced."""
        worker = self.workers.get((account, name, stream))
        if worker is not None and worker.pull is not None:
            worker.pull.rouse()

    def _done(
        self,
        inflight: set[asyncio.Task[None]],
        key: WorkerKey,
        counted: Counted,
        ended: Callable[[], None],
        task: asyncio.Task[None],
    ) -> None:
        inflight.discard(task)
        counted.end()
        ended()
        worker = self.workers.get(key)  # the queue's current worker: it has a slot free
        if worker is not None and worker.pull is not None:
            worker.pull.wake()
        if not task.cancelled() and task.exception() is not None:
            log.error("task handler crashed", exc_info=task.exception())

    # -- one message ------------------------------------------------------------------------

    async def _handle_cut_off(self, fn: TaskFunction, msg: Msg) -> None:
        """Handle the message; if NATS goes away meanwhile, hand it back as soon as NATS is
        there again (the nak waits in the connection's buffer) rather than after `ack_wait`.
        The record is the truth, so whatever step was cut short is decided again."""
        try:
            await self._handle(fn, msg)
        except jetstream.UNAVAILABLE as err:
            log.warning("lost NATS while handling %s (%s); handing it back", msg.subject, err)
            with contextlib.suppress(Exception):
                await msg.nak(delay=0.5)

    async def _handle(self, fn: TaskFunction, msg: Msg) -> None:
        dequeued = now()
        try:
            ref = queues.QueuedRef.decode(msg.data)
            if ref.account != fn.account:
                raise ValueError(f"names account {ref.account!r} in {fn.account!r}'s queue")
            carried = None
            if ref.record is not None and ref.revision is not None:
                record = TaskRecord.model_validate_json(ref.record)
                carried = Versioned(record, ref.revision, ref.record)
        except (ValueError, KeyError, TypeError) as err:
            await self._quarantine(msg, quarantine.describe(err))
            return
        seq = int(msg.metadata.sequence.stream)
        try:
            if carried is not None:
                # A first message brings the record as created: decide on it, and write (claim,
                # or drop) only if it is still the stored revision, which saves reading it. If
                # it is not, nothing was done yet: decide again on what is stored now.
                with contextlib.suppress(StaleRecord):
                    await self._dispatch(fn, msg, ref, seq, dequeued, carried, reread=False)
                    return
            current = await self._record_for(ref, msg, dequeued)
            if current is not None:
                await self._dispatch(fn, msg, ref, seq, dequeued, current)
        except Unreadable as err:
            await self._quarantine(msg, f"its task's record is unreadable: {err}")

    async def _quarantine(self, msg: Msg, reason: str) -> None:
        """Set an undecodable message aside and terminate it: never redelivered, so it holds no
        slot and cannot crash a dispatcher again."""
        seq = msg.metadata.sequence.stream
        poison = quarantine.Poison("queue", msg.subject, msg.data, reason, f"queue.{seq}")
        await quarantine.keep(self.plane.js, poison)
        await msg.term()

    async def _dispatch(
        self,
        fn: TaskFunction,
        msg: Msg,
        ref: queues.QueuedRef,
        seq: int,
        dequeued: datetime,
        current: Versioned,
        reread: bool = True,
    ) -> None:
        """Act on a message given the task's record. Without `reread` (a record that came with
        the message) the first write raises `StaleRecord` if the record changed meanwhile, and
        nothing may have been done before it."""
        if current.record.token != ref.token:
            await msg.ack()  # a stale copy superseded by a retry/resume
            return
        here = (ref.account, ref.task_id)
        if here in self.slots or here in self.unrecorded:
            # Delivered again while its attempt starts, runs or ends here (a hand-back that
            # reached the server late). Whatever record came with it, nothing was lost: the
            # attempt acks the message when it ends. Taking it up would also have replaced
            # the running attempt's slot.
            return
        record = current.record
        phase = record.phase
        ctx = TaskContext(
            self.plane, fn, self.plane.registry.async_config(fn.account, fn.name), record, dequeued
        )
        if phase in TERMINAL:
            if record.claimSeq == seq:
                await self._finalize(ctx, msg)  # we crashed between recording and finishing it
            else:
                await msg.ack()
            return
        if phase is TaskPhase.Paused:
            await msg.ack()  # resume publishes afresh
            return
        if phase in (TaskPhase.Running, TaskPhase.Stopping) and record.claimSeq != seq:
            await msg.ack()  # a duplicate of the message another dispatcher is working on
            return
        if phase is TaskPhase.Stopping:  # its dispatcher died while stopping it
            await self._end(ctx, msg, current, TaskPhase.Stopped, "stopped")
            return
        takeover = phase is TaskPhase.Running
        for policy in self.policies:
            drop = await policy.on_dequeue(ctx)
            if drop is not None:
                ctx.note = f"dropped unrun: {drop.reason}"
                await self._end(ctx, msg, current, drop.phase, drop.reason, reread=reread)
                return
        if takeover:
            lost = f"attempt {record.task.status.attempts} lost: its dispatcher stopped responding"
            self._log(record, "system", lost)
            if record.task.status.attempts > ctx.config.maxAsyncRetryAttempts:
                await self._end(ctx, msg, current, TaskPhase.Failed, lost)
                return
        await self._run(ctx, msg, current, seq, reread)

    async def _record_for(
        self, ref: queues.QueuedRef, msg: Msg, dequeued: datetime
    ) -> Versioned | None:
        """The task's record. It is written before its message is published (submission.py),
        but a direct get may be answered by a replica a moment behind the leader, so a missing
        record is looked for again a few times, then the message is handed back to look later.
        A message whose record never appears belongs to a submission that was taken back (its
        publish failed) or to a deleted task, and is dropped after RECORD_GRACE."""
        for pause in (0.001, 0.002, 0.004, 0.008, 0.016, 0.0):
            current = await self.plane.store.get(ref.account, ref.task_id)
            if current is not None:
                return current
            if (dequeued - msg.metadata.timestamp).total_seconds() >= RECORD_GRACE:
                await msg.ack()
                return None
            await asyncio.sleep(pause)
        await msg.nak(delay=0.25)
        return None

    async def _run(
        self, ctx: TaskContext, msg: Msg, current: Versioned, seq: int, reread: bool
    ) -> None:
        """Claim and run the task within its account's concurrency limit and the node's
        budget; a task that waits for a place stays Queued, its message kept alive meanwhile."""
        process = self._local_process(ctx.function)
        budget, limit = self.budget, self.concurrency
        if not limit.try_take(ctx.account):
            try:
                await self._held(msg, limit.wait(ctx.account))
            except NoPart:
                await msg.nak(delay=0.25)  # to a dispatcher with a part of the account's limit
                return
        try:
            if not budget.try_take(ctx.account, process):
                await self._held(msg, budget.wait(ctx.account, process))
            try:
                await self._claim_and_run(ctx, msg, current, seq, reread)
            finally:
                budget.release(ctx.account, process)
        finally:
            limit.release(ctx.account)

    async def _held(self, msg: Msg, place: Awaitable[None]) -> None:
        """Wait for `place`, the message kept alive meanwhile."""
        waiting = Heartbeat(msg, max(self.plane.settings.ack_wait / 3, 0.2))
        try:
            await place
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await msg.nak()  # shutting down: the next dispatcher takes it
            raise
        finally:
            waiting.cancel()

    async def _claim_and_run(
        self, ctx: TaskContext, msg: Msg, current: Versioned, seq: int, reread: bool
    ) -> None:
        key = (ctx.account, ctx.task_id)
        slot = self.slots[key] = Slot()
        try:
            try:
                claimed = await self.plane.store.transition(
                    ctx.account,
                    ctx.task_id,
                    self._claim(current.record.token, seq, ctx),
                    current,
                    in_place=True,
                    reread=reread,
                )
            except (IllegalTransition, TaskGone):
                await msg.ack()  # paused, stopped or deleted meanwhile
                return
            ctx.record = claimed.record
            status = claimed.record.task.status
            if status.attempts == 1 and status.timestamps.submitted and status.timestamps.started:
                metrics.of(metrics.SUBMIT_TO_START, ctx.account, ctx.function.name).observe(
                    (status.timestamps.started - status.timestamps.submitted).total_seconds()
                )
            try:
                outcome = await self._attempt(ctx, msg, slot, status.attempts)
            except asyncio.CancelledError:
                # Shutting down: hand the task straight back; the next dispatcher takes it over.
                with contextlib.suppress(Exception):
                    await msg.nak()
                raise
        finally:
            self.slots.pop(key, None)
        worker = self.workers.get((ctx.account, ctx.function.name, msg.metadata.stream))
        if worker is not None:
            worker.window.done(outcome.busy)
        try:
            await self._record_outcome(ctx, msg, claimed, outcome, slot)
        except jetstream.UNAVAILABLE:
            await self._record_when_nats_is_back(ctx, msg, claimed, outcome, slot)

    async def _record_when_nats_is_back(
        self, ctx: TaskContext, msg: Msg, claimed: Versioned, outcome: Outcome, slot: Slot
    ) -> None:
        """The attempt ended while NATS was away: its outcome is recorded once NATS is back,
        on the record as stored then (`outcome_patience.py`)."""
        seq = int(msg.metadata.sequence.stream)
        attempt = claimed.record.task.status.attempts

        async def record() -> None:
            current = await self.plane.store.get(ctx.account, ctx.task_id)
            if current is None:
                await msg.ack()  # deleted meanwhile
                return
            claim = outcome_patience.claim_of(current.record, seq, attempt)
            if claim is outcome_patience.Claim.OURS:
                await self._record_outcome(ctx, msg, current, outcome, slot)
            elif claim is outcome_patience.Claim.WRITTEN:
                await msg.nak(delay=0.5)  # the next delivery finishes what the write began

        heartbeat = Heartbeat(msg, max(self.plane.settings.ack_wait / 3, 0.2))
        self.unrecorded.add((ctx.account, ctx.task_id))
        try:
            await outcome_patience.keep_trying(record, self.plane.settings.ack_wait / 2)
        finally:
            self.unrecorded.discard((ctx.account, ctx.task_id))
            heartbeat.cancel()

    def _claim(self, token: str, seq: int, ctx: TaskContext) -> Mutation:
        def claim(r: TaskRecord) -> TaskRecord:
            ok = r.phase in WAITING or (r.phase is TaskPhase.Running and r.claimSeq == seq)
            if r.token != token or not ok:
                raise IllegalTransition(r.phase, TaskPhase.Running)
            st = r.task.status
            st.phase = TaskPhase.Running
            st.attempts += 1
            st.nextAttemptAt = None
            st.timestamps.enqueued = st.timestamps.enqueued or ctx.dequeued_at
            st.timestamps.dispatched = ctx.dequeued_at
            st.timestamps.started = now()
            st.timestamps.finished = None
            st.executor = (
                ExecutorRef(backend="kubernetes", dispatcher=self.id, host=self.host)
                if self.jobs
                else self.executor_ref.model_copy()
            )
            r.claimSeq = seq
            return r

        return claim

    async def _attempt(self, ctx: TaskContext, msg: Msg, slot: Slot, attempt: int) -> Outcome:
        fn = ctx.function
        rec = ctx.record

        def announce() -> None:
            if not slot.announced and slot.execution is not None:
                slot.announced = True
                started = f"attempt {attempt} started ({slot.execution.instance})"
                self._log(rec, "system", started, attempt)

        budget = LogBudget(self.plane.settings.log_rate, self.plane.settings.log_burst)

        def output(stream: str, text: str) -> None:
            announce()  # output follows the line that says where it runs
            if not budget.take(text):
                return
            if (dropped := budget.dropped()) is not None:
                self._log(rec, "system", dropped, attempt)
            self._log(rec, stream, text, attempt)

        inv = Invocation(
            account=ctx.account,
            task_id=ctx.task_id,
            attempt=attempt,
            function=fn,
            payload=rec.task.spec.payload,
            timeout=fn.spec.timeoutSeconds,
            max_result_bytes=self.plane.settings.max_result_bytes,
            log=output,
            # Only pods are learnt after the start: local attempts need no callback each.
            placed=functools.partial(self._placed, ctx, attempt) if self.jobs else None,
            pace=functools.partial(self.log_pacing.delay, ctx.account),
        )
        executor: Executor = self.command if fn.spec.command is not None else self.server
        labels = metrics.of(metrics.RUNNING, ctx.account, fn.name)
        labels.inc()
        heartbeat = Heartbeat(msg, max(self.plane.settings.ack_wait / 3, 0.2))
        loop = asyncio.get_running_loop()
        started = loop.time()
        announcing = loop.call_later(ANNOUNCE_AFTER, announce)
        try:
            try:
                execution = await executor.start(inv)
            except Exception as err:
                return Outcome(False, error=f"could not start: {err}")
            slot.execution = execution
            if slot.stop_requested:
                await execution.kill()
            try:
                return await execution.wait()
            except asyncio.CancelledError:
                await execution.kill()
                raise
            except Exception as err:
                log.exception("executor failed on %s/%s", ctx.account, ctx.task_id)
                await execution.kill()
                return Outcome(False, error=f"executor error: {err}", instance=execution.instance)
        finally:
            slot.execution = None  # the execution refers back to the slot through `output`
            if (dropped := budget.dropped(last=True)) is not None:
                self._log(rec, "system", dropped, attempt)
            announcing.cancel()
            heartbeat.cancel()
            labels.dec()
            metrics.of(metrics.EXECUTION, ctx.account, fn.name).observe(
                asyncio.get_running_loop().time() - started
            )

    async def _record_outcome(
        self, ctx: TaskContext, msg: Msg, claimed: Versioned, outcome: Outcome, slot: Slot
    ) -> None:
        if outcome.busy and not slot.stop_requested:
            await self._handed_back(ctx, msg, claimed, outcome)
            return
        attempt = claimed.record.task.status.attempts
        verdict = "succeeded" if outcome.ok else f"failed: {outcome.error}"
        where = "" if slot.announced or outcome.instance is None else f" ({outcome.instance})"
        # Written with the final line when the task ends here: one log message fewer per task.
        ctx.note = f"attempt {attempt}{where} {verdict}"
        if outcome.ok:
            await self._end(ctx, msg, claimed, TaskPhase.Succeeded, None, outcome)
            return
        if slot.stop_requested or outcome.killed:
            await self._end(ctx, msg, claimed, TaskPhase.Stopped, "stopped", outcome)
            return
        ctx.record = claimed.record
        retry: Retry | None = None
        for policy in self.policies:
            retry = retry or await policy.on_failure(ctx, outcome)
        if retry is None:
            await self._end(ctx, msg, claimed, TaskPhase.Failed, outcome.error, outcome)
            return
        self._log(ctx.record, "system", ctx.note, attempt)
        ctx.note = None
        await self._retry(ctx, msg, claimed, outcome, retry)

    async def _handed_back(
        self, ctx: TaskContext, msg: Msg, claimed: Versioned, outcome: Outcome
    ) -> None:
        """The executor answered busy: the task goes back to its queue as it was before the
        claim (the attempt is not counted) and comes back a moment later; the dispatch window
        has already been told."""
        metrics.of(metrics.BUSY, ctx.account, ctx.function.name).inc()

        def unclaim(r: TaskRecord) -> TaskRecord:
            st = r.task.status
            st.phase = TaskPhase.Queued
            st.attempts = max(0, st.attempts - 1)
            st.executor = None
            st.timestamps.started = None
            r.claimSeq = None
            return r

        with contextlib.suppress(IllegalTransition, TaskGone):
            await self.plane.store.transition(
                ctx.account, ctx.task_id, unclaim, claimed, in_place=True
            )
        await msg.nak(delay=0.05)

    async def _retry(
        self, ctx: TaskContext, msg: Msg, claimed: Versioned, outcome: Outcome, retry: Retry
    ) -> None:
        token = new_token()

        def retrying(r: TaskRecord) -> TaskRecord:
            if r.phase is TaskPhase.Stopping:
                return _finish(r, TaskPhase.Stopped, "stopped", outcome)
            st = r.task.status
            st.phase = TaskPhase.Retrying
            st.error = outcome.evidence()
            st.exitCode = outcome.exit_code
            st.stdoutTail, st.stderrTail = outcome.stdout_tail, outcome.stderr_tail
            st.nextAttemptAt = retry.at
            r.token = token
            return r

        try:
            updated = await self.plane.store.transition(
                ctx.account, ctx.task_id, retrying, claimed, in_place=True
            )
        except (IllegalTransition, TaskGone):
            await msg.ack()
            return
        if updated.record.phase is TaskPhase.Stopped:
            ctx.record = updated.record
            await self._finalize(ctx, msg)
            return
        ref = queues.QueuedRef(ctx.account, ctx.task_id, token)
        try:
            if retry.delay <= 0:
                await queues.enqueue(self.plane.rpc, ctx.function, ref)
            else:
                await queues.schedule(self.plane.js, ctx.function, ref, retry.at)
        except Exception as err:
            # The sweeper republishes overdue Retrying tasks, so this is not a loss.
            log.warning("could not schedule retry of %s/%s: %s", ctx.account, ctx.task_id, err)
        self._log(ctx.record, "system", f"retrying in {retry.delay:g}s")
        await msg.ack()

    async def _end(
        self,
        ctx: TaskContext,
        msg: Msg,
        current: Versioned,
        phase: TaskPhase,
        error: str | None,
        outcome: Outcome | None = None,
        reread: bool = True,
    ) -> None:
        seq = int(msg.metadata.sequence.stream)

        def end(r: TaskRecord) -> TaskRecord:
            target = TaskPhase.Stopped if r.phase is TaskPhase.Stopping else phase
            r.claimSeq = seq
            return _finish(r, target, "stopped" if target is TaskPhase.Stopped else error, outcome)

        try:
            updated = await self.plane.store.transition(
                ctx.account, ctx.task_id, end, current, in_place=True, reread=reread
            )
        except (IllegalTransition, TaskGone):
            await msg.ack()
            return
        ctx.record = updated.record
        await self._finalize(ctx, msg)

    async def _finalize(self, ctx: TaskContext, msg: Msg) -> None:
        """Terminal side effects, then ack. On failure the message comes back later and this
        runs again (the record already says how the task ended)."""
        ending = f"task {ctx.record.phase.value}"
        try:
            for policy in self.policies:
                await policy.on_terminal(ctx)
        except Exception as err:
            delivered = int(msg.metadata.num_delivered)
            if delivered < MAX_FINALIZE_DELIVERIES:
                log.warning(
                    "finishing %s/%s failed (%s); will retry", ctx.account, ctx.task_id, err
                )
                await msg.nak(delay=FINALIZE_RETRY_DELAY)
                return
            log.error(
                "giving up finishing %s/%s after %d tries: %s",
                ctx.account,
                ctx.task_id,
                delivered,
                err,
            )
            ending += f"; finishing it failed {delivered} times, given up: {err}"
        self._log(ctx.record, "system", f"{ctx.note}; {ending}" if ctx.note else ending, final=True)
        await msg.ack()

    def _local_process(self, fn: TaskFunction) -> bool:
        """An attempt that is a process on this node, counted in its process budget."""
        return fn.spec.command is not None and not self.jobs

    def _placed(self, ctx: TaskContext, attempt: int, where: Placement) -> None:
        text = f"attempt {attempt} runs in pod {where.namespace}/{where.pod}"
        self._log(ctx.record, "system", text + (f" on {where.node}" if where.node else ""), attempt)
        self.placements.record(ctx.account, ctx.task_id, ctx.record.claimSeq, attempt, where)

    def _log(
        self,
        record: TaskRecord,
        stream: str,
        text: str,
        attempt: int | None = None,
        final: bool = False,
    ) -> None:
        task = record.task
        self.logs.line(task.account, task.id, attempt or task.status.attempts, stream, text, final)

    # -- control ----------------------------------------------------------------------------

    async def _on_stop(self, msg: Msg) -> None:
        parts = msg.subject.split(".")
        slot = self.slots.get((parts[-2], parts[-1]))
        if slot is None:
            return
        slot.stop_requested = True
        if slot.execution is not None:
            await slot.execution.kill()

    @property
    def closing(self) -> bool:
        return self._closing

    async def close(self, drain_timeout: float = 30.0) -> None:
        """Stop taking work, let running attempts finish for a while, then stop the rest and
        hand their messages straight back to the queue."""
        self._closing = True
        inflight = [t for w in self.workers.values() for t in w.inflight]
        for worker in self.workers.values():
            if worker.task is not None:
                worker.task.cancel()
        if self.leases is not None:
            await self.leases.close()  # the partitions go to others now, not after the TTL
        if inflight:
            _, pending = await asyncio.wait(inflight, timeout=drain_timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        await cancel_and_wait(*self._background)
        await self.placements.close()
        await self.command.close()
        await self.server.close()
        self.users.close()  # the accounts' scratch homes, once nothing runs in them
        for policy in self.policies:
            closer = getattr(policy, "close", None)
            if closer is not None:
                await closer()
        await self.logs.close()


def _finish(
    r: TaskRecord, phase: TaskPhase, error: str | None, outcome: Outcome | None
) -> TaskRecord:
    st = r.task.status
    st.phase = phase
    st.timestamps.finished = datetime.now(UTC)
    st.nextAttemptAt = None
    if st.timestamps.started is not None:
        secs = (st.timestamps.finished - st.timestamps.started).total_seconds()
        st.duration = f"{secs * 1000:.0f}ms" if secs < 1 else f"{secs:.1f}s"

    if outcome is not None:
        st.exitCode = outcome.exit_code
        if st.executor is not None:
            st.executor.instance = outcome.instance
        st.result = outcome.result if outcome.ok else None
        st.stdoutTail, st.stderrTail = outcome.stdout_tail, outcome.stderr_tail
        if not outcome.ok and error == outcome.error:
            error = outcome.evidence()
    st.error = None if phase is TaskPhase.Succeeded else error
    return r
