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

from ..token_bucket import TokenBucket


class StartRate:
    def __init__(self, per_second: float, share: Callable[[], int]) -> None:
        """`share`: how many dispatchers (or partitions) split `per_second` right now."""
        self.per_second = per_second
        self.share = share
        self._bucket: TokenBucket | None = None  # full until first asked
        self._wake: asyncio.TimerHandle | None = None

    def _current(self, now: float) -> TokenBucket:
        """The bucket at this worker's share of the rate as it is now."""
        rate = self.per_second / max(1, self.share())
        if self._bucket is None:
            self._bucket = TokenBucket(rate, max(1.0, rate), now)
        self._bucket.rate, self._bucket.burst = rate, max(1.0, rate)
        return self._bucket

    def room(self, wake: Callable[[], None]) -> int:
        """Tasks that may start now; with none, `wake` is called when the next may."""
        now = time.monotonic()
        bucket = self._current(now)
        tokens = bucket.refill(now)
        if tokens >= 1:
            return int(tokens)
        if self._wake is None or self._wake.cancelled():
            loop = asyncio.get_running_loop()
            self._wake = loop.call_later(bucket.until(), self._woken, wake)
        return 0

    def spent(self) -> bool:
        """Whether no task may start now, read without refilling or waking anything."""
        now = time.monotonic()
        return self._bucket is not None and self._current(now).level(now) < 1

    def _woken(self, wake: Callable[[], None]) -> None:
        self._wake = None
        wake()

    def take(self) -> None:
        """A task was delivered to be started. The bucket is brought up to now first, so the
        time a request stood open before it delivered is not refilled again after the token is
        spent: it was, and at 0.5 a second two tasks of a burst after an idle spell started at
        once, and tasks sent one a second each started at once."""
        now = time.monotonic()
        bucket = self._current(now)
        bucket.refill(now)
        bucket.tokens -= 1

    def close(self) -> None:
        if self._wake is not None:
            self._wake.cancel()
