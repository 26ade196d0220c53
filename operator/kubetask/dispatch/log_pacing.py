"""How fast a dispatcher reads one account's output: `KUBETASK_ACCOUNT_LOG_RATE` a second, up to
`KUBETASK_ACCOUNT_LOG_BURST` at once, and every account's together at most
`KUBETASK_DISPATCHER_LOG_RATE`, shared equally by the accounts printing; counted as the
attempt's budget counts (characters, plus `RECORD_OVERHEAD` a line).

Each attempt's budget (`log_budget.py`) drops what it prints past its rate, but the dispatcher
reads and splits every line before it can drop one: sixteen attempts of one account printing as
fast as they could kept the dispatcher's core busy, and another account's tasks waited 200 ms
to 2 s to start instead of 2 ms. Past its account's rate a task's output is not read for a
while: its writes wait, as under Docker's default (blocking) log mode, the dispatcher spends
nothing on it meanwhile, and nothing is dropped for it. Read so: local processes and server
instances, pods (their sidecars wait for the answer to their frames), and warm pods (their
answers are not read for a while; a warm server serves every invocation in flight, so its
proxy drops and counts what it cannot hold rather than make it wait).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .log_budget import RECORD_OVERHEAD

# Buckets of accounts that printed nothing lately are dropped once there are more than this.
KEPT = 64
# An account printed within this many seconds, or still owes its bucket, shares the total.
ACTIVE = 1.0


@dataclass
class _Bucket:
    tokens: float
    at: float


class LogPacing:
    def __init__(
        self,
        rate: float,
        burst: float,
        total: float | None = None,
    ) -> None:
        """`total`: what the dispatcher reads of every account together, shared equally by
        the accounts printing (those that printed in the last ACTIVE seconds); each gets at
        most `rate`. Without it, N accounts printing as fast as they could took N paces."""
        self.rate = rate
        self.burst = burst
        self.total = total if total is not None else float("inf")
        self._buckets: dict[str, _Bucket] = {}

    @staticmethod
    def cost(output: bytes) -> int:
        return len(output) + RECORD_OVERHEAD * output.count(b"\n")

    def delay(self, account: str, output: bytes) -> float:
        """Takes `output` as read; returns the seconds to read nothing more of the account's
        output: none within its burst, else its share of the time. Several of its tasks taking
        at once each wait for what all of them took before, so together they are read at the
        rate. A number rather than a wait, so that a reader in a protocol callback can stop its
        transport for that long (`warm_pods.py`)."""
        now = time.monotonic()
        bucket = self._buckets.get(account)
        if bucket is None:
            if len(self._buckets) >= KEPT:
                self._forget(now)
            bucket = self._buckets[account] = _Bucket(self.burst, now)
        rate = self._share(now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * rate)
        bucket.at = now
        bucket.tokens -= self.cost(output)
        return max(0.0, -bucket.tokens / rate)

    def _share(self, now: float) -> float:
        if self.total >= self.rate * len(self._buckets):
            return self.rate  # all of them together could not pass the total
        printing = sum(1 for b in self._buckets.values() if now - b.at < ACTIVE or b.tokens < 0)
        return min(self.rate, self.total / max(printing, 1))

    def _forget(self, now: float) -> None:
        full = [
            account
            for account, b in self._buckets.items()
            if b.tokens + (now - b.at) * self.rate >= self.burst
        ]
        for account in full:
            del self._buckets[account]
