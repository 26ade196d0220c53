"""`kubetask dev` for the benchmarks that need the whole platform as a user runs it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from kubetask.embedded import free_port


@dataclass(frozen=True)
class Dev:
    url: str
    data: Path
    token: str
    admin_token: str


@asynccontextmanager
async def running_dev(data: Path, **env: str) -> AsyncIterator[Dev]:
    """Start `kubetask dev` in `data` with extra KUBETASK_* variables; Ctrl-C it afterwards."""
    port = free_port()
    argv = ["dev", "--data-dir", str(data), "--port", str(port), "--nats-port", "0"]
    dev = subprocess.Popen(
        [sys.executable, "-m", "kubetask", *argv],
        env=dict(os.environ, **env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        cfg = data / "client.json"
        while not (cfg.exists() and "url" in cfg.read_text()):  # noqa: ASYNC110 (a file)
            await asyncio.sleep(0.1)
        creds = json.loads(cfg.read_text())
        yield Dev(f"http://127.0.0.1:{port}", data, creds["token"], creds["adminToken"])
    finally:
        dev.send_signal(signal.SIGINT)
        dev.wait(10)
