"""A function's `maxStartsPerSecond`: how fast its tasks may be started, for a function that
calls something with a rate limit of its own (an API, a database), as Celery's `rate_limit`.

A token bucket per queue a dispatcher consumes, holding at most one second's worth (at least
one): the pull asks for no more messages than there are tokens, so a task over the rate stays
in its queue, Queued, costing nothing, rather than being taken and held. The function's rate
is split evenly over the dispatchers consuming it: over the live dispatchers for its one queue
(every dispatcher consumes it; the count is the lease bucket's members, `leases.py`), over its
partitions for a partitioned function (each partition has one dispatcher). While dispatchers
join or leave, the sum is off until each has seen the new count (within a lease renewal).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class StartRate:
    def __init__(self, per_second: float, share: Callable[[], int]) -> None:
        """`share`: how many dispatchers (or partitions) split `per_second` right now."""
        self.per_second = per_second
        self.share = share
        self._tokens: float | None = None
        self._at = time.monotonic()
        self._wake: asyncio.TimerHandle | None = None

    def _level(self, now: float) -> tuple[float, float]:
        """The tokens at `now`, and the rate they refill at."""
        rate = self.per_second / max(1, self.share())
        burst = max(1.0, rate)
        if self._tokens is None:
            return burst, rate
        return min(burst, self._tokens + (now - self._at) * rate), rate

    def room(self, wake: Callable[[], None]) -> int:
        """Tasks that may start now; with none, `wake` is called when the next may."""
        now = time.monotonic()
        self._tokens, rate = self._level(now)
        self._at = now
        if self._tokens >= 1:
            return int(self._tokens)
        if self._wake is None or self._wake.cancelled():
            loop = asyncio.get_running_loop()
            self._wake = loop.call_later((1 - self._tokens) / rate, self._woken, wake)
        return 0

    def spent(self) -> bool:
        """Whether no task may start now, read without refilling or waking anything."""
        return self._tokens is not None and self._level(time.monotonic())[0] < 1

    def _woken(self, wake: Callable[[], None]) -> None:
        self._wake = None
        wake()

    def take(self) -> None:
        """A task was delivered to be started. The bucket is brought up to now first, so the
        time a request stood open before it delivered is not refilled again after the token is
        spent: it was, and at 0.5 a second two tasks of a burst after an idle spell started at
        once, and tasks sent one a second each started at once."""
        now = time.monotonic()
        level, _ = self._level(now)
        self._tokens, self._at = level - 1, now

    def close(self) -> None:
        if self._wake is not None:
            self._wake.cancel()
