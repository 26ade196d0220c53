"""`kubetask dev` with its data directory on a small disk (a 64 MiB tmpfs, mounted for the
test): dev gives JetStream 30% of it (`store_budget.NATS_SHARE`), far less than the history
streams' defaults reserve (4 GiB of logs, 2 GiB of audit trail)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from harness import running_dev
from kubetask import store_budget
from kubetask.embedded import free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="only root can mount a small disk"),
]

FUNCTIONS = """
apiVersion: kubetask.io/v1alpha1
kind: TaskFunction
metadata: {name: quick}
spec: {command: ["true"]}
---
apiVersion: kubetask.io/v1alpha1
kind: TaskFunction
metadata: {name: sink}
spec: {command: ["sh", "-c", "cat > /dev/null"], maxConcurrency: 8}
---
apiVersion: kubetask.io/v1alpha1
kind: TaskFunction
metadata: {name: twice}
spec:
  command: ["python3", "-c", "import json, sys; p = json.load(sys.stdin); print(json.dumps([p, p]))"]
  maxConcurrency: 8
"""
# Text that compresses badly, as most payloads do.
PAYLOAD = "".join(chr(65 + (i * 7919) % 58) for i in range(150_000))


@contextlib.contextmanager
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)


async def test_history_is_held_to_what_the_disk_has_and_tasks_run(tmp_path: Path) -> None:
    """Making the history streams failed ("insufficient storage resources"), and `kubetask
    dev` waited for a gateway that could not start (seen). Each is now held to its share."""
    with small_disk(tmp_path) as disk:
        async with running_dev(disk, FUNCTIONS) as dev:
            said = dev.log.read_text()
            held = re.search(
                r"note: JetStream has ([\d.]+) MiB on this disk: history held to"
                r" KUBETASK_LOGS_MAX_BYTES=([\d.]+) MiB, KUBETASK_EVENTS_MAX_BYTES=([\d.]+) MiB",
                said,
            )
            assert held is not None, said
            store, logs, events = (float(n) for n in held.groups())
            assert 15 <= store <= 64 * store_budget.NATS_SHARE, said
            assert logs == pytest.approx(store / 4, abs=0.1), said
            assert events == pytest.approx(store / 8, abs=0.1), said
            async with dev.http() as http:
                resp = await http.post("/v1/tasks", json={"function": "quick"})
                assert resp.status_code == 202, resp.text
                task = resp.json()["metadata"]["name"]
                deadline = time.monotonic() + 30
                while (await http.get(f"/v1/tasks/{task}")).json()["status"]["phase"] != (
                    "Succeeded"
                ):
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)


def test_a_history_cap_set_past_what_the_disk_has_stops_dev_saying_which(tmp_path: Path) -> None:
    """One set by hand is kept as given; a stream it does not fit in names the settings
    rather than waiting for room that will not come."""
    with small_disk(tmp_path) as disk:
        env = {**os.environ, "KUBETASK_LOGS_MAX_BYTES": str(1 << 30)}
        argv = ["dev", "--data-dir", str(disk / "data"), "--port", str(free_port())]
        done = subprocess.run(
            [sys.executable, "-m", "kubetask", *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode != 0, done.stdout + done.stderr
    assert "held to KUBETASK_EVENTS_MAX_BYTES=" in done.stderr, done.stderr
    assert "KUBETASK_LOGS_MAX_BYTES=" not in done.stderr.split("\n")[0], done.stderr
    said = (
        "stream KT_LOGS would reserve 1 GiB of JetStream's storage, more than nats-server has"
        " left: lower KUBETASK_LOGS_MAX_BYTES and KUBETASK_EVENTS_MAX_BYTES"
    )
    assert said in done.stderr, done.stderr


async def test_submissions_are_refused_before_the_store_is_full_and_accepted_tasks_finish(
    tmp_path: Path,
) -> None:
    """Filling the disk with records failed JetStream's writes after their timeout: a
    submission was answered 503 after 10 s; with JetStream given 45% of the disk, it still
    filled and JetStream disabled itself (seen). Now submissions are refused with 507 while room is kept for the
    tasks accepted, which finish; deleting some makes room for more."""
    with small_disk(tmp_path) as disk:
        async with running_dev(disk, FUNCTIONS) as dev, dev.http(timeout=30) as http:
            accepted: list[str] = []
            refused: list[httpx.Response] = []
            for _ in range(400):
                resp = await http.post("/v1/tasks", json={"function": "sink", "payload": PAYLOAD})
                assert resp.status_code in (202, 507), resp.text
                if resp.status_code == 202:
                    accepted.append(resp.json()["metadata"]["name"])
                else:
                    refused.append(resp)
            assert accepted and refused, (len(accepted), len(refused))
            body = refused[0].json()
            assert body["error"].startswith("the platform's storage is nearly full"), body
            assert body["retryAfter"] == 60 and refused[0].headers["retry-after"] == "60"
            deadline = time.monotonic() + 60
            for task in accepted:
                while (
                    phase := (await http.get(f"/v1/tasks/{task}")).json()["status"]["phase"]
                ) != ("Succeeded"):
                    assert phase in ("Queued", "Running"), phase
                    assert time.monotonic() < deadline, f"{task} is {phase}"
                    await asyncio.sleep(0.1)
            for task in accepted[: len(accepted) // 2]:
                resp = await http.delete(f"/v1/tasks/{task}")
                assert resp.status_code == 204, resp.text
            deadline = time.monotonic() + 10
            while (
                resp := await http.post("/v1/tasks", json={"function": "sink", "payload": PAYLOAD})
            ).status_code == 507:
                assert time.monotonic() < deadline, resp.text
                await asyncio.sleep(0.2)
            assert resp.status_code == 202, resp.text
        assert "JetStream out of space" not in (disk / "data" / "logs" / "nats.log").read_text()


async def test_tasks_are_deleted_when_results_took_the_store_to_its_limit(tmp_path: Path) -> None:
    """Results are written after the room check: tasks whose result outgrows their payload
    take JetStream to its limit, where it takes no write, a deletion's marker included. Every
    delete was a 507 and the tasks not yet started stayed Queued until records expired (seen).
    Now a delete purges the record, and the room it frees lets the rest finish. Meanwhile the
    task index's write-ahead log filled the disk and nats-server disabled JetStream (seen): it
    is now held to an eighth of the store."""
    payload = PAYLOAD[:100_000]
    with small_disk(tmp_path) as disk:
        async with running_dev(disk, FUNCTIONS) as dev, dev.http(timeout=30) as http:
            accepted = []
            while (
                resp := await http.post("/v1/tasks", json={"function": "twice", "payload": payload})
            ).status_code == 202:
                accepted.append(resp.json()["metadata"]["name"])
            assert resp.status_code == 507 and accepted, resp.text
            # A write of its own, each time: a function registered again unchanged is not.
            deadline = time.monotonic() + 60
            for timeout in itertools.count(1):
                spec = {"command": ["true"], "timeoutSeconds": timeout}
                probe = {"metadata": {"name": "probe"}, "spec": spec}
                if (resp := await http.put("/v1/functions/probe", json=probe)).status_code == 507:
                    break
                assert time.monotonic() < deadline, (
                    f"JetStream never reached its limit: {resp.text}"
                )
                await asyncio.sleep(0.5)
            assert resp.json()["error"].startswith("JetStream's storage is full"), resp.text
            waiting = set(accepted)
            deadline = time.monotonic() + 120
            while waiting:
                phases = {}
                for task in waiting:
                    resp = await http.get(f"/v1/tasks/{task}")
                    assert resp.status_code == 200, resp.text
                    phases[task] = resp.json()
                done = [t for t, task in phases.items() if task["status"]["phase"] == "Succeeded"]
                for task in done:
                    assert phases[task]["status"]["result"] == [payload, payload]
                    resp = await http.delete(f"/v1/tasks/{task}")
                    assert resp.status_code == 204, resp.text
                    assert (await http.get(f"/v1/tasks/{task}")).status_code == 404
                    waiting.discard(task)
                assert time.monotonic() < deadline, {t: phases[t]["status"] for t in waiting}
                await asyncio.sleep(0.5)
            listed = (await http.get("/v1/tasks", params={"function": "twice"})).json()
            assert listed["items"] == [], [t["metadata"]["name"] for t in listed["items"]]
        assert "JetStream out of space" not in (disk / "data" / "logs" / "nats.log").read_text()
