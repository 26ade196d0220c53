"""Task records in a JetStream KV bucket; every change is a compare-and-set on the key's revision.

The record holds the user-visible `Task` plus two internal facts the dispatchers coordinate on:
the dispatch token of the live queue message (older messages for the task are stale and dropped)
and the stream sequence of the message that claimed the current attempt (only a redelivery of
that very message may take over a Running task whose dispatcher died).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from nats.js.errors import APIError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_MARKER_REASON, KV_OP, KV_PURGE
from pydantic import BaseModel
from pydantic_core import to_json

from . import names
from .history import TTL_HEADER_BYTES, Retention
from .jetstream import NO_ROOM
from .models import Task, TaskPhase
from .rpc import WRONG_LAST_SEQUENCE, Requester
from .states import IllegalTransition, allowed
from .usage_reports import Tally

EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
log = logging.getLogger("kubetask.store")
# What a record's revision in the audit trail adds to its data and twice its key (in the
# subject, and in the header naming its source that JetStream adds), measured.
EVENT_SUBJECT_AND_HEADERS = 153


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


class Unreadable(Exception):
    """A stored record that does not decode (written around the platform, or by a bug): the
    caller quarantines it (`quarantine.py`) rather than crash on it."""

    def __init__(self, key: str, revision: int, raw: bytes, err: Exception) -> None:
        super().__init__(f"record {key} (revision {revision}) is unreadable: {err}")
        self.key = key
        self.revision = revision
        self.raw = raw
        self.err = err


def decode(key: str, raw: bytes, revision: int) -> TaskRecord:
    try:
        return TaskRecord.model_validate_json(raw)
    except ValueError as err:
        raise Unreadable(key, revision, raw, err) from None


class StaleRecord(Exception):
    """The record changed since the copy a change was based on (see `transition(reread=...)`)."""


Mutation = Callable[[TaskRecord], TaskRecord]


def kv_deleted(headers: dict[str, str]) -> bool:
    """Whether a stored KV entry is a deletion: a delete or purge marker, or a marker the server
    placed (nats-server 2.11+)."""
    return headers.get(KV_OP) in (KV_DEL, KV_PURGE) or KV_MARKER_REASON in headers


def encode(record: TaskRecord) -> bytes:
    """A record as stored: unset optional fields are left out (a third of a typical record,
    kept in the bucket and in every revision of the audit trail); every one of them reads
    back as its default, None. Payloads and results are stored exactly as given."""
    return record.model_dump_json(exclude_none=True).encode()


class TaskStore:
    """Reads and writes go through `rpc.Requester` (the hot path: a few per task)."""

    def __init__(self, rpc: Requester, retention: Retention, tally: Tally) -> None:
        self.rpc = rpc
        self.retention = retention
        self.tally = tally  # each write is a revision in the audit trail (`events.py`)
        self.written = 0  # bytes of records written, for the room kept (`gateway/store_room.py`)
        self._stream = f"KV_{names.TASKS_BUCKET}"
        self._prefix = f"$KV.{names.TASKS_BUCKET}."

    async def _write(self, key: str, data: bytes, last: int) -> int:
        """Write `data` if the key's revision is still `last` (0: the key has no value)."""
        account = key.partition(".")[0]
        try:
            headers = {EXPECTED_LAST: str(last)}
            ttl = self.retention.headers(account)
            if ttl is not None:  # the account keeps its history for less than the default
                headers.update(ttl)
            revision = await self.rpc.publish(self._prefix + key, data, headers)
        except APIError as err:
            if err.err_code in WRONG_LAST_SEQUENCE:
                raise KeyWrongLastSequenceError(err.description) from None
            raise
        self.written += len(data)
        stored = EVENT_SUBJECT_AND_HEADERS + 2 * len(key) + len(data)
        self.tally.add(account, stored + (TTL_HEADER_BYTES if ttl is not None else 0))
        return revision

    async def _latest(self, key: str) -> tuple[bytes, int, bool] | None:
        """(value, revision, deleted) of the key's last entry; deletions leave a marker."""
        msg = await self.rpc.last_for(self._stream, self._prefix + key)
        if msg is None:
            return None
        headers = msg.headers or {}
        return msg.data, int(headers["Nats-Sequence"]), kv_deleted(headers)

    async def create(self, record: TaskRecord) -> Versioned:
        key = names.task_key(record.task.account, record.task.id)
        data = encode(record)
        last = 0
        while True:
            try:
                revision = await self._write(key, data, last)
                return Versioned(record, revision, data)
            except KeyWrongLastSequenceError:
                latest = await self._latest(key)
                if latest is None:
                    last = 0
                    continue
                value, revision, deleted = latest
                if deleted:  # a deleted task's id may be used again
                    last = revision
                    continue
                existing = decode(key, value, revision)
                raise TaskExists(Versioned(existing, revision, value)) from None

    async def get(self, account: str, task_id: str) -> Versioned | None:
        key = names.task_key(account, task_id)
        latest = await self._latest(key)
        if latest is None or latest[2]:
            return None
        value, revision, _ = latest
        return Versioned(decode(key, value, revision), revision, value)

    async def transition(
        self,
        account: str,
        task_id: str,
        mutate: Mutation,
        current: Versioned | None = None,
        in_place: bool = False,
        reread: bool = True,
    ) -> Versioned:
        """Apply `mutate` with compare-and-set, re-reading and re-applying on a lost race.

        `mutate` receives a private copy of the latest record and returns the new one; it raises
        `IllegalTransition` when the latest state makes the change meaningless, which ends the
        loop — so a concurrent stop always wins over a stale dispatcher's write. With `in_place`
        the caller declares `current.record` its own, to be changed rather than copied: the
        dispatcher's records are, and re-parsing them was its costliest Python call. Without
        `reread`, a lost race raises `StaleRecord` instead: the caller decided more than this
        change on `current` (the dispatcher, on a record that came with the queue message).
        """
        private = in_place
        while True:
            if current is None:
                current = await self.get(account, task_id)
                if current is None:
                    raise TaskGone(task_id)
                private = True  # read here, seen by no one else
            before = current.record.phase
            updated = mutate(current.record if private else current.fresh_copy())
            after = updated.phase
            if after != before and not allowed(before, after):
                raise IllegalTransition(before, after)
            data = encode(updated)
            try:
                revision = await self._write(
                    names.task_key(account, task_id), data, current.revision
                )
                return Versioned(updated, revision, data)
            except KeyWrongLastSequenceError:
                if not reread:
                    raise StaleRecord(task_id) from None
                current = None

    async def delete(self, current: Versioned) -> None:
        """Delete the record if it is still `current`; `StaleRecord` if it changed since (a
        resume can race a delete: the lost compare-and-set was a 500).

        JetStream at its storage limit takes no write, a deletion's marker included, so no task
        could be deleted to make room and a full store stayed full until records expired (seen:
        every delete a 507, tasks accepted before left Queued). A purge writes nothing: there,
        the record's revisions up to `current` are purged (a newer one stays), and the marker,
        in the room just freed, then tells the gateways' indexes and the audit trail."""
        task = current.record.task
        key = names.task_key(task.account, task.id)
        try:
            try:
                await self._mark_deleted(key, current.revision)
            except APIError as err:
                if err.err_code not in NO_ROOM:
                    raise
                purge = {"filter": self._prefix + key, "seq": current.revision + 1}
                await self.rpc.api(f"$JS.API.STREAM.PURGE.{self._stream}", to_json(purge))
                await self._mark_deleted(key, 0)
        except APIError as err:
            if err.err_code in WRONG_LAST_SEQUENCE:
                raise StaleRecord(task.id) from None
            if err.err_code not in NO_ROOM:
                raise
            # Purged, and another write took the room first: the record is gone, but the
            # gateways' indexes list it until they are rebuilt.
            log.warning("task %s deleted, but JetStream had no room to tell the indexes", key)

    async def _mark_deleted(self, key: str, last: int) -> None:
        """The KV deletion marker, written only while the key's revision is `last` (0: none)."""
        await self.rpc.publish(self._prefix + key, b"", {KV_OP: KV_DEL, EXPECTED_LAST: str(last)})
