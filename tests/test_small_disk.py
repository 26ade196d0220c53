"""`kubetask dev` with its data directory on a small disk (a 64 MiB tmpfs, mounted for the
test): JetStream's storage there is three quarters of it, less than the history streams'
defaults reserve (4 GiB of logs, 2 GiB of audit trail)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import running_dev
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
"""


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
                r"note: JetStream has (\d+) MiB on this disk: history held to"
                r" KUBETASK_LOGS_MAX_BYTES=(\d+) MiB, KUBETASK_EVENTS_MAX_BYTES=(\d+) MiB",
                said,
            )
            assert held is not None, said
            store, logs, events = (int(n) for n in held.groups())
            assert 40 <= store <= 48 and logs == store // 4 and events == store // 8, said
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
