"""Execution logs on JetStream, one subject per task: written as the attempt runs, readable
after the fact or followed live. A `final` line marks that the task reached a terminal phase."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Any

import pydantic_core
from nats.aio.client import Client
from nats.js import JetStreamContext

from . import jetstream, names
from .cancellation import cancel_and_wait
from .history import TTL_HEADER_BYTES
from .usage_reports import Tally


def encode_line(attempt: int, stream: str, text: str, final: bool = False) -> bytes:
    record: dict[str, Any] = {
        "ts": datetime.now(UTC).isoformat(),
        "attempt": attempt,
        "stream": stream,
        "line": text,
    }
    if final:
        record["final"] = True
    return pydantic_core.to_json(record)


class LogWriter:
    """Fire-and-forget publishing from synchronous callbacks (executor output pumps). What it
    wrote per account is reported, so each account's lines are kept to its quota
    (`usage_reports.py`)."""

    def __init__(self, nc: Client, headers: Callable[[str], dict[str, str] | None]) -> None:
        self.nc = nc
        self._headers = headers  # per account: its history's TTL (`history.py`)
        self._queue: asyncio.Queue[tuple[str, bytes, dict[str, str] | None]] = asyncio.Queue()
        self._task = asyncio.create_task(self._drain())
        self.tally = Tally(nc, names.LOG_USAGE_SUBJECT)

    def line(
        self, account: str, task_id: str, attempt: int, stream: str, text: str, final: bool = False
    ) -> None:
        data = encode_line(attempt, stream, text, final)
        subject = names.log_subject(account, task_id)
        headers = self._headers(account)
        self.tally.add(account, len(subject) + len(data) + (TTL_HEADER_BYTES if headers else 0))
        self._queue.put_nowait((subject, data, headers))

    async def _drain(self) -> None:
        while True:
            subject, data, headers = await self._queue.get()
            with contextlib.suppress(Exception):
                await self.nc.publish(subject, data, headers=headers)
            self._queue.task_done()

    async def close(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), 5)
        await self.tally.close()
        with contextlib.suppress(Exception):
            await self.nc.flush(timeout=2)
        await cancel_and_wait(self._task)


def reader(
    js: JetStreamContext, account: str, task_id: str
) -> AbstractAsyncContextManager[JetStreamContext.PushSubscription]:
    """A task's log, to read with `records`; opened before a response starts, so that a stream
    with no room for another reader is a 503, not a cut answer."""
    return jetstream.subject_reader(js, names.LOGS_STREAM, names.log_subject(account, task_id))


async def records(
    sub: JetStreamContext.PushSubscription, follow: bool, idle_timeout: float = 3600
) -> AsyncIterator[dict[str, Any]]:
    """Yield log records oldest first; with `follow`, keep yielding until the final line.

    Lines are published without waiting, so a task can be recorded as finished a moment before
    its last lines are stored: for a finished task pass `follow` with a short `idle_timeout`.
    """
    remaining = jetstream.to_deliver(await sub.consumer_info())
    while follow or remaining > 0:
        try:
            msg = await sub.next_msg(timeout=idle_timeout)
        except TimeoutError:
            return
        remaining = int(msg.metadata.num_pending)
        record = json.loads(msg.data)
        yield record
        if follow and record.get("final"):
            return
