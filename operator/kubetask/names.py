"""How accounts, functions and tasks map onto JetStream streams, subjects, consumers and keys.

All naming lives here so the gateway, dispatchers and operator agree without talking.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from .models import QueueMode, TaskFunction, TaskFunctionSpec

TASKS_BUCKET = "kt_tasks"
FUNCTIONS_BUCKET = "kt_functions"
ASYNC_CONFIGS_BUCKET = "kt_asyncconfigs"
# Where the platform moved `auto` functions (`queue_routes.py`), by function key.
ROUTES_BUCKET = "kt_routes"
# Which dispatcher consumes which partition (`dispatch/leases.py`); entries expire.
LEASES_BUCKET = "kt_leases"
LOGS_STREAM = "KT_LOGS"
EVENTS_STREAM = "KT_EVENTS"
STOP_SUBJECT_PREFIX = "kt.ctl.stop"
# What each component wrote per account to the history streams, heard by the gateways
# (`usage_reports.py`, `gateway/history_quota.py`).
USAGE_PREFIX = "kt.usage"
LOG_USAGE_SUBJECT = f"{USAGE_PREFIX}.logs"
EVENTS_USAGE_SUBJECT = f"{USAGE_PREFIX}.events"
# Each account's task records as the gateways count them, heard by the operator
# (`record_reports.py`).
RECORD_USAGE_SUBJECT = f"{USAGE_PREFIX}.records"
# What holds a function's queued tasks back, asked of every dispatcher by a gateway explaining
# why a task waits (`holds.py`, `dispatch/hold_answers.py`).
HOLDS_PREFIX = "kt.holds"


# The stream small accounts share (`QueueMode.shared`): each function a subject of its own,
# `kt.qm.<account>.<function>`, and a consumer named for both.
SHARED_STREAM = "KT_QM"


def shared_subjects(account: str) -> str:
    """One account's queue subjects in the small accounts' stream (its part of that stream)."""
    return f"kt.qm.{account}.*"


def account_stream(account: str) -> str:
    return f"KT_Q_{account}"


def dedicated_stream(account: str, function: str) -> str:
    return f"KT_QF_{account}_{function}"


def routed(spec: TaskFunctionSpec) -> bool:
    """Whether the platform chooses the function's queue (`queueMode: auto`); a partitioned
    function always has streams of its own, whatever its mode."""
    return spec.queueMode is QueueMode.auto and spec.partitions <= 1


def queue_mode(fn: TaskFunction) -> QueueMode:
    """The queue a function's tasks use now: its own setting, or for `auto` the platform's
    assignment (carried in its status by the registry), the account's stream without one. A
    partitioned function always has streams of its own."""
    if fn.spec.partitions > 1:
        return QueueMode.dedicated
    if fn.spec.queueMode is not QueueMode.auto:
        return fn.spec.queueMode
    assignment = fn.status.queueAssignment if fn.status is not None else None
    return assignment.mode if assignment is not None else QueueMode.account


@dataclass(frozen=True)
class Queue:
    """One queue of a function: the stream holding it (and the subjects that stream takes), the
    subject its runnable tasks are published on, the prefix its delayed retries wait under, its
    durable consumer and, for a partitioned function, which partition it is."""

    stream: str
    stream_subjects: tuple[str, ...]
    subject: str
    schedules: str
    consumer: str
    partition: int | None = None

    def schedule_subject(self, task_id: str) -> str:
        """Holds a task's delayed retry (one per task) until JetStream moves it into the queue."""
        return f"{self.schedules}.{task_id}"

    @property
    def shared(self) -> bool:
        """Whether the stream is shared with other functions: the account's, or the one of
        small accounts."""
        return self.stream.startswith("KT_Q_") or self.stream == SHARED_STREAM


def queues_of(fn: TaskFunction) -> list[Queue]:
    a, f, consumer = fn.account, fn.name, consumer_name(fn)
    if fn.spec.partitions > 1:
        return [partition_queue(a, f, i) for i in range(fn.spec.partitions)]
    mode = queue_mode(fn)
    if mode is QueueMode.dedicated:
        subjects = (f"kt.qf.{a}.{f}", f"kt.qfs.{a}.{f}.*")
        return [Queue(dedicated_stream(a, f), subjects, subjects[0], f"kt.qfs.{a}.{f}", consumer)]
    if mode is QueueMode.shared:
        # Names hold no `_`, so `fn_<account>_<function>` is unique in the stream.
        subjects = ("kt.qm.*.*", "kt.qms.*.*.*")
        return [Queue(SHARED_STREAM, subjects, f"kt.qm.{a}.{f}", f"kt.qms.{a}.{f}", f"fn_{a}_{f}")]
    subjects = (f"kt.q.{a}.*", f"kt.qs.{a}.*.*")
    return [Queue(account_stream(a), subjects, f"kt.q.{a}.{f}", f"kt.qs.{a}.{f}", consumer)]


def partition_queue(account: str, function: str, index: int) -> Queue:
    """Partition `index` of a function: its stream, subjects and consumer depend on nothing else
    (so changing the number of partitions keeps the ones that remain)."""
    a, f = account, function
    subjects = (f"kt.qp.{a}.{f}.{index}", f"kt.qps.{a}.{f}.{index}.*")
    return Queue(
        f"KT_QP_{a}_{f}_{index}", subjects, subjects[0], f"kt.qps.{a}.{f}.{index}", f"fn_{f}", index
    )


def partition_of(task_id: str, partitions: int) -> int:
    """A task's partition: stable, so its retries and republishes go where it went first."""
    return zlib.crc32(task_id.encode()) % partitions


def queue_for(fn: TaskFunction, task_id: str) -> Queue:
    queues = queues_of(fn)
    return queues[partition_of(task_id, len(queues))] if len(queues) > 1 else queues[0]


def queue_label(fn: TaskFunction) -> str:
    """The function's queue as people read it: its stream, or its partitions' streams."""
    queues = queues_of(fn)
    if len(queues) == 1:
        return queues[0].stream
    return f"KT_QP_{fn.account}_{fn.name}_{{0..{len(queues) - 1}}}"


def consumer_name(fn: TaskFunction) -> str:
    return f"fn_{fn.name}"


def task_key(account: str, task_id: str) -> str:
    return f"{account}.{task_id}"


def object_key(account: str, name: str) -> str:
    return f"{account}.{name}"


def split_key(key: str) -> tuple[str, str]:
    account, _, rest = key.partition(".")
    return account, rest


# Every account's log lines (KT_LOGS' subjects).
ALL_LOGS = "kt.logs.>"


def log_subject(account: str, task_id: str) -> str:
    return f"kt.logs.{account}.{task_id}"


def account_logs(account: str) -> str:
    return f"kt.logs.{account}.>"


def account_events(account: str) -> str:
    return f"kt.events.{account}.>"


# Every account's audit trail (KT_EVENTS' subjects, made by `events.py`'s transform).
ALL_EVENTS = "kt.events.>"


def event_subject(account: str, task_id: str) -> str:
    return f"kt.events.{account}.{task_id}"


def holds_subject(account: str, function: str) -> str:
    return f"{HOLDS_PREFIX}.{account}.{function}"


def stop_subject(account: str, task_id: str) -> str:
    return f"{STOP_SUBJECT_PREFIX}.{account}.{task_id}"


def function_arn(account: str, function: str) -> str:
    return f"kt:{account}:function:{function}"
