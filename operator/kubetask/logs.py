"""Execution logs on JetStream, one subject per task: written as the attempt runs, readable
after the fact or followed live. A `final` line marks that the task reached a terminal phase."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pydantic_core
from nats.aio.client import Client

from . import direct_reads, names
from .cancellation import cancel_and_wait
from .history import TTL_HEADER_BYTES
from .usage_reports import Tally

# A follower reads again this soon after a wake that found nothing new, and this often when it
# hears nothing at all (a wake lost, e.g. in a reconnection).
RECHECK = 0.05
FALLBACK_POLL = 1.0
# A follower that heard nothing for this long asks whether the task ended meanwhile: a final
# line that was never stored (a writer refused, a history quota) must not hold it for its
# whole idle timeout.
ENDED_CHECK = 15.0


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


async def records(
    nc: Client,
    account: str,
    task_id: str,
    follow: bool,
    idle_timeout: float = 3600,
    ended: Callable[[], Awaitable[bool]] | None = None,
) -> AsyncGenerator[dict[str, Any], None]:
    """Yield log records oldest first, by direct gets (`direct_reads.py`); with `follow`, keep
    yielding until the final line, until no line came for `idle_timeout`, or until `ended`
    says, after ENDED_CHECK without a line, that the task ended long enough ago that its final
    line would have been stored by now.

    Lines are published without waiting, so a task can be recorded as finished a moment before
    its last lines are stored: for a finished task pass `follow` with a short `idle_timeout`.
    """
    subject = names.log_subject(account, task_id)
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        # Heard before the first read, so no line stored after that read goes unnoticed.
        heard = (
            await stack.enter_async_context(direct_reads.wakeups(nc, subject)) if follow else None
        )
        last = 0
        quiet_since = loop.time()
        ask_at = quiet_since + ENDED_CHECK
        woke = False
        while True:
            if heard is not None:
                heard.clear()
            batch = await direct_reads.after(nc, names.LOGS_STREAM, subject, last)
            for msg in batch.messages:
                last = msg.sequence
                record = json.loads(msg.data)
                yield record
                if follow and record.get("final"):
                    return
            if batch.messages:
                quiet_since = loop.time()
                ask_at = quiet_since + ENDED_CHECK
            if batch.pending:
                continue
            if heard is None:
                return
            if ended is not None and loop.time() >= ask_at:
                ask_at = loop.time() + ENDED_CHECK
                if await ended():
                    return
            left = quiet_since + idle_timeout - loop.time()
            if left <= 0:
                return
            # A wake that found nothing: the stream may store the line a moment after it was
            # heard, so look again soon; otherwise wait to hear one, looking now and then.
            wait = RECHECK if woke and not batch.messages else FALLBACK_POLL
            try:
                await asyncio.wait_for(heard.wait(), min(wait, left))
                woke = True
            except TimeoutError:
                woke = False
