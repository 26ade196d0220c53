"""The gateway's index of task records for the audit queries, fed by `watch.LazyMirror`.

It is a SQLite database: every filter the API offers (account, id prefix, status, function,
start time) is answered from a B-tree in time that does not grow with the number of records,
and each row keeps the record as stored, so a page is served from here without reading the
records again from nats-server. With `KUBETASK_INDEX_PATH` set the database
is a file that also stores the task stream's sequence it has applied, so a restarted gateway
replays only what changed while it was down instead of every retained record (with no path it
is in memory and rebuilt at each start). Why SQLite and not a server: docs/decisions.md.

Writes are batched: the mirror applies a batch of changes and then `commit()`s them with the
sequence they reach, in one transaction. Reads on the same connection see uncommitted rows too,
so a query is never behind the mirror.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pydantic_core

from .. import names, quarantine
from ..models import TaskPhase

# Bump when the table layout changes: an index of another version is rebuilt from the stream.
SCHEMA_VERSION = "2"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tasks (
    account TEXT NOT NULL,
    id TEXT NOT NULL,
    function TEXT NOT NULL,
    phase TEXT NOT NULL,
    submitted INTEGER,
    enqueued INTEGER,
    started INTEGER,
    next_attempt INTEGER,
    finished INTEGER,
    written INTEGER,
    record BLOB,
    revision INTEGER,
    PRIMARY KEY (account, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tasks_by_phase ON tasks (account, phase, id);
DROP INDEX IF EXISTS tasks_by_function;
CREATE INDEX IF NOT EXISTS tasks_by_function_phase ON tasks (account, function, phase, id);
CREATE INDEX IF NOT EXISTS tasks_by_start ON tasks (account, started);
CREATE INDEX IF NOT EXISTS tasks_by_write ON tasks (written, account, id);
CREATE INDEX IF NOT EXISTS tasks_to_repair ON tasks (phase)
    WHERE phase IN ('Pending', 'Queued', 'Retrying');
CREATE TABLE IF NOT EXISTS usage (
    account TEXT PRIMARY KEY,
    records INTEGER NOT NULL,
    bytes INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS usage_of_insert AFTER INSERT ON tasks BEGIN
    INSERT INTO usage VALUES (new.account, 1, coalesce(length(new.record), 0))
    ON CONFLICT (account) DO UPDATE
    SET records = records + 1, bytes = bytes + coalesce(length(new.record), 0);
END;
CREATE TRIGGER IF NOT EXISTS usage_of_update AFTER UPDATE OF record ON tasks BEGIN
    UPDATE usage
    SET bytes = bytes + coalesce(length(new.record), 0) - coalesce(length(old.record), 0)
    WHERE account = new.account;
END;
CREATE TRIGGER IF NOT EXISTS usage_of_delete AFTER DELETE ON tasks BEGIN
    UPDATE usage
    SET records = records - 1, bytes = bytes - coalesce(length(old.record), 0)
    WHERE account = old.account;
END;
"""

COLUMNS = "account, id, function, phase, submitted, enqueued, started, next_attempt, finished"
# An update, not a replace, of a known task: only the indexes of the columns that changed (its
# phase, mostly) are rewritten.
_UPDATED = (
    "function phase submitted enqueued started next_attempt finished written record revision"
).split()
UPSERT = (
    "INSERT INTO tasks VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (account, id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _UPDATED)
)

# The write-ahead log's size, at most (`wal_bytes`).
WAL_BYTES = 40 << 20

# As much of the file as the SQLite build will map.
MMAP_BYTES = 1 << 40

# A start-time range holding fewer tasks than this is read from its index and sorted by id.
NARROW_RANGE = 20_000

# Above every character a task id may hold: the exclusive end of an id-prefix range.
_PREFIX_END = "\U0010ffff"


def _micros(t: datetime | None) -> int | None:
    return None if t is None else round(t.timestamp() * 1_000_000)


def _time(us: int | None) -> datetime | None:
    return None if us is None else datetime.fromtimestamp(us / 1_000_000, UTC)


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

    def row(self, record: bytes | None = None, revision: int | None = None) -> tuple[object, ...]:
        return (
            self.account,
            self.id,
            self.function,
            self.phase.value,
            _micros(self.submitted),
            _micros(self.enqueued),
            _micros(self.started),
            _micros(self.next_attempt),
            _micros(self.finished),
            _micros(self.written()),
            record,
            revision,
        )

    @classmethod
    def of(cls, row: tuple[object, ...]) -> Summary:
        account, task_id, function, phase, *stamps = row
        times = [_time(s) for s in stamps]  # type: ignore[arg-type]
        return cls(str(account), str(task_id), str(function), TaskPhase(str(phase)), *times)


