"""Tasks that a function destination creates: their ids, and how long a chain of them may grow.

A finished task's record goes to a function destination as a new task, under an id derived
from the finished task's, so that delivering it twice (a dispatcher dying between the submit and
the ack) submits it once. The id was the finished task's plus `-on-success` or `-on-failure`,
cut to fit 128 characters; once an id had been cut, the next hop's was the same id, taken by
the earlier delivery, so a pipeline of functions (A's success to B, B's to C) lost C's record
without a word for a task id of 117 characters or more. Past the limit, the id now keeps the
start of the finished task's, a digest of all of it and the suffix: distinct at every hop.

That cut was also all that ended a loop (a function whose failure goes to itself, or A to B to
A), after 12 hops for a two-character id. A chain now ends after `MAX_DEPTH` destination tasks,
Lambda's bound for a recursive loop, and the last task's log says its record was not sent.
Each destination task carries its depth and the task it came from in its annotations.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from .. import grammar

if TYPE_CHECKING:  # the CLI reads the annotations' names without loading the models
    from ..models import Task

MAX_DEPTH = 16
DEPTH = "kubetask.io/destination-depth"
SOURCE = "kubetask.io/destination-of"
_DIGEST = 16  # hex characters of the finished task's id kept when it is cut


def chained_id(task_id: str, suffix: str) -> str:
    """The id of the task that carries `task_id`'s record to a function destination."""
    whole = task_id + suffix
    if len(whole) <= grammar.TASK_ID_MAX:
        return whole
    digest = hashlib.sha256(task_id.encode()).hexdigest()[:_DIGEST]
    keep = grammar.TASK_ID_MAX - len(suffix) - _DIGEST - 1
    return f"{task_id[:keep]}-{digest}{suffix}"


def depth(task: Task) -> int:
    """How many destination deliveries made this task: 0 for one a client submitted. A Task
    applied with kubectl may carry any annotation: what is not a count counts as 0 (`isdigit`
    alone took `²`, which `int` refuses)."""
    raw = task.metadata.annotations.get(DEPTH, "0")
    return int(raw) if raw.isascii() and raw.isdigit() else 0


def annotate(task: Task) -> dict[str, str]:
    """What the task carrying `task`'s record is annotated with."""
    return {DEPTH: str(depth(task) + 1), SOURCE: task.id}


def carries(task: Task, source: Task, function: str) -> bool:
    """Whether `task` is the one a delivery of `source`'s record to `function` made."""
    return task.spec.function == function and task.metadata.annotations.get(SOURCE) == source.id
