"""A token bucket: tokens refill at `rate` a second up to `burst`, and are spent by what is let
through. One shape for every per-second limit the platform keeps (an account's submissions, a
function's starts, an account's looks at its queues); the log budgets predate it and keep their
own."""

from __future__ import annotations


class TokenBucket:
    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at = now

    def level(self, now: float) -> float:
        """The tokens at `now`, read without changing anything."""
        return min(self.burst, self.tokens + (now - self.at) * self.rate)

    def refill(self, now: float) -> float:
        """Bring the bucket up to `now`; its tokens."""
        self.tokens, self.at = self.level(now), now
        return self.tokens

    def take(self, now: float) -> bool:
        """Spend a token if the bucket holds one at `now`; whether it did."""
        if self.refill(now) < 1:
            return False
        self.tokens -= 1
        return True

    def until(self, tokens: float = 1.0) -> float:
        """Seconds until the bucket holds `tokens`, as of its last refill."""
        return max(0.0, (tokens - self.tokens) / self.rate)
