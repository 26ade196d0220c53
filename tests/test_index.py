"""The gateway's task index: every list filter answered from SQLite agrees with a plain filter
over the same rows, and a restarted gateway resumes its kept index instead of reading every
retained record again."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import nats
import pydantic_core
from kubetask.gateway.index import UPSERT, Query, Summary, TaskIndex
from kubetask.models import TaskPhase
from test_crash import Lab, lab  # noqa: F401 (the fixture)

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def _rows(n: int, seed: int) -> list[Summary]:
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        started = T0 + timedelta(seconds=rnd.randrange(1000)) if rnd.random() < 0.7 else None
        rows.append(
            Summary(
                account=rnd.choice(["a", "b", "c"]),
                id=f"{rnd.choice(['trace', 'job', 'x'])}-{i:05d}",
                function=rnd.choice(["f", "g"]),
                phase=rnd.choice(list(TaskPhase)),
                submitted=T0,
                enqueued=T0 + timedelta(milliseconds=i),
                started=started,
                next_attempt=None,
            )
        )
    return rows


def _matches(q: Query, s: Summary) -> bool:
    after, before = q.started_after, q.started_before
    return (
        (q.accounts is None or s.account in q.accounts)
        and s.id.startswith(q.id_prefix)
        and (q.function is None or s.function == q.function)
        and (q.phases is None or s.phase in q.phases)
        and (after is None or (s.started is not None and s.started >= after))
        and (before is None or (s.started is not None and s.started < before))
    )


def _fill(index: TaskIndex, rows: list[Summary]) -> None:
    for s in rows:
        index.db.execute(UPSERT, s.row())
    index.commit()


def test_every_filter_and_cursor_agrees_with_a_plain_filter(tmp_path: Path) -> None:
    rows = _rows(3000, seed=7)
    index = TaskIndex(tmp_path / "index.sqlite3")
    _fill(index, rows)
    rnd = random.Random(11)
    for _ in range(200):
        lo = T0 + timedelta(seconds=rnd.randrange(1000))
        q = Query(
            accounts=rnd.choice([None, ["a"], ["b", "c"]]),
            function=rnd.choice([None, "f", "g"]),
            phases=rnd.choice(
                [None, frozenset({TaskPhase.Queued}), frozenset(rnd.sample(list(TaskPhase), 3))]
            ),
            started_after=rnd.choice([None, lo]),
            started_before=rnd.choice([None, lo + timedelta(seconds=300)]),
            id_prefix=rnd.choice(["", "trace", "job-0", "x-01"]),
        )
        expected = sorted((s.account, s.id) for s in rows if _matches(q, s))
        limit = rnd.choice([1, 7, 50, 5000])
        got: list[tuple[str, str]] = []
        cursor = None
        while True:
            page, cursor = index.search(q, limit, cursor)
            assert len(page) <= limit
            got += [(s.account, s.id) for s in page]
            if cursor is None:
                break
        assert got == expected, q
        anywhere = dataclasses.replace(q, accounts=None)  # count() is for the account it names
        for account in ["a", "b"]:
            mine = [s for s in rows if s.account == account and _matches(anywhere, s)]
            assert index.count(account, q) == len(mine)
    index.close()


def test_a_page_holds_no_more_record_bytes_than_asked_and_one_record_at_least(
    tmp_path: Path,
) -> None:
    """A page is built whole in the gateway's memory, so besides `limit` it is bounded in
    bytes: it ends before the record that would take it past `max_bytes`, unless that record
    is its first, and the pages together are still every match, once, in order."""
    rows = _rows(600, seed=3)
    rnd = random.Random(5)
    sizes = {(s.account, s.id): rnd.choice([10, 900, 5_000, 40_000, 120_000]) for s in rows}
    index = TaskIndex(tmp_path / "index.sqlite3")
    for s in rows:
        index.db.execute(UPSERT, s.row(b"r" * sizes[s.account, s.id], 1))
    index.commit()
    for _ in range(60):
        q = Query(
            accounts=rnd.choice([None, ["a"], ["b", "c"]]),
            phases=rnd.choice([None, frozenset({TaskPhase.Queued, TaskPhase.Failed})]),
            id_prefix=rnd.choice(["", "trace"]),
        )
        expected = sorted((s.account, s.id) for s in rows if _matches(q, s))
        limit, max_bytes = rnd.choice([3, 50, 1000]), rnd.choice([1, 50_000, 300_000])
        got: list[tuple[str, str]] = []
        cursor = None
        while True:
            page, cursor = index.search(q, limit, cursor, max_bytes)
            keys = [(f.account, f.id) for f in page]
            held = sum(sizes[k] for k in keys)
            assert 0 < len(page) <= limit or (not page and not expected)
            assert held <= max_bytes or len(page) == 1, (held, max_bytes, len(page))
            got += keys
            if cursor is None:
                break
            if len(page) < limit:  # ended for its size: the next match would not have fitted
                following = expected[len(got)]
                assert held + sizes[following] > max_bytes
        assert got == expected, q
    index.close()


def test_each_accounts_records_and_bytes_are_counted_as_rows_come_and_go(
    tmp_path: Path,
) -> None:
    """The record quota (`gateway/record_quota.py`) reads these totals; they must agree with
    the rows after any mix of inserts, updates of a record's size and deletes, across a
    restart, and for an index written before the totals existed."""
    rnd = random.Random(11)
    rows = _rows(400, seed=7)
    stored: dict[tuple[str, str], int] = {}
    index = TaskIndex(tmp_path / "index.sqlite3")
    index.resume("stream-1", 10_000)

    def expected() -> dict[str, tuple[int, int]]:
        totals: dict[str, tuple[int, int]] = {}
        for (account, _), size in stored.items():
            records, nbytes = totals.get(account, (0, 0))
            totals[account] = (records + 1, nbytes + size)
        return totals

    for _ in range(3000):
        s = rnd.choice(rows)
        if rnd.random() < 0.25:
            index.drop(s.account, s.id)
            stored.pop((s.account, s.id), None)
        else:
            size = rnd.randrange(1, 5000)
            index.db.execute(UPSERT, s.row(b"r" * size, 1))
            stored[s.account, s.id] = size
    assert index.usage() == expected()
    index.commit(3000)
    index.close()
    index = TaskIndex(tmp_path / "index.sqlite3")
    assert index.resume("stream-1", 10_000) == 3000
    assert index.usage() == expected()
    # An index from before the totals: rows it never counted are counted at resume.
    index.db.execute("DELETE FROM usage")
    index.db.execute("DELETE FROM meta WHERE key = 'usage'")
    index.commit()
    index.close()
    index = TaskIndex(tmp_path / "index.sqlite3")
    assert index.resume("stream-1", 10_000) == 3000
    assert index.usage() == expected() != {}
    index.close()


def test_a_kept_index_resumes_and_a_foreign_one_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    index = TaskIndex(path)
    assert index.resume("stream-1", 100) == 0
    _fill(index, _rows(10, seed=1))
    index.commit(42)
    index.close()

    index = TaskIndex(path)
    assert index.resume("stream-1", 100) == 42  # the same stream, further on: resume
    assert len(index.search(Query(None), 100, None)[0]) == 10
    index.close()
    index = TaskIndex(path)
    assert index.resume("stream-1", 41) == 0  # the stream is behind the index: reset
    assert index.search(Query(None), 100, None)[0] == []
    _fill(index, _rows(10, seed=1))
    index.commit(5)
    index.close()
    index = TaskIndex(path)
    assert index.resume("stream-2", 100) == 0  # another stream of the same name: start over
    assert index.search(Query(None), 100, None)[0] == []
    index.close()


async def _publish_copies(nats_url: str, template: bytes, account: str, n: int) -> None:
    """`n` records like `template` under ids rec-000000..., written straight into the bucket
    (as many as a busy week leaves, without running a week of tasks)."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    record = pydantic_core.from_json(template)
    for start in range(0, n, 2000):
        acks = []
        for i in range(start, min(n, start + 2000)):
            record["task"]["metadata"]["name"] = f"rec-{i:06d}"
            data = pydantic_core.to_json(record)
            acks.append(js.publish(f"$KV.kt_tasks.{account}.rec-{i:06d}", data))
        await asyncio.gather(*acks)
    await nc.close()


