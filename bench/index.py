"""The gateway's task index at 0 → 1,000,000 records: load rate, disk and memory per record,
reopening a kept index, and list query latency by status, function, start time and id prefix.

It drives `gateway.index.TaskIndex` directly with real task records (the JSON the gateway
reads from the task bucket), so the figures are the index's own, without NATS or HTTP:
    .venv/bin/python bench/index.py [--records 1000000] [--dir /tmp/kt-index-bench]
The list query of the HTTP API adds one KV read per task on the page returned.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from kubetask.gateway.index import Query, TaskIndex
from kubetask.models import StageTimestamps, Task, TaskMeta, TaskPhase, TaskSpec, TaskStatus
from kubetask.store import TaskRecord, new_token

T0 = datetime(2026, 11, 1, tzinfo=UTC)
PHASES = [TaskPhase.Succeeded] * 90 + [TaskPhase.Failed] * 5 + [TaskPhase.Queued] * 5


def record(i: int, rnd: random.Random, functions: int) -> tuple[str, bytes]:
    at = T0 + timedelta(milliseconds=i * 100)
    phase = rnd.choice(PHASES)
    done = phase is not TaskPhase.Queued
    task = Task(
        metadata=TaskMeta(name=f"trace-{rnd.getrandbits(64):016x}", namespace=f"acct{i % 16}"),
        spec=TaskSpec(function=f"fn{rnd.randrange(functions)}", payload={"n": i}),
        status=TaskStatus(
            phase=phase,
            attempts=1 if done else 0,
            timestamps=StageTimestamps(
                submitted=at,
                enqueued=at,
                started=at + timedelta(milliseconds=3) if done else None,
                finished=at + timedelta(milliseconds=9) if done else None,
            ),
        ),
    )
    data = TaskRecord(task=task, token=new_token()).model_dump_json().encode()
    return f"{task.account}.{task.id}", data


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def p99_ms(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98] * 1000


def queries(index: TaskIndex, records: int, rnd: random.Random, functions: int) -> dict[str, float]:
    span = records * 0.1
    kinds = {
        "status=Failed": lambda: Query(
            [f"acct{rnd.randrange(16)}"], phases=frozenset({TaskPhase.Failed})
        ),
        "function": lambda: Query(
            [f"acct{rnd.randrange(16)}"], function=f"fn{rnd.randrange(functions)}"
        ),
        "started in 1 min": lambda: (
            lambda lo: Query(
                [f"acct{rnd.randrange(16)}"],
                started_after=lo,
                started_before=lo + timedelta(minutes=1),
            )
        )(T0 + timedelta(seconds=rnd.uniform(0, span))),
        "id prefix": lambda: Query(
            [f"acct{rnd.randrange(16)}"], id_prefix=f"trace-{rnd.getrandbits(8):02x}"
        ),
        "admin, all": lambda: Query(None),
    }
    found = {}
    for name, make in kinds.items():
        samples = []
        for _ in range(200):
            q = make()
            began = time.perf_counter()
            _, cursor = index.search(q, 100, None)
            if cursor is not None:
                index.search(q, 100, cursor)
            samples.append(time.perf_counter() - began)
        found[name] = p99_ms(samples)
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--functions", type=int, default=1000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/kt-index-bench"))
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    path = args.dir / "tasks.sqlite3"
    rnd = random.Random(1)
    index = TaskIndex(path)
    index.resume("bench", 10**12)
    base_rss = rss_mb()
    checkpoints = sorted(
        {c for c in (10_000, 100_000, 1_000_000, args.records) if c <= args.records}
    )
    print(
        f"{'records':>9} {'load µs/rec':>11} {'disk B/rec':>10} {'RSS MB':>7}  list p99 ms (page of 100, and the next)"
    )
    done = 0
    for target in checkpoints:
        load_s = 0.0
        for start in range(done, target, 10_000):
            chunk = [
                record(i, rnd, args.functions) for i in range(start, min(target, start + 10_000))
            ]
            began = time.perf_counter()
            for n, (key, data) in enumerate(chunk, start=start + 1):
                index.apply(key, data, n)
                if n % 5000 == 0:
                    index.commit(n)
            index.commit(start + len(chunk))
            load_s += time.perf_counter() - began
        per_rec = load_s / max(1, target - done) * 1e6
        done = target
        index.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        disk = sum(f.stat().st_size for f in args.dir.iterdir())
        lat = queries(index, target, rnd, args.functions)
        cols = ", ".join(f"{k} {v:.2f}" for k, v in lat.items())
        print(
            f"{target:>9} {per_rec:>11.1f} {disk / target:>10.0f} {rss_mb():>7.0f}  {cols}",
            flush=True,
        )
    index.close()
    began = time.perf_counter()
    reopened = TaskIndex(path)
    resumed_at = reopened.resume("bench", 10**12)
    reopened.search(Query(["acct3"], phases=frozenset({TaskPhase.Failed})), 100, None)
    reopen_ms = (time.perf_counter() - began) * 1000
    print(
        f"reopen a kept index of {done} records and answer a first list: {reopen_ms:.0f} ms (resumes at {resumed_at})"
    )
    print(
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB, base {base_rss:.0f} MB"
    )
    reopened.close()
    if not os.environ.get("KEEP"):
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
