"""Back-pressure at the gateway: an account may keep at most its backlog limit of tasks waiting
in a queue and submit at most its rate limit of tasks a second (`KUBETASK_ACCOUNT_MAX_BACKLOG`
and `_MAX_RATE`, or its own in `KUBETASK_ACCOUNT_BACKLOG_LIMITS` and `_RATE_LIMITS`); past them
it gets `429` with a `Retry-After` computed from what it asks for, and its neighbours are not
touched.

Backlog: between `THROTTLE_FROM` of the limit and the limit, submissions are refused with a
probability that rises to 1 — but only for the *heavy* objects (the functions sending most of
the queue's recent submissions, found with Sample and Hold, Estan & Varghese 2002, in bounded
memory); light ones pass until the hard limit. `Retry-After` is the time the queue needs, at its
measured drain rate, to fall back under the throttling point. Rate: a token bucket per account,
`Retry-After` the time until a token is there.

Queues are per account (or per function), so one account's backlog never throttles another's.
"""

from __future__ import annotations

import math
import random
import time

from .. import metrics, queues
from ..models import TaskFunction
from ..queues import QueueDepth
from ..settings import Settings
from ..token_bucket import TokenBucket

THROTTLE_FROM = 0.8
MAX_RETRY_AFTER = 300
_chance = random.Random()


class Throttled(Exception):
    def __init__(self, message: str, retry_after: int, reason: metrics.ThrottleReason) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.reason = reason  # the metric's label


class SampleAndHold:
    """Counts the submissions of heavy objects in bounded memory: an object not yet held is
    taken in with probability `probability` per submission; once held, every submission is
    counted. An object sending a share s of `n` submissions is missed with probability about
    (1-p)^(s·n), so heavy ones are held almost surely and light ones mostly never. Counts
    restart every `window` seconds; decisions use the last complete window and the current."""

    def __init__(self, probability: float = 0.1, capacity: int = 1000, window: float = 5.0):
        self.probability = probability
        self.capacity = capacity
        self.window = window
        self._held: dict[str, int] = {}
        self._last: dict[str, int] = {}
        self._total = 0
        self._last_total = 0
        self._started = time.monotonic()
        self.seen = self._started  # the last observation

    def observe(self, key: str) -> None:
        now = self.seen = time.monotonic()
        if now - self._started >= self.window:
            self._last, self._last_total = self._held, self._total
            self._held, self._total, self._started = {}, 0, now
        self._total += 1
        if key in self._held:
            self._held[key] += 1
        elif len(self._held) < self.capacity and _chance.random() < self.probability:
            self._held[key] = 1

    def share(self, key: str) -> float:
        """The object's estimated share of recent submissions (0 if it was never held)."""
        total = self._total + self._last_total
        counted = self._held.get(key, 0) + self._last.get(key, 0)
        return counted / total if total else 0.0

    def heavy(self) -> int:
        """How many objects are held: the fair share of each is about 1 / this."""
        return max(1, len(self._held.keys() | self._last.keys()))


class Throttle:
    def __init__(
        self, settings: Settings, depth: QueueDepth, forget_after: float = queues.FORGET_AFTER
    ) -> None:
        self.settings = settings
        self.depth = depth
        self._buckets: dict[str, TokenBucket] = {}
        # Per queue; one not submitted to for `forget_after` is forgotten, as its depth is.
        self._senders: dict[str, SampleAndHold] = {}
        self.forget_after = forget_after
        self._forgot = time.monotonic()

    async def admit(self, fn: TaskFunction) -> None:
        """Raise `Throttled` when this submission must wait; otherwise count it. The depth is
        refreshed first: refusals never reach `QueueDepth.admit`, which would otherwise be the
        only reader, and a drained queue would stay refused."""
        self._rate(fn.account)
        limit = self.settings.backlog_limit(fn.account)
        if limit > 0:
            await self.depth.refresh(fn)
            self._backlog(fn, limit)

    def _rate(self, account: str) -> None:
        rate = self.settings.rate_limit(account)
        if rate <= 0:
            return
        now = time.monotonic()
        bucket = self._buckets.get(account)
        if bucket is None:
            bucket = self._buckets[account] = TokenBucket(rate, max(1.0, rate), now)
        if not bucket.take(now):
            raise Throttled(
                f"account {account!r} submits more than {rate:g} tasks a second",
                _seconds(bucket.until()),
                "rate",
            )

    def _backlog(self, fn: TaskFunction, limit: int) -> None:
        queue, depth, drain = self.depth.known(fn)
        # Per account too: small accounts share one stream, each throttled on its own part.
        senders = self._senders.setdefault(f"{queue}/{fn.account}", SampleAndHold())
        senders.observe(fn.name)
        if senders.seen - self._forgot > self.forget_after / 10:
            self._forget(senders.seen)
        start = THROTTLE_FROM * limit
        if depth < start:
            return
        over = min(1.0, (depth - start) / max(1.0, limit - start))
        fair = 1.0 / senders.heavy()
        share = senders.share(fn.name)
        # At the limit everyone waits; below it, only objects sending more than their share.
        if depth >= limit:
            chance = 1.0
        else:
            chance = over * max(0.0, 1 - fair / share) if share else 0.0
        if chance and _chance.random() < chance:
            wait = (depth - start + 1) / drain if drain > 0 else MAX_RETRY_AFTER
            raise Throttled(
                f"{depth} tasks of account {fn.account!r} wait in {queue} (limit "
                f"{limit}); {fn.name!r} sends {share:.0%} of them",
                _seconds(wait),
                "backlog",
            )

    def _forget(self, now: float) -> None:
        self._forgot = now
        for key in [k for k, s in self._senders.items() if s.seen < now - self.forget_after]:
            del self._senders[key]


def _seconds(wait: float) -> int:
    return max(1, min(MAX_RETRY_AFTER, math.ceil(wait)))