async def test_a_restarted_gateway_answers_at_once_on_200k_records(lab: Lab) -> None:  # noqa: F811
    index_path = lab.root / "index" / "tasks.sqlite3"
    url, token, env = lab.start_nats_and_gateway("big", KUBETASK_INDEX_PATH=str(index_path))
    auth = {"Authorization": f"Bearer {token}"}
    fn = {
        "apiVersion": "kubetask.io/v1alpha1",
        "kind": "TaskFunction",
        "metadata": {"name": "idle", "namespace": "big"},
        "spec": {"command": ["true"]},
    }
    async with httpx.AsyncClient(base_url=url, headers=auth, timeout=60) as http:
        assert (await http.put("/v1/functions/idle", json=fn)).status_code == 200
        assert (
            await http.post("/v1/tasks", json={"function": "idle", "id": "tmpl"})
        ).status_code == 202
    nc = await nats.connect(env["KUBETASK_NATS_URL"])
    template = (await (await nc.jetstream().key_value("kt_tasks")).get("big.tmpl")).value
    await nc.close()
    assert template is not None
    await _publish_copies(env["KUBETASK_NATS_URL"], template, "big", 200_000)

    async with httpx.AsyncClient(base_url=url, headers=auth, timeout=120) as http:
        listed = await http.get("/v1/tasks", params={"limit": 5})  # waits for the index
        assert [t["metadata"]["name"] for t in listed.json()["items"]][:2] == [
            "rec-000000",
            "rec-000001",
        ]
    gateway = lab.procs[-1]
    gateway.terminate()
    assert gateway.wait(30) in (0, -signal.SIGTERM)  # uvicorn ends with the signal it caught

    # While the gateway is down: one record changes, one is deleted, one is new.
    nc = await nats.connect(env["KUBETASK_NATS_URL"])
    kv = await nc.jetstream().key_value("kt_tasks")
    record = pydantic_core.from_json(template)
    record["task"]["status"]["phase"] = "Failed"
    record["task"]["metadata"]["name"] = "rec-000007"
    await kv.put("big.rec-000007", pydantic_core.to_json(record))
    await kv.delete("big.rec-000008")
    record["task"]["metadata"]["name"] = "rec-new"
    await kv.put("big.rec-new", pydantic_core.to_json(record))
    await nc.close()

    port = int(url.rsplit(":", 1)[1])
    tokens = lab.root / "tokens.json"
    lab.spawn("gateway", "--port", str(port), "--tokens", str(tokens), env=env, log="gw2.log")
    async with httpx.AsyncClient(base_url=url, headers=auth, timeout=60) as http:
        while True:
            try:
                await http.get("/healthz")
                break
            except httpx.TransportError:
                await asyncio.sleep(0.02)
        listening = time.monotonic()
        failed = await http.get("/v1/tasks", params={"status": "Failed"})
        answered = time.monotonic() - listening
        assert [t["metadata"]["name"] for t in failed.json()["items"]] == ["rec-000007", "rec-new"]
        assert answered < 2.0, f"first list took {answered:.1f} s after the gateway listened"
        assert (await http.get("/healthz")).status_code == 200
        gone = await http.get("/v1/tasks", params={"idPrefix": "rec-00000"})
        names = [t["metadata"]["name"] for t in gone.json()["items"]]
        assert "rec-000008" not in names and "rec-000009" in names
        new = await http.get("/v1/tasks", params={"idPrefix": "rec-new"})
        assert [t["metadata"]["name"] for t in new.json()["items"]] == ["rec-new"]
    log = (lab.root / "gw2.log").read_text()
    resumed = re.search(r"task index resumed at sequence (\d+)", log)
    assert resumed is not None and int(resumed[1]) >= 200_000, log  # not from the start
    read = re.search(r"task index caught up: sequences (\d+) to (\d+)", log)
    assert read is not None, log
    assert int(read[2]) - int(read[1]) < 10, "the restart read more than what changed"

    # Without its index the gateway still listens at once: not ready while it rebuilds, yet
    # taking submissions; a list waits for the rebuild and sees everything.
    gateway = lab.procs[-1]
    gateway.terminate()
    gateway.wait(30)
    for leftover in index_path.parent.iterdir():
        leftover.unlink()
    lab.spawn("gateway", "--port", str(port), "--tokens", str(tokens), env=env, log="gw3.log")
    async with httpx.AsyncClient(base_url=url, headers=auth, timeout=120) as http:
        while True:
            try:
                health = await http.get("/healthz")
                break
            except httpx.TransportError:
                await asyncio.sleep(0.02)
        assert health.status_code == 503, health.text
        assert "indexing task records" in health.json()["error"]
        fresh = await http.post("/v1/tasks", json={"function": "idle", "id": "during-rebuild"})
        assert fresh.status_code == 202, fresh.text
        listed = await http.get("/v1/tasks", params={"idPrefix": "during-"})
        assert [t["metadata"]["name"] for t in listed.json()["items"]] == ["during-rebuild"]
        assert (await http.get("/healthz")).status_code == 200
        counted = await http.get("/v1/tasks", params={"status": "Failed"})
        assert [t["metadata"]["name"] for t in counted.json()["items"]] == ["rec-000007", "rec-new"]


def test_the_write_ahead_log_is_cut_back_to_its_bound(tmp_path: Path) -> None:
    """It stayed at its largest, 40 MB, whatever the store beside it (seen filling a 64 MiB
    disk); `wal_bytes` bounds it, and it is cut back to that after a checkpoint, also from a
    batch that took it past the bound (a checkpoint runs only once a commit passed it)."""
    path = tmp_path / "index.sqlite3"
    wal = path.with_name(path.name + "-wal")
    index = TaskIndex(path, wal_bytes=1 << 20)
    record = b"x" * 20_000
    rows = _rows(1000, seed=5)
    for i, s in enumerate(rows[:250]):  # 5 MB in one batch
        index.db.execute(UPSERT, s.row(record, i + 1))
    index.commit()
    assert wal.stat().st_size > 4 << 20
    for i, s in enumerate(rows[250:], start=250):
        index.db.execute(UPSERT, s.row(record, i + 1))
        if i % 50 == 49:
            index.commit()
            assert wal.stat().st_size <= 2 << 20, (i, wal.stat().st_size)
    index.close()
