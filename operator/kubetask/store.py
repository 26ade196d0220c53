"""Task records in a JetStream KV bucket; every change is a compare-and-set on the key's revision.

The record holds the user-visible `Task` plus two internal facts the dispatchers coordinate on:
the dispatch token of the live queue message (older messages for the task are stale and dropped)
and the stream sequence of the message that claimed the current attempt (only a redelivery of
that very message may take over a Running task whose dispatcher died).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import BaseModel

from . import names
from .models import Task, TaskPhase
from .states import IllegalTransition, allowed


def now() -> datetime:
    return datetime.now(UTC)


# Dispatch tokens and generated ids only need to be unique, not unguessable (they authorize
# nothing), so they come from a PRNG seeded once from the OS instead of a syscall per task.
_unique = random.Random()


def random_hex(digits: int) -> str:
    return f"{_unique.getrandbits(digits * 4):0{digits}x}"


def new_token() -> str:
    return random_hex(16)


class TaskRecord(BaseModel):
    task: Task
    token: str
    claimSeq: int | None = None

    @property
    def phase(self) -> TaskPhase:
        return self.task.status.phase


@dataclass(frozen=True)
class Versioned:
    record: TaskRecord
    revision: int
    raw: bytes

    def fresh_copy(self) -> TaskRecord:
        """A private copy to mutate; re-parsing the stored JSON is far cheaper than deepcopy."""
        return TaskRecord.model_validate_json(self.raw)


class TaskExists(Exception):
    def __init__(self, existing: Versioned) -> None:
        super().__init__(f"task {existing.record.task.id!r} already exists")
        self.existing = existing


class TaskGone(Exception):
    """The record vanished (deleted) while a transition was being applied."""


Mutation = Callable[[TaskRecord], TaskRecord]


class TaskStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def create(self, record: TaskRecord) -> Versioned:
        key = names.task_key(record.task.account, record.task.id)
        data = record.model_dump_json().encode()
        while True:
            try:
                revision = await self.kv.create(key, data)
                return Versioned(record, revision, data)
            except KeyWrongLastSequenceError:
                existing = await self.get(record.task.account, record.task.id)
                if existing is not None:
                    raise TaskExists(existing) from None

    async def get(self, account: str, task_id: str) -> Versioned | None:
        try:
            entry = await self.kv.get(names.task_key(account, task_id))
        except KeyNotFoundError:
            return None
        if entry.value is None or entry.revision is None:
            return None
        return Versioned(TaskRecord.model_validate_json(entry.value), entry.revision, entry.value)

    async def transition(
        self, account: str, task_id: str, mutate: Mutation, current: Versioned | None = None
    ) -> Versioned:
        """Apply `mutate` with compare-and-set, re-reading and re-applying on a lost race.

        `mutate` receives a copy of the latest record and returns the new one; it raises
        `IllegalTransition` when the latest state makes the change meaningless, which ends the
        loop — so a concurrent stop always wins over a stale dispatcher's write.
        """
        while True:
            if current is None:
                current = await self.get(account, task_id)
                if current is None:
                    raise TaskGone(task_id)
            before = current.record.phase
            updated = mutate(current.fresh_copy())
            after = updated.phase
            if after != before and not allowed(before, after):
                raise IllegalTransition(before, after)
            data = updated.model_dump_json().encode()
            try:
                revision = await self.kv.update(
                    names.task_key(account, task_id), data, last=current.revision
                )
                return Versioned(updated, revision, data)
            except KeyWrongLastSequenceError:
                current = None

    async def delete(self, current: Versioned) -> None:
        task = current.record.task
        await self.kv.delete(names.task_key(task.account, task.id), last=current.revision)
