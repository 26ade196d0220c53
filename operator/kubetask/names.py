"""How accounts, functions and tasks map onto JetStream streams, subjects, consumers and keys.

All naming lives here so the gateway, dispatchers and operator agree without talking.
"""

from __future__ import annotations

from .models import QueueMode, TaskFunction

TASKS_BUCKET = "kt_tasks"
FUNCTIONS_BUCKET = "kt_functions"
ASYNC_CONFIGS_BUCKET = "kt_asyncconfigs"
# Where the platform moved `auto` functions (`queue_routes.py`), by function key.
ROUTES_BUCKET = "kt_routes"
LOGS_STREAM = "KT_LOGS"
EVENTS_STREAM = "KT_EVENTS"
STOP_SUBJECT_PREFIX = "kt.ctl.stop"


def account_stream(account: str) -> str:
    return f"KT_Q_{account}"


def dedicated_stream(account: str, function: str) -> str:
    return f"KT_QF_{account}_{function}"


def queue_mode(fn: TaskFunction) -> QueueMode:
    """The queue a function's tasks use now: its own setting, or for `auto` the platform's
    assignment (carried in its status by the registry), the account's stream without one."""
    if fn.spec.queueMode is not QueueMode.auto:
        return fn.spec.queueMode
    assignment = fn.status.queueAssignment if fn.status is not None else None
    return assignment.mode if assignment is not None else QueueMode.account


def stream_for(fn: TaskFunction) -> str:
    if queue_mode(fn) is QueueMode.dedicated:
        return dedicated_stream(fn.account, fn.name)
    return account_stream(fn.account)


def stream_subjects(fn: TaskFunction) -> list[str]:
    if queue_mode(fn) is QueueMode.dedicated:
        return [f"kt.qf.{fn.account}.{fn.name}", f"kt.qfs.{fn.account}.{fn.name}.*"]
    return [f"kt.q.{fn.account}.*", f"kt.qs.{fn.account}.*.*"]


def queue_subject(fn: TaskFunction) -> str:
    """Where a function's runnable tasks are published."""
    if queue_mode(fn) is QueueMode.dedicated:
        return f"kt.qf.{fn.account}.{fn.name}"
    return f"kt.q.{fn.account}.{fn.name}"


def schedule_subject(fn: TaskFunction, task_id: str) -> str:
    """Holds a task's delayed retry (one per task) until JetStream moves it into the queue."""
    if queue_mode(fn) is QueueMode.dedicated:
        return f"kt.qfs.{fn.account}.{fn.name}.{task_id}"
    return f"kt.qs.{fn.account}.{fn.name}.{task_id}"


def consumer_name(fn: TaskFunction) -> str:
    return f"fn_{fn.name}"


def task_key(account: str, task_id: str) -> str:
    return f"{account}.{task_id}"


def object_key(account: str, name: str) -> str:
    return f"{account}.{name}"


def split_key(key: str) -> tuple[str, str]:
    account, _, rest = key.partition(".")
    return account, rest


def log_subject(account: str, task_id: str) -> str:
    return f"kt.logs.{account}.{task_id}"


def stop_subject(account: str, task_id: str) -> str:
    return f"{STOP_SUBJECT_PREFIX}.{account}.{task_id}"


def function_arn(account: str, function: str) -> str:
    return f"kt:{account}:function:{function}"
