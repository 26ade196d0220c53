"""A function's `maxStartsPerSecond`: its tasks start no faster than that, the rest waiting
Queued (and saying why), as Celery's `rate_limit` paces a task that calls a rate-limited API."""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from harness import Api, running_dev


async def test_a_functions_tasks_start_no_faster_than_its_max_starts_per_second(
    api: Api,
) -> None:
    await api.function("paced", command=["true"], maxStartsPerSecond=4, maxConcurrency=50)
    ids = [f"paced-{i:02d}" for i in range(16)]
    for task_id in ids:
        await api.submit("paced", task_id=task_id)
    waiting = (await api.call("GET", f"/v1/tasks/{ids[-1]}", 200))["status"]
    if waiting["phase"] == "Queued":  # it may have started already on a slow machine
        assert "at most 4 a second (maxStartsPerSecond)" in waiting["waiting"]["reason"]
    done = [await api.wait(task_id) for task_id in ids]
    assert {d["status"]["phase"] for d in done} == {"Succeeded"}
    starts = sorted(datetime.fromisoformat(d["status"]["timestamps"]["started"]) for d in done)
    # A second's worth at once (4), then 4 a second: the 16th starts 3 s after the first.
    assert (starts[-1] - starts[0]).total_seconds() >= 2.7, starts
    for first in starts:
        within = [s for s in starts if 0 <= (s - first).total_seconds() < 1.0]
        assert len(within) <= 8, (first, starts)  # the burst and a second's refill at most


async def test_the_rate_holds_for_a_burst_after_an_idle_spell(api: Api) -> None:
    """The request a dispatcher leaves open for an idle function delivers a burst's first task
    long after it was opened: that wait must not count as time the bucket refilled after the
    task took its token. (It did: the first two started at once.)"""
    await api.function("steady", command=["true"], maxStartsPerSecond=1, maxConcurrency=50)
    await asyncio.sleep(2)
    ids = [f"steady-{i}" for i in range(3)]
    for task_id in ids:
        await api.submit("steady", task_id=task_id)
    done = [await api.wait(task_id) for task_id in ids]
    starts = sorted(datetime.fromisoformat(d["status"]["timestamps"]["started"]) for d in done)
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= 0.8, starts  # one a second, the first at once


async def test_max_starts_per_second_is_a_positive_number(api: Api) -> None:
    for bad in (0, -1, "fast", True, 2_000_000):
        refused = await api.function("paced", expect=422, command=["true"], maxStartsPerSecond=bad)
        assert "maxStartsPerSecond" in refused["error"] or refused.get("field") == (
            "spec.maxStartsPerSecond"
        ), refused
    fn = await api.function("paced", command=["true"], maxStartsPerSecond=0.5)
    assert fn["spec"]["maxStartsPerSecond"] == 0.5


async def test_the_rate_is_split_over_the_dispatchers(tmp_path: Path) -> None:
    """Two dispatchers each start half of the rate: together the function's tasks start no
    faster than its one `maxStartsPerSecond` (each at the full rate would start them twice as
    fast)."""
    functions = """
apiVersion: kubetask.io/v1alpha1
kind: TaskFunction
metadata: {name: paced}
spec: {command: ["true"], maxStartsPerSecond: 4, maxConcurrency: 50}
"""
    async with running_dev(tmp_path, functions, "--dispatchers", "2") as d:
        async with d.http(timeout=10) as http:
            ids = [f"split-{i:02d}" for i in range(20)]
            for task_id in ids:
                resp = await http.post("/v1/tasks", json={"function": "paced", "id": task_id})
                assert resp.status_code == 202, resp.text
            records: dict[str, dict[str, Any]] = {}
            deadline = time.monotonic() + 60
            while len(records) < len(ids):
                assert time.monotonic() < deadline, records.keys()
                await asyncio.sleep(0.5)
                for task_id in set(ids) - set(records):
                    status = (await http.get(f"/v1/tasks/{task_id}")).json()["status"]
                    if status["phase"] == "Succeeded":
                        records[task_id] = status
    starts = sorted(datetime.fromisoformat(s["timestamps"]["started"]) for s in records.values())
    by = {s["executor"]["dispatcher"] for s in records.values()}
    assert len(by) == 2, by  # both took part
    # A burst of 4 (2 each), then 4 a second together: the 20th starts 4 s after the first.
    assert (starts[-1] - starts[0]).total_seconds() >= 3.5, starts
