"""Log reads open at once, per account, capped.

Each read of a task's log (`GET /v1/tasks/{id}/logs`, and `?follow=true` for as long as the
task runs) holds a JetStream consumer on the one log stream every account shares, and a
subscription on the gateway's connection. Without a cap one account could open thousands and
slow every other account's reads, or nats-server itself; past it, a read is a 429.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from .errors import ApiError


class LogStreams:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: Counter[str] = Counter()

    def open(self, account: str) -> Callable[[], None]:
        """Count one more read of `account`'s; the returned release may be called any number
        of times (a stream ends through its body or, never started, through the response)."""
        if self._open[account] >= self.limit:
            raise ApiError(
                429,
                f"account {account!r} has {self.limit} log reads open, its limit; close one "
                "(a `logs -f` of another task) and retry",
            )
        self._open[account] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._open[account] -= 1
                if not self._open[account]:
                    del self._open[account]

        return release

    def held(self, account: str) -> int:
        """How many of `account`'s reads are open here."""
        return self._open[account]
