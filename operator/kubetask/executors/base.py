"""The narrow interface between the dispatcher and whatever runs user code."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import pydantic_core

from ..models import TaskFunction

LogLine = Callable[[str, str], None]  # (stream name, line)


@dataclass(frozen=True)
class Placement:
    """Where an attempt runs, once an executor that starts pods knows it."""

    pod: str
    namespace: str
    node: str | None
    container: str


@dataclass(frozen=True, eq=False)
class Invocation:
    account: str
    task_id: str
    attempt: int
    function: TaskFunction
    payload: Any
    timeout: float
    max_result_bytes: int
    log: LogLine
    # Told where the attempt runs when that is learnt after it started (a pod's name and node).
    placed: Callable[[Placement], None] | None = None
    # Told of output as it is read; answers the seconds to read no more of it, so that one
    # account's output is read at its pace (`dispatch/log_pacing.py`).
    pace: Callable[[bytes], float] | None = None


@dataclass
class Outcome:
    ok: bool
    result: Any = None
    error: str | None = None
    exit_code: int | None = None
    timed_out: bool = False
    killed: bool = False
    instance: str | None = None
    # The executor pushed back (HTTP 429/503): not a task failure, and no attempt is spent.
    busy: bool = False
    # What the attempt printed last, kept as evidence when it fails (`TAIL_BYTES` each).
    stdout_tail: str | None = None
    stderr_tail: str | None = None

    def evidence(self) -> str | None:
        """The error as the task records it: the reason first (lists show that line), then
        what the attempt printed last, so a failed process's output is not lost."""
        if self.ok:
            return None
        parts = [self.error or "failed"]
        for name, tail in (("stderr", self.stderr_tail), ("stdout", self.stdout_tail)):
            if tail:
                parts.append(f"--- {name} (last {TAIL_BYTES} bytes) ---\n{tail.rstrip()}")
        return "\n".join(parts)


TAIL_BYTES = 2048


class Tail:
    """The last `TAIL_BYTES` of a stream, in bounded memory whatever the process prints."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def add(self, chunk: bytes) -> None:
        self._buf += chunk
        if len(self._buf) > 2 * TAIL_BYTES:
            del self._buf[: len(self._buf) - TAIL_BYTES]

    def text(self) -> str | None:
        data = bytes(self._buf[-TAIL_BYTES:])
        return data.decode("utf-8", errors="replace") if data else None


class Lines:
    """Output as log lines, from pieces split anywhere (an unbuffered writer's `print` arrives
    as several writes); a line longer than MAX_LINE is logged in pieces."""

    MAX_LINE = 64 << 10

    def __init__(self) -> None:
        self._partial = bytearray()

    def feed(self, data: bytes) -> list[str]:
        self._partial += data
        lines = []
        most = self.MAX_LINE
        while (end := self._partial.find(b"\n", 0, most + 1)) >= 0 or len(self._partial) > most:
            cut = end
            if cut < 0:  # a piece of a long line, cut where no UTF-8 character is split
                cut = most
                while cut > most - 3 and self._partial[cut] & 0xC0 == 0x80:
                    cut -= 1
            lines.append(bytes(self._partial[:cut]).decode("utf-8", errors="replace"))
            del self._partial[: cut + (end >= 0)]
        return lines

    def rest(self) -> list[str]:
        """The last line, if it had no newline."""
        return self.feed(b"\n") if self._partial else []


class Execution(Protocol):
    instance: str | None

    async def wait(self) -> Outcome: ...

    async def kill(self) -> None: ...


class Executor(Protocol):
    async def start(self, inv: Invocation) -> Execution: ...

    async def close(self) -> None: ...


def encode_payload(payload: Any) -> bytes:
    return pydantic_core.to_json(payload)


def decode_result(raw: bytes) -> Any:
    """JSON when the function printed JSON, else the text; None when it printed nothing.
    `NaN` and `Infinity` are not JSON (Python's `json.dumps` writes them), and a number past a
    double's range (`1e400`) parses to infinity: such output is its text, as printed, rather
    than numbers every reader would turn into null."""
    text = raw.decode("utf-8", errors="replace").strip()
    if not text:
        return None
    try:
        value = pydantic_core.from_json(text, allow_inf_nan=False)
    except ValueError:
        return text
    return value if _finite(value) else text


def _finite(value: Any) -> bool:
    """No infinity anywhere in a parsed document (the parser bounds its depth)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def how_it_ended(returncode: int) -> str:
    """A local process's end as a person reads it (Popen's code: negative for a signal)."""
    return f"killed by signal {-returncode}" if returncode < 0 else f"exited with code {returncode}"


# The dispatcher's own environment (NATS credentials, tokens) is not handed to user code.
_INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")


def base_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in _INHERITED}


def env_for(inv: Invocation, base: dict[str, str]) -> dict[str, str]:
    env = dict(base)
    env.update({e.name: e.value for e in inv.function.spec.env})
    env.update(
        {
            "KUBETASK_TASK_ID": inv.task_id,
            "KUBETASK_ACCOUNT": inv.account,
            "KUBETASK_FUNCTION": inv.function.name,
            "KUBETASK_ATTEMPT": str(inv.attempt),
            "KUBETASK_TIMEOUT_SECONDS": str(inv.timeout),
        }
    )
    return env
