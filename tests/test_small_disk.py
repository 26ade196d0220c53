"""`kubetask dev` with its data directory on a small disk (a 64 MiB tmpfs, mounted for the
test): dev gives JetStream 30% of it (`store_budget.NATS_SHARE`), far less than the history
streams' defaults reserve (4 GiB of logs, 2 GiB of audit trail)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from harness import running_dev
from kubetask import jetstream, store_budget
from kubetask.embedded import free_port
from nats.js.errors import APIError

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
  maxConcurrency: 2
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


async def test_attempts_wait_for_room_and_tasks_are_deleted_to_make_it(tmp_path: Path) -> None:
    """Results are written after the room check: tasks whose results outgrew their payloads
    took JetStream to its limit. There an attempt that had run could not record its outcome and
    ran again later, and no write was taken, a delete's included: every delete was a 507, and
    the store stayed full until records expired. Meanwhile the task index's write-ahead log
    filled the disk and nats-server disabled JetStream (all seen). Now dispatchers start
    nothing near the limit and say so, which leaves room for what people do: deleting finished
    tasks, and, when only waiting ones are left, stopping and deleting some. Each task that
    ran, ran once."""
    payload = PAYLOAD[:50_000]
    with small_disk(tmp_path) as disk:
        async with running_dev(disk, FUNCTIONS) as dev, dev.http(timeout=30) as http:
            accepted = []
            while (
                resp := await http.post("/v1/tasks", json={"function": "twice", "payload": payload})
            ).status_code == 202:
                accepted.append(resp.json()["metadata"]["name"])
            assert resp.status_code == 507 and accepted, resp.text
            # Nothing deleted until nothing moves for longer than an outcome is retried for
            # (half of KUBETASK_ACK_WAIT): an attempt that could not record its outcome by then
            # was handed back, to run again.
            seen, since = None, time.monotonic()
            while time.monotonic() - since < 20:
                now = [(await http.get(f"/v1/tasks/{t}")).json()["status"] for t in accepted]
                phases = [(s["phase"], s["attempts"]) for s in now]
                if phases != seen:
                    seen, since = phases, time.monotonic()
                await asyncio.sleep(1)
            waiting, held, still = set(accepted), "", None
            statuses: dict[str, dict[str, Any]] = {}
            deadline = time.monotonic() + 150
            while waiting:
                assert time.monotonic() < deadline, statuses
                statuses.clear()
                for task in waiting:
                    resp = await http.get(f"/v1/tasks/{task}")
                    assert resp.status_code == 200, resp.text
                    statuses[task] = resp.json()["status"]
                done = [t for t, status in statuses.items() if status["phase"] == "Succeeded"]
                for task in done:
                    assert statuses[task]["attempts"] == 1, statuses[task]
                    assert statuses[task]["result"] == [payload, payload]
                    resp = await http.delete(f"/v1/tasks/{task}")
                    assert resp.status_code == 204, resp.text
                    assert (await http.get(f"/v1/tasks/{task}")).status_code == 404
                    waiting.discard(task)
                queued = [t for t, status in statuses.items() if status["phase"] == "Queued"]
                for task in queued:
                    reason = (statuses[task]["waiting"] or {}).get("reason", "")
                    held = reason if "nearly full" in reason else held
                if done or any(s["phase"] == "Running" for s in statuses.values()):
                    still = None
                elif still is None:
                    still = time.monotonic()
                elif held and time.monotonic() - still > 3:
                    # Only waiting tasks hold the room: one is given up to make some.
                    resp = await http.post(f"/v1/tasks/{queued[0]}/stop")
                    assert resp.status_code == 200, resp.text
                    resp = await http.delete(f"/v1/tasks/{queued[0]}")
                    assert resp.status_code == 204, resp.text
                    waiting.discard(queued[0])
                    still = None
                await asyncio.sleep(0.5)
            assert "KUBETASK_STORE_MAX_BYTES" in held, held
            listed = (await http.get("/v1/tasks", params={"function": "twice"})).json()
            assert listed["items"] == [], [t["metadata"]["name"] for t in listed["items"]]
        assert "JetStream out of space" not in (disk / "data" / "logs" / "nats.log").read_text()


async def test_a_task_is_deleted_when_jetstream_is_at_its_limit(tmp_path: Path) -> None:
    """At its limit JetStream takes no write, a delete's marker included: every delete was a
    507, so nothing could make room. A delete now purges the record first. The limit is
    reached here with a stream of the test's own."""
    with small_disk(tmp_path) as disk:
        async with running_dev(disk, FUNCTIONS) as dev, dev.http() as http:
            resp = await http.post("/v1/tasks", json={"function": "quick"})
            task = resp.json()["metadata"]["name"]
            deadline = time.monotonic() + 30
            while (await http.get(f"/v1/tasks/{task}")).json()["status"]["phase"] != "Succeeded":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            client = json.loads((dev.data / "client.json").read_text())
            password = json.loads((dev.data / "secrets" / "nats-users.json").read_text())["admin"]
            nc = await nats.connect(client["nats"], user="admin", password=password)
            try:
                js = nc.jetstream()
                await js.add_stream(name="FILLER", subjects=["filler"])
                with pytest.raises(APIError) as full:
                    for _ in range(10_000):
                        await js.publish("filler", os.urandom(1 << 16))
                assert full.value.err_code in jetstream.NO_ROOM, full.value
                refused = await http.put(
                    "/v1/functions/probe",
                    json={"metadata": {"name": "probe"}, "spec": {"command": ["true"]}},
                )
                assert refused.status_code == 507, refused.text  # nothing else is written
                resp = await http.delete(f"/v1/tasks/{task}")
                assert resp.status_code == 204, resp.text
                assert (await http.get(f"/v1/tasks/{task}")).status_code == 404
                listed = (await http.get("/v1/tasks", params={"idPrefix": task})).json()
                assert listed["items"] == [], listed
                await js.delete_stream("FILLER")
            finally:
                await nc.close()
