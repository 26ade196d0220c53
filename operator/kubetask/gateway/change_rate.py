"""How often an account may change what it has registered: PUTs and DELETEs of its functions and
AsyncConfigs, at most `KUBETASK_ACCOUNT_MAX_CHANGES` a second in bursts of
`KUBETASK_ACCOUNT_CHANGES_BURST`. Past that the answer is a `429` with `Retry-After`, and
nothing is changed.

Why: every gateway, dispatcher and the operator mirror every registration, and a function that
changes gets new workers in every dispatcher (its consumer looked up, its pull started again).
One account re-registering 16 functions as fast as it could (195 changes a second) raised a
neighbour's submit→start p99 from 1.7 to 9.2 ms (seen 2026-12-05 under `kubetask dev`).
That is as much as a flood of tasks does with fair sharing on, and nothing bounded it. Lambda
bounds its control plane the same way, per account (15 requests a second for most of it).

An admin's changes are not counted: the platform's operator is not a tenant. Each gateway
keeps its own buckets, so with N gateways an account may change N times as much.

The operator holds kubectl-applied TaskFunctions and AsyncConfigs to the same rate with buckets
of its own (`controllers/context.py`): the API server has already taken the object, so a
change past the rate is applied later, when the account may change again, rather than refused.
"""

from __future__ import annotations

import math
import time

from .. import metrics
from ..token_bucket import TokenBucket

SETTING = "KUBETASK_ACCOUNT_MAX_CHANGES"
# Past this many accounts remembered, those whose bucket is full again are let go.
REMEMBERED = 4096


class ChangesThrottled(Exception):
    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ChangeRate:
    def __init__(self, rate: float, burst: int) -> None:
        """`rate`: changes a second, 0 for no limit; `burst`: how many at once."""
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, account: str) -> None:
        """Count one change of `account`'s; raises ChangesThrottled where it must wait."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        bucket = self._buckets.get(account)
        if bucket is None:
            bucket = self._buckets[account] = TokenBucket(self.rate, self.burst, now)
        if not bucket.take(now):
            metrics.CHANGES_THROTTLED.labels(account).inc()
            wait = max(1, math.ceil(bucket.until()))
            raise ChangesThrottled(
                f"account {account!r} may change its functions and AsyncConfigs {self.rate:g} "
                f"times a second, {self.burst} at once ({SETTING})",
                wait,
            )
        if len(self._buckets) > REMEMBERED:  # a full bucket is as good as none
            self._buckets = {a: b for a, b in self._buckets.items() if b.level(now) < b.burst}
