"""The narrow interface every dispatch policy implements, and what a policy can decide.

A policy is consulted at three points of a task's life in the dispatcher: when its message is
dequeued (before anything runs), when an attempt failed, and once the task reached a terminal
phase. Adding a policy means one new module and one line in `dispatcher.default_policies`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ..executors import Outcome
from ..models import AsyncConfigSpec, TaskFunction, TaskPhase
from ..plane import DataPlane
from ..store import TaskRecord


@dataclass
class TaskContext:
    plane: DataPlane
    function: TaskFunction
    config: AsyncConfigSpec
    record: TaskRecord
    dequeued_at: datetime
    note: str | None = None  # how the last attempt went, for the task's log

    @property
    def account(self) -> str:
        return self.record.task.account

    @property
    def task_id(self) -> str:
        return self.record.task.id


@dataclass(frozen=True)
class Drop:
    """End the task without running it."""

    phase: TaskPhase
    reason: str


@dataclass(frozen=True)
class Retry:
    at: datetime
    delay: float


class Policy:
    async def on_dequeue(self, ctx: TaskContext) -> Drop | None:
        return None

    async def on_failure(self, ctx: TaskContext, outcome: Outcome) -> Retry | None:
        return None

    async def on_terminal(self, ctx: TaskContext) -> None:
        """Side effects of a terminal phase. Runs at least once: again after a crash, so it must
        tolerate repetition. Raising makes the dispatcher try the whole step again later."""
        return None
