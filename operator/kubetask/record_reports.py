"""Each account's task records as the gateways count them, said every second to the operator,
which holds kubectl-applied Tasks to the record quota HTTP submissions are held to
(`gateway/record_quota.py`).

Only a gateway counts the records (SQLite triggers on its task index); the operator, which
submits the Tasks applied with kubectl, has no index, and without the count an account applying
Tasks kept records past its quota. Only the accounts holding at least `NEAR` of the quota are
said, so a report is empty on nearly every platform; the operator takes an account it does not
hear of as holding just that much, and adds what it created itself since (as a gateway adds
its own). Before, it took such an account as holding nothing, and one applying the other half
of its quota within those seconds went past it.

A report is `{account: [records, bytes]}` on a core subject (`usage_reports.py`'s format),
also sent when empty: it says a gateway is counting. With no report for `FRESH` seconds (no
gateway, or none that has loaded its index) the operator refuses nothing, as a gateway refuses
nothing until its index is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import Protocol

from nats.aio.client import Client

from . import names, usage_reports

NEAR = 0.5
REPORT_EVERY = 1.0
# How long a report counts: an account no longer said is no longer near its quota.
FRESH = 5.0


class Counts(Protocol):
    """Each account's records and their bytes, and whether that is all of them."""

    @property
    def usage(self) -> Mapping[str, tuple[int, int]]: ...

    @property
    def loaded(self) -> bool: ...


async def report_forever(nc: Client, counts: Counts, limit: int) -> None:
    """A gateway's part: its index's counts of the accounts near `limit`."""
    while True:
        await asyncio.sleep(REPORT_EVERY)
        if not counts.loaded:
            continue
        near = [(a, list(c)) for a, c in counts.usage.items() if c[1] >= limit * NEAR]
        if near:
            await usage_reports.publish(nc, names.RECORD_USAGE_SUBJECT, near)
        else:
            with contextlib.suppress(Exception):
                await nc.publish(names.RECORD_USAGE_SUBJECT, b"{}")


class Heard:
    """The operator's part: the counts the gateways said lately, as `Counts`."""

    def __init__(self) -> None:
        self.usage: dict[str, tuple[int, int]] = {}
        self._said: dict[str, float] = {}
        self._last = float("-inf")

    @property
    def loaded(self) -> bool:
        return time.monotonic() - self._last < FRESH

    def take(self, data: bytes, now: float) -> None:
        self._last = now
        for account, count in usage_reports.parse(data).items():
            self.usage[account] = count
            self._said[account] = now
        for account in [a for a, said in self._said.items() if said < now - FRESH]:
            del self.usage[account], self._said[account]

    async def run(self, nc: Client) -> None:
        sub = await nc.subscribe(names.RECORD_USAGE_SUBJECT)
        try:
            async for msg in sub.messages:
                self.take(msg.data, time.monotonic())
        finally:
            await sub.unsubscribe()
