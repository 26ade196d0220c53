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

import pydantic_core
from nats.aio.client import Client

from .cancellation import cancel_and_wait

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
        """In messages of at most `PER_REPORT` accounts, well within NATS' 1 MB payload."""
        written, self._written = list(self._written.items()), {}
        for at in range(0, len(written), PER_REPORT):
            part = dict(written[at : at + PER_REPORT])
            with contextlib.suppress(Exception):
                await self.nc.publish(self.subject, pydantic_core.to_json(part))

    async def close(self) -> None:
        """Stop reporting, after saying what is left to say."""
        await cancel_and_wait(self._reporting)
        await self.report()
