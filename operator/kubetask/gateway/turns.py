"""Requests that wait in line, one line per account, for a turn at something the gateway shares.

What is shared and who may go next differ (`fair_gate.py`: an account's share of the
submission slots; `query_turns.py`: the task index's thread, round robin); waiting, being
woken, and giving up while waiting are the same, and are here. A request that gives up (its
client went away) leaves its line without holding a turn; one that was admitted just before
giving it up hands the turn back.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Turns:
    def __init__(self) -> None:
        # Accounts with requests waiting, each line oldest first.
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}

    def _may_enter(self, account: str) -> bool:
        """Whether a request of `account` arriving now goes ahead of the lines."""
        raise NotImplementedError

    def _enter(self, account: str) -> None:
        """Count a turn taken."""
        raise NotImplementedError

    def _leave(self, account: str) -> None:
        """Count a turn given back, and admit whoever may go now (`_wake`)."""
        raise NotImplementedError

    @asynccontextmanager
    async def turn(self, account: str) -> AsyncIterator[None]:
        if self._may_enter(account):
            self._enter(account)
        else:
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(account, deque()).append(waiter)
            try:
                await waiter  # `_wake` counted us in before waking us
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._leave(account)  # admitted, then cancelled before running
                else:
                    self._forget(account, waiter)
                raise
        try:
            yield
        finally:
            self._leave(account)

    def _wake(self, account: str) -> None:
        """Admit the first request in `account`'s line (which must not be empty)."""
        queue = self._waiting[account]
        waiter = queue.popleft()
        if not queue:
            del self._waiting[account]
        if not waiter.done():
            self._enter(account)
            waiter.set_result(None)

    def _forget(self, account: str, waiter: asyncio.Future[None]) -> None:
        queue = self._waiting.get(account)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self._waiting[account]
