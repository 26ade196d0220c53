"""What a process wrote per account to a history stream every account shares (the logs, the
audit trail), said every `REPORT_EVERY` to the gateways, which hold each account to its quota
there by purging its oldest messages (`gateway/history_quota.py`).

JetStream counts bytes only for a whole stream, and has no limit per subject prefix; the
writers know what they wrote. A report is `{account: [messages, bytes]}` on a core subject, so
it costs a dict update per write and one small message a second per process; one lost (no
gateway listening) is only a purge that comes later.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterable

import pydantic_core
from nats.aio.client import Client

from . import grammar
from .cancellation import cancel_and_wait

log = logging.getLogger("kubetask.usage_reports")

# What nats-server stores for a message besides its subject, headers and data.
STORED_OVERHEAD = 30
REPORT_EVERY = 1.0
# Accounts in one report message: ~60 bytes each.
PER_REPORT = 2000


class Tally:
    def __init__(self, nc: Client, subject: str, every: float = REPORT_EVERY) -> None:
        self.nc = nc
        self.subject = subject
        self._written: dict[str, list[int]] = {}
        self._reporting = asyncio.create_task(self._report_forever(every))

    def add(self, account: str, nbytes: int) -> None:
        """One message of `nbytes` (subject, headers and data) written for `account`."""
        written = self._written.get(account)
        if written is None:
            written = self._written[account] = [0, 0]
        written[0] += 1
        written[1] += nbytes + STORED_OVERHEAD

    async def _report_forever(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            await self.report()

    async def report(self) -> None:
        written, self._written = self._written, {}
        await publish(self.nc, self.subject, written.items())

    async def close(self) -> None:
        """Stop reporting, after saying what is left to say."""
        await cancel_and_wait(self._reporting)
        await self.report()


async def publish(nc: Client, subject: str, counts: Iterable[tuple[str, object]]) -> None:
    """`{account: [messages, bytes]}` in messages of at most `PER_REPORT` accounts, well within
    NATS' 1 MB payload; a report NATS refuses is dropped (the next one says it again)."""
    entries = list(counts)
    for at in range(0, len(entries), PER_REPORT):
        part = dict(entries[at : at + PER_REPORT])
        with contextlib.suppress(Exception):
            await nc.publish(subject, pydantic_core.to_json(part))


def parse(data: bytes) -> dict[str, tuple[int, int]]:
    """`{account: [messages, bytes]}`, both at least 1; entries that are not are left out.
    Only platform components may publish reports, so one would be a bug, not an attack:
    logged, not fatal."""
    try:
        report = json.loads(data)
    except ValueError:
        report = None
    if not isinstance(report, dict):
        log.warning("a usage report that is not a JSON object was ignored")
        return {}
    counts: dict[str, tuple[int, int]] = {}
    for account, value in report.items():
        if (
            grammar.is_name(account)
            and isinstance(value, list)
            and len(value) == 2
            and all(type(v) is int and v >= 1 for v in value)
        ):
            counts[account] = (value[0], value[1])
        else:
            log.warning("a usage entry for %r was ignored: %r", account[:64], value)
    return counts
