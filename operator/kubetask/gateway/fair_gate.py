"""Take turns at submitting: while accounts compete, each works on at most its weighted share of
the gateway's submission slots at once (`fairness.py`); the rest of its requests wait here, in
arrival order, before any of their work is done.

Why: every submission is several awaits (record, queue) on one event loop. Thirty-two requests
of a flooding account in progress put thirty-two steps ahead of each step of a neighbour's one
request, and its task's submit-to-start time grew tenfold. Waiting here costs a request no CPU,
and the flooding account's throughput is bounded by its share, not stopped.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ..fairness import Fairness, FairnessSettings


class FairGate:
    def __init__(self, settings: FairnessSettings) -> None:
        self.shares = Fairness(settings)
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}

    @asynccontextmanager
    async def turn(self, account: str) -> AsyncIterator[None]:
        free = self.shares.free(account)
        if (free is not None and free <= 0) or self._waiting.get(account):
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(account, deque()).append(waiter)
            try:
                await waiter  # `_admit` counted us in before waking us
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._leave(account)  # admitted, then cancelled before running
                else:
                    self._forget(account, waiter)
                raise
        else:
            self.shares.started(account)
        try:
            yield
        finally:
            self._leave(account)

    def _leave(self, account: str) -> None:
        self.shares.finished(account)
        self._admit()

    def _forget(self, account: str, waiter: asyncio.Future[None]) -> None:
        queue = self._waiting.get(account)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self._waiting[account]

    def _admit(self) -> None:
        """Wake the first waiter of every account that has room now."""
        for account in list(self._waiting):
            queue = self._waiting[account]
            while queue:
                free = self.shares.free(account)
                if free is not None and free <= 0:
                    break
                waiter = queue.popleft()
                if not waiter.done():
                    self.shares.started(account)
                    waiter.set_result(None)
            if not queue:
                del self._waiting[account]
