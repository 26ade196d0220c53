"""Accounts take turns at the task index: at most `slots` queries are handed to its one thread
at a time, and the next one goes to the account that waited longest for its turn, not to the
request that arrived first.

Why: the index answers on one thread, in order (`indexing.py`). An account that sent fifty list
queries at once put fifty queries ahead of a neighbour's one, and the neighbour's list waited
for all of them. Now it waits for at most the queries in progress and one turn of each other
waiting account. Alone, an account has every slot, so this costs a single tenant nothing.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class QueryTurns:
    def __init__(self, slots: int = 2) -> None:
        # Two keep the thread busy while the loop hands the next query over.
        self.slots = slots
        self.busy = 0
        # Accounts in the order their turn comes; each with its waiting queries, oldest first.
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}

    @asynccontextmanager
    async def turn(self, account: str) -> AsyncIterator[None]:
        if self.busy < self.slots and not self._waiting:
            self.busy += 1
        else:
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(account, deque()).append(waiter)
            try:
                await waiter  # `_next` counted us in before waking us
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._release()
                else:
                    self._forget(account, waiter)
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        self.busy -= 1
        while self._waiting and self.busy < self.slots:
            account, queue = next(iter(self._waiting.items()))
            waiter = queue.popleft()
            del self._waiting[account]
            if queue:
                self._waiting[account] = queue  # its next query waits for everyone else's turn
            if not waiter.done():
                self.busy += 1
                waiter.set_result(None)

    def _forget(self, account: str, waiter: asyncio.Future[None]) -> None:
        queue = self._waiting.get(account)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self._waiting[account]
