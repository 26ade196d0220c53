"""An in-memory index of task records for the audit queries, fed by `watch.LazyMirror`.

Tasks are kept per account in id order, so a task-id prefix (users put trace ids in task ids)
is a range scan and a cursor is simply the last id returned. Status, function and start-time
filters are applied on the summaries; only the page returned is read from KV in full.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

import pydantic_core

from .. import names, quarantine
from ..models import TaskPhase


@dataclass(slots=True)
class Summary:
    account: str
    id: str
    function: str
    phase: TaskPhase
    submitted: datetime | None
    enqueued: datetime | None
    started: datetime | None
    next_attempt: datetime | None
    finished: datetime | None = None

    def written(self) -> datetime | None:
        """About when the record was last written: its latest stage timestamp (a pause or a
        resume leaves none, so this can be early, never late)."""
        stamps = [t for t in (self.submitted, self.started, self.finished) if t is not None]
        return max(stamps) if stamps else None


@dataclass(frozen=True)
class Query:
    accounts: list[str] | None  # None: every account (admin)
    function: str | None = None
    phases: frozenset[TaskPhase] | None = None
    started_after: datetime | None = None
    started_before: datetime | None = None
    id_prefix: str = ""

    def matches(self, s: Summary) -> bool:
        if self.function is not None and s.function != self.function:
            return False
        if self.phases is not None and s.phase not in self.phases:
            return False
        if self.started_after is not None or self.started_before is not None:
            if s.started is None:
                return False
            if self.started_after is not None and s.started < self.started_after:
                return False
            if self.started_before is not None and s.started >= self.started_before:
                return False
        return True


def _stamp(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def summarize(account: str, task_id: str, stored: bytes) -> Summary:
    """The few fields the index filters on, read from a stored `TaskRecord` without validating
    the whole record: the gateway reads every task's record each time it changes, and the
    record was validated when it was written."""
    task = pydantic_core.from_json(stored)["task"]
    status = task["status"]
    stamps = status["timestamps"]
    return Summary(
        account,
        task_id,
        task["spec"]["function"],
        TaskPhase(status["phase"]),
        _stamp(stamps.get("submitted")),
        _stamp(stamps.get("enqueued")),
        _stamp(stamps.get("started")),
        _stamp(status.get("nextAttemptAt")),
        _stamp(stamps.get("finished")),
    )


REPAIRABLE = frozenset({TaskPhase.Pending, TaskPhase.Queued, TaskPhase.Retrying})


class TaskIndex:
    def __init__(self) -> None:
        self._ids: dict[str, list[str]] = {}
        self._rows: dict[str, dict[str, Summary]] = {}
        # Tasks in a phase the sweeper may have to repair, so it need not scan everything.
        self.repairable: dict[tuple[str, str], Summary] = {}
        # Records that did not decode since the owner last took them (`quarantine.py`).
        self.poisoned: list[quarantine.Poison] = []

    def apply(self, key: str, value: bytes | None, revision: int) -> None:
        account, task_id = names.split_key(key)
        rows = self._rows.setdefault(account, {})
        ids = self._ids.setdefault(account, [])
        self.repairable.pop((account, task_id), None)
        if value is None:
            if rows.pop(task_id, None) is not None:
                del ids[bisect.bisect_left(ids, task_id)]
            return
        try:
            row = summarize(account, task_id, value)
        except Exception as err:  # one bad record must not stop the index (or the gateway)
            if rows.pop(task_id, None) is not None:
                del ids[bisect.bisect_left(ids, task_id)]
            self.poisoned.append(quarantine.record(key, revision, value, err))
            return
        if task_id not in rows:
            bisect.insort(ids, task_id)
        rows[task_id] = row
        if row.phase in REPAIRABLE:
            self.repairable[(account, task_id)] = row

    def rows_of(self, account: str) -> list[Summary]:
        return list(self._rows.get(account, {}).values())

    def all(self) -> Iterator[Summary]:
        for rows in self._rows.values():
            yield from list(rows.values())

    def search(
        self, q: Query, limit: int, cursor: tuple[str, str] | None
    ) -> tuple[list[Summary], tuple[str, str] | None]:
        """Up to `limit` matches in (account, id) order after `cursor`, and the next cursor."""
        accounts = sorted(self._ids) if q.accounts is None else sorted(q.accounts)
        found: list[Summary] = []
        for account in accounts:
            if cursor is not None and account < cursor[0]:
                continue
            ids = self._ids.get(account, [])
            rows = self._rows.get(account, {})
            start = q.id_prefix
            if cursor is not None and account == cursor[0]:
                start = max(start, cursor[1] + "\x00")
            i = bisect.bisect_left(ids, start)
            while i < len(ids):
                task_id = ids[i]
                if not task_id.startswith(q.id_prefix):
                    break
                row = rows[task_id]
                if q.matches(row):
                    if len(found) == limit:
                        last = found[-1]
                        return found, (last.account, last.id)
                    found.append(row)
                i += 1
        return found, None