@dataclass(frozen=True, slots=True)
class Found:
    """A task a list found: its row's key and its record as stored (None: it has none)."""

    account: str
    id: str
    record: bytes | None
    revision: int | None


@dataclass(frozen=True)
class Query:
    accounts: list[str] | None  # None: every account (admin)
    function: str | None = None
    phases: frozenset[TaskPhase] | None = None
    started_after: datetime | None = None
    started_before: datetime | None = None
    id_prefix: str = ""

    def where(self) -> tuple[list[str], list[object]]:
        """SQL conditions (joined by AND) and their parameters, after the account's."""
        conds: list[str] = []
        args: list[object] = []
        if self.id_prefix:
            conds.append("id >= ? AND id < ?")
            args += [self.id_prefix, self.id_prefix + _PREFIX_END]
        if self.function is not None:
            conds.append("function = ?")
            args.append(self.function)
        if self.phases is not None:
            conds.append(f"phase IN ({', '.join('?' * len(self.phases))})")
            args += sorted(p.value for p in self.phases)
        if self.started_after is not None:
            conds.append("started >= ?")
            args.append(_micros(self.started_after))
        if self.started_before is not None:
            conds.append("started < ?")
            args.append(_micros(self.started_before))
        return conds, args


def _by_column_index(
    q: Query, matching: str, params: list[object], want: int
) -> tuple[str, list[object]]:
    """A page filtered by function or phase, read through the index of (function,) phase and
    id: one walk in id order for each phase asked (every phase, for a function alone), merged.
    Left to itself SQLite walked the whole table in id order instead (it has no statistics to
    say a filter is selective), reading every row's record on the way; measured offline at a
    million records, a page of: one function of 100, 2.35 → 0.75 ms; waiting tasks (Pending
    or Queued) when none were, 927 → 0.01 ms; one function's failures when it had none, 859
    → 0.14 ms."""
    index = "tasks_by_function_phase" if q.function is not None else "tasks_by_phase"
    phases = sorted(p.value for p in (q.phases if q.phases is not None else TaskPhase))
    if len(phases) == 1:
        sql = f"INDEXED BY {index} WHERE {matching} AND phase = ? ORDER BY id LIMIT ?"
        return sql, [*params, phases[0], want]
    walks, args = [], []
    for phase in phases:
        walks.append(
            f"SELECT * FROM (SELECT id FROM tasks INDEXED BY {index}"
            f" WHERE {matching} AND phase = ? ORDER BY id LIMIT ?)"
        )
        args += [*params, phase, want]
    ids = " UNION ALL ".join(walks)
    return f"WHERE account = ? AND id IN ({ids}) ORDER BY id LIMIT ?", [params[0], *args, want]


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


