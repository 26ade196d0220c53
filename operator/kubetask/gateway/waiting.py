""" "Why is my task waiting?": for a task that waits, its queue, about how many of its function's
tasks are ahead of it, and the reason it is held — worked out when the task is read (one
consumer-info request, a pass over the account's index and, below the function's
maxConcurrency, a question to the dispatchers: `holds.py`), never stored, so it costs nothing
on the hot path.
"""

from __future__ import annotations

from .. import holds, names
from ..models import Task, TaskFunction, TaskPhase, Waiting
from ..plane import DataPlane
from .index import Query
from .indexing import Indexer
from .queue_looks import QueueLooks
from .throttle import THROTTLE_FROM

WAITING = frozenset({TaskPhase.Pending, TaskPhase.Queued, TaskPhase.Retrying, TaskPhase.Paused})


async def ahead(indexer: Indexer, task: Task, home: names.Queue, partitions: int) -> int:
    """Queued tasks of the same function enqueued before this one in the same queue (messages
    leave a queue in order, retries and resumes aside, so this is the task's place give or take
    a few). A partitioned function's other partitions are consumed beside this one, not first:
    counting them put a task 8th in line where 3 were ahead of it."""
    mine = task.status.timestamps.enqueued
    if mine is None:
        return 0
    queued = Query([task.account], task.spec.function, frozenset({TaskPhase.Queued}))
    partition = (home.partition, partitions) if home.partition is not None else None
    return await indexer.query(
        task.account, indexer.index.count, task.account, queued, mine, partition
    )


async def explain(
    plane: DataPlane, indexer: Indexer, looks: QueueLooks, task: Task
) -> Waiting | None:
    phase = task.status.phase
    if phase not in WAITING:
        return None
    fn = plane.registry.function(task.account, task.spec.function)
    if fn is None:
        return Waiting(queue="-", reason=f"its function {task.spec.function!r} is not registered")
    home = names.queue_for(fn, task.id)
    queue, partition = home.stream, home.partition
    if phase is TaskPhase.Paused:
        return Waiting(queue=queue, reason="paused; resume it to put it back in the queue")
    if phase is TaskPhase.Retrying:
        at = task.status.nextAttemptAt
        when = at.isoformat(timespec="seconds") if at else "soon"
        return Waiting(queue=queue, reason=f"waiting out its retry backoff until {when}")
    if phase is TaskPhase.Pending:
        return Waiting(queue=queue, reason="on its way back into the queue")
    position = await ahead(indexer, task, home, fn.spec.partitions) + 1
    reason = await _held_by(plane, looks, fn, home, position)
    return Waiting(queue=queue, partition=partition, position=position, reason=reason)


async def _held_by(
    plane: DataPlane, looks: QueueLooks, fn: TaskFunction, home: names.Queue, position: int
) -> str:
    return (
        await _dispatch_reason(plane, looks, fn, home, position)
        + _pace_note(fn)
        + _throttle_note(plane, fn)
    )


def _pace_note(fn: TaskFunction) -> str:
    rate = fn.spec.maxStartsPerSecond
    if rate is None:
        return ""
    return f"; its tasks start at most {rate:g} a second (maxStartsPerSecond)"


async def _dispatch_reason(
    plane: DataPlane, looks: QueueLooks, fn: TaskFunction, home: names.Queue, position: int
) -> str:
    look = await looks.of(fn, home.stream)
    running, limit = look.running, fn.spec.maxConcurrency
    if running is not None and running >= limit:
        return (
            f"function {fn.name!r} is at its maxConcurrency ({running} of {limit} running); "
            f"{_ahead(position)}"
        )
    said = [_ahead(position) if position > 1 else "next in line"]
    if running is not None:
        said.append(f"{running} of at most {limit} run now")
    if look.answers is None:
        said.append("dispatchers not asked: its account asked too often this second")
    else:
        said.append(_dispatchers_say(look.answers, fn, home, plane.settings.lease_ttl))
    return "; ".join(said)


def _dispatchers_say(
    answers: holds.Answers, fn: TaskFunction, home: names.Queue, lease_ttl: float
) -> str:
    if answers.error is not None:
        return f"could not ask the dispatchers: {answers.error}"
    if answers.nobody:
        return "no dispatcher is running to take it"
    if not answers.views:
        return (
            f"no dispatcher answered within {holds.ANSWER_WITHIN:g} s: none is running, or "
            "each is stopped or cut off from NATS"
        )
    taking = [v for v in answers.views if v.consumes]
    if not taking and home.partition is not None:
        said = (
            f"none of the {len(answers.views)} dispatchers that answered holds partition "
            f"{home.partition}'s lease yet: one takes it within about {lease_ttl:g} s "
            "(KUBETASK_LEASE_TTL)"
        )
    elif not taking:
        said = (
            f"none of the {len(answers.views)} dispatchers that answered consumes its queue "
            "yet: each starts as it hears of the function"
        )
    else:
        holding = {v.dispatcher: v.holds(fn.account) for v in taking}
        free = [who for who, what in holding.items() if not what]
        held = [f"dispatcher {who}: {', '.join(what)}" for who, what in holding.items()]
        if free:
            who = (
                f"dispatchers {', '.join(free)} have"
                if len(free) > 1
                else f"dispatcher {free[0]} has"
            )
            said = f"{who} room for it, so it should start within moments"
        else:
            said = "held back by " + "; ".join(held)
    if answers.silent:
        said += (
            f" ({answers.silent} of {answers.expected} dispatchers did not answer within "
            f"{holds.ANSWER_WITHIN:g} s)"
        )
    return said


def _ahead(position: int) -> str:
    n = position - 1
    if n == 0:
        return "none of its function's tasks is ahead of it"
    return f"{n} of its function's tasks {'is' if n == 1 else 'are'} ahead of it"


def _throttle_note(plane: DataPlane, fn: TaskFunction) -> str:
    """Whether the account's submissions to this queue are being throttled (429) right now."""
    limit = plane.settings.backlog_limit(fn.account)
    queue, depth, _ = plane.depth.known(fn)
    if limit <= 0 or depth < THROTTLE_FROM * limit:
        return ""
    return (
        f"; its account has {depth} tasks waiting in {queue}, over the throttling point "
        f"({int(THROTTLE_FROM * limit)}): submissions of its heaviest senders get 429"
    )
