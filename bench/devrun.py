"""`kubetask dev` for the benchmarks that need the whole platform as a user runs it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
from kubetask.embedded import free_port


@dataclass(frozen=True)
class Dev:
    url: str
    data: Path
    token: str
    admin_token: str
    dispatcher_metrics: list[str]
    pid: int  # `kubetask dev` itself; the platform's processes are its children

    async def succeeded(self, account: str | None, function: str | None = None) -> int:
        """Tasks of the account (of one function; of every account with None) recorded
        Succeeded, from the dispatchers' own counters (cheaper for the system under test than
        listing them): one scrape each."""
        total = 0.0
        want = 'kubetask_tasks_succeeded_total{account="'
        if account is not None:
            want += f'{account}",function="'
        if account is not None and function is not None:
            want += f'{function}"}}'
        # Only the one family: a whole page holds every function's series (10,000 functions make
        # it large enough to time out while a burst keeps the dispatcher busy).
        only = {"name[]": "kubetask_tasks_succeeded_total"}
        scrape = (self.data / "secrets" / "metrics.token").read_text()
        headers = {"Authorization": f"Bearer {scrape}"}
        async with httpx.AsyncClient(timeout=60, headers=headers) as http:
            for url in self.dispatcher_metrics:
                for line in (await http.get(url, params=only)).text.splitlines():
                    if line.startswith(want):
                        total += float(line.rsplit(" ", 1)[1])
        return int(total)


def children(pid: int) -> list[int]:
    """The child processes of `pid`, from /proc (Linux)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with suppress(FileNotFoundError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


@asynccontextmanager
async def running_dev(data: Path, *flags: str, **env: str) -> AsyncIterator[Dev]:
    """Start `kubetask dev` in `data` with extra flags and KUBETASK_* variables; Ctrl-C it
    afterwards."""
    port = free_port()
    argv = ["dev", "--data-dir", str(data), "--port", str(port), "--nats-port", "0", *flags]
    out = data / "dev.out"
    with open(out, "wb") as sink:
        dev = subprocess.Popen(
            [sys.executable, "-m", "kubetask", *argv],
            env=dict(os.environ, **env),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        cfg = data / "client.json"

        def ready() -> bool:
            return cfg.exists() and "url" in cfg.read_text() and "(dispatchers)" in out.read_text()

        while not ready():  # noqa: ASYNC110 (files)
            await asyncio.sleep(0.1)
        creds = json.loads(cfg.read_text())
        line = next(x for x in out.read_text().splitlines() if "metrics:" in x)
        urls = line.split("(gateway), ", 1)[1].split(" (dispatchers)")[0].split(", ")
        yield Dev(
            f"http://127.0.0.1:{port}", data, creds["token"], creds["adminToken"], urls, dev.pid
        )
    finally:
        dev.send_signal(signal.SIGINT)
        dev.wait(10)