def wal_bytes(store_max_bytes: int) -> int:
    """How large the index's write-ahead log may grow: an eighth of what JetStream may store
    (its records are copied here), at most WAL_BYTES."""
    return min(WAL_BYTES, store_max_bytes // 8) if store_max_bytes else WAL_BYTES


class TaskIndex:
    def __init__(self, path: str | Path | None = None, wal_bytes: int = WAL_BYTES) -> None:
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(":memory:" if path is None else str(path))
        # For a partitioned function's tasks ahead of one in its partition (`waiting.py`).
        self.db.create_function("partition_of", 2, names.partition_of, deterministic=True)
        # A cache of the task stream: a commit need not reach the disk (a crash of the machine
        # at worst replays changes again), but the file must never be torn.
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = NORMAL")
        # Task ids arrive in no order, so inserts touch pages all over the B-trees: a page cache
        # of 64 MB (not the default 2 MB) keeps a million rows' upper levels and hot leaves in
        # memory, bounded whatever the number of records.
        self.db.execute("PRAGMA cache_size = -65536")
        # Checkpoint the log into the database every 40 MB rather than 4: a checkpoint rewrites
        # the pages the log touched, and random task ids touch pages all over. Less beside a
        # small store, and the log cut back to that after each checkpoint: it stayed at its
        # largest, and on a 64 MiB disk a 42 MB log beside a 19 MiB store filled the disk and
        # nats-server disabled JetStream (seen).
        page = self.db.execute("PRAGMA page_size").fetchone()[0]
        self.db.execute(f"PRAGMA wal_autocheckpoint = {max(1, wal_bytes // page)}")
        self.db.execute(f"PRAGMA journal_size_limit = {wal_bytes}")
        # Read the file through a memory map, not a read() per page: a page of a time range is
        # a hundred rows in random pages, each a system call and a copy without it (at a
        # million records: the query's p50/p99 2.35/10.3 ms -> 1.56/3.5 ms; `docs/decisions.md`).
        # The build caps the map (2 GB for Debian's SQLite); pages past it are read as before.
        self.db.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
        # The usage triggers make each write a statement that may need undoing part-way, which
        # SQLite journals in a temporary file unless told to keep it in memory
        # (`bench/index.py`, 100,000 records: 86-94 µs a record applied with the journal in a
        # file, 67-68 in memory, 59-66 without the triggers).
        self.db.execute("PRAGMA temp_store = MEMORY")
        self.db.executescript(SCHEMA)
        # Records that did not decode since the owner last took them (`quarantine.py`).
        self.poisoned: list[quarantine.Poison] = []

    def resume(self, stream_created: str, stream_last_seq: int) -> int:
        """The stream sequence to read on from. An index written for another incarnation of the
        stream (recreated, or reset behind the index's back) or another layout starts over."""
        meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        applied = int(meta.get("applied", "0"))
        same = (
            meta.get("schema") == SCHEMA_VERSION
            and meta.get("stream") == stream_created
            and applied <= stream_last_seq
        )
        if not same:
            self.db.execute("DELETE FROM tasks")
            applied = 0
        if meta.get("usage") != "1" or not same:
            # An index from before the usage table had rows it never counted.
            self.db.execute("DELETE FROM usage")
            self.db.execute(
                "INSERT INTO usage SELECT account, count(*), sum(coalesce(length(record), 0))"
                " FROM tasks GROUP BY account"
            )
        self.db.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)",
            [
                ("schema", SCHEMA_VERSION),
                ("stream", stream_created),
                ("applied", str(applied)),
                ("usage", "1"),
            ],
        )
        self.db.commit()
        return applied

    def apply(self, key: str, value: bytes | None, revision: int) -> None:
        account, task_id = names.split_key(key)
        if value is None:
            self.drop(account, task_id)
            return
        try:
            row = summarize(account, task_id, value)
        except Exception as err:  # one bad record must not stop the index (or the gateway)
            self.drop(account, task_id)
            self.poisoned.append(quarantine.record(key, revision, value, err))
            return
        self.db.execute(UPSERT, row.row(value, revision))

    def drop(self, account: str, task_id: str) -> None:
        self.db.execute("DELETE FROM tasks WHERE account = ? AND id = ?", (account, task_id))

    def commit(self, revision: int | None = None) -> None:
        """Make the changes applied so far durable, with the stream sequence they reach."""
        if revision is not None:
            self.db.execute("UPDATE meta SET value = ? WHERE key = 'applied'", (str(revision),))
        self.db.commit()

    def close(self) -> None:
        self.db.commit()
        self.db.close()

    def usage(self) -> dict[str, tuple[int, int]]:
        """Each account's records and their bytes as stored (kept by the triggers above)."""
        rows = self.db.execute("SELECT account, records, bytes FROM usage WHERE records > 0")
        return {account: (records, nbytes) for account, records, nbytes in rows}

    def _select(self, sql: str, args: Iterable[object]) -> Iterator[Summary]:
        for row in self.db.execute(f"SELECT {COLUMNS} FROM tasks {sql}", tuple(args)):
            yield Summary.of(row)

    def _narrow(self, account: str, q: Query) -> bool:
        """Whether a start-time range holds fewer than NARROW_RANGE of the account's tasks,
        counted on its index (at most that many entries read). Such a range is read from that
        index and its ids sorted; left to itself SQLite walks the whole table in id order to
        avoid the sort, since the index does not hold the listed columns: 0.4 s for a
        one-minute range at a million records. A wider range is dense enough for that walk."""
        if q.started_after is None and q.started_before is None:
            return False
        bounds, args = Query(
            [account], started_after=q.started_after, started_before=q.started_before
        ).where()
        sql = (
            "SELECT count(*) FROM (SELECT 1 FROM tasks INDEXED BY tasks_by_start"
            f" WHERE account = ? AND {' AND '.join(bounds)} LIMIT {NARROW_RANGE})"
        )
        held: int = self.db.execute(sql, (account, *args)).fetchone()[0]
        return held < NARROW_RANGE

    def repairable(self) -> list[Summary]:
        """Tasks in a phase the sweeper may have to repair."""
        return list(self._select("WHERE phase IN ('Pending', 'Queued', 'Retrying')", ()))

    def written_before(self, cutoff: datetime, limit: int = 1000) -> Iterator[Summary]:
        """Rows last written before `cutoff` (expiry candidates), oldest first, read a page at
        a time so that rows dropped meanwhile are not met again."""
        after: tuple[object, ...] = (-1, "", "")
        while True:
            sql = (
                "WHERE written < ? AND (written, account, id) > (?, ?, ?)"
                " ORDER BY written, account, id LIMIT ?"
            )
            page = list(self._select(sql, (_micros(cutoff), *after, limit)))
            yield from page
            if len(page) < limit:
                return
            last = page[-1]
            after = (_micros(last.written()), last.account, last.id)

    def count(
        self,
        account: str,
        q: Query,
        enqueued_before: datetime | None = None,
        partition: tuple[int, int] | None = None,
    ) -> int:
        """With `partition` (which, of how many), only the tasks whose ids fall in it."""
        conds, args = q.where()
        if enqueued_before is not None:
            conds.append("enqueued < ?")
            args.append(_micros(enqueued_before))
        if partition is not None:
            conds.append("partition_of(id, ?) = ?")
            args.extend((partition[1], partition[0]))
        where = " AND ".join(["account = ?", *conds])
        found = self.db.execute(f"SELECT count(*) FROM tasks WHERE {where}", (account, *args))
        return int(found.fetchone()[0])

    def accounts(self) -> list[str]:
        """Every account with a row, one index seek each (not a scan of every row)."""
        found: list[str] = []
        step = "SELECT min(account) FROM tasks WHERE account > ?"
        while account := self.db.execute(step, (found[-1] if found else "",)).fetchone()[0]:
            found.append(account)
        return found

    def search(
        self, q: Query, limit: int, cursor: tuple[str, str] | None, max_bytes: int | None = None
    ) -> tuple[list[Found], tuple[str, str] | None]:
        """Up to `limit` matches in (account, id) order after `cursor`, with their records as
        stored, and the next cursor. Accounts are searched one at a time, so each one's index
        is read in order. With `max_bytes`, a page also ends before the record that would take
        its records past that many bytes (it holds one, whatever its size): a page is read and
        rendered whole in the gateway's memory, and a thousand tasks with the largest payloads
        and results allowed are ~0.5 GB, so a few lists of one tenant's tasks could take the
        gateway every tenant shares out of memory."""
        conds, args = q.where()
        accounts = self.accounts() if q.accounts is None else sorted(q.accounts)
        found: list[Found] = []
        size = 0
        for account in accounts:
            if cursor is not None and account < cursor[0]:
                continue
            where = ["account = ?", *conds]
            params: list[object] = [account, *args]
            if cursor is not None and account == cursor[0]:
                where.append("id > ?")
                params.append(cursor[1])
            matching = " AND ".join(where)
            want = limit + 1 - len(found)
            if self._narrow(account, q):  # the page's ids from the range's index, then rows
                ids = (
                    "SELECT id FROM tasks INDEXED BY tasks_by_start"
                    f" WHERE {matching} ORDER BY id LIMIT ?"
                )
                sql = f"WHERE account = ? AND id IN ({ids}) ORDER BY id"
                params = [account, *params, want]
            elif not q.id_prefix and (q.function is not None or q.phases is not None):
                sql, params = _by_column_index(q, matching, params, want)
            else:
                sql = f"WHERE {matching} ORDER BY id LIMIT ?"
                params.append(want)
            rows = self.db.execute(f"SELECT account, id, record, revision FROM tasks {sql}", params)
            for row in rows:  # read row by row: what a full page does not take is not read
                grown = size + len(row[2] or b"")
                if len(found) == limit or (found and max_bytes is not None and grown > max_bytes):
                    return found, (found[-1].account, found[-1].id)
                found.append(Found(*row))
                size = grown
        return found, None
