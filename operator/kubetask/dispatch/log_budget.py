"""How much output one attempt may log: a token bucket of characters, `KUBETASK_LOG_RATE` a
second and up to `KUBETASK_LOG_BURST` at once.

Without one, a task printing as fast as it could (2 million short lines in 12 s) grew its
dispatcher by 500 MB of lines waiting to be published, and every other task's lines, on any
account, waited behind them. Lines past the budget are dropped and counted, and the log says how
many: before the next line let through (at most once a second) and when the attempt ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# What a log record adds to its line (time, attempt, stream), so that empty lines cost too.
RECORD_OVERHEAD = 100
# Seconds between two lines saying what was dropped, while lines keep being dropped.
TELL_EVERY = 1.0


class LogBudget:
    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._at = clock()
        self._dropped_lines = 0
        self._dropped_chars = 0
        self._told = -TELL_EVERY

    def take(self, text: str) -> bool:
        """Whether this line may be logged; if not, it is counted as dropped."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        cost = len(text) + RECORD_OVERHEAD
        if cost <= self._tokens:
            self._tokens -= cost
            return True
        self._dropped_lines += 1
        self._dropped_chars += len(text)
        return False

    def dropped(self, last: bool = False) -> str | None:
        """The line saying what was dropped since the last one said it, if anything was and
        it is time to say it (always at the `last`)."""
        if not self._dropped_lines or (not last and self._at - self._told < TELL_EVERY):
            return None
        self._told = self._at
        lines = "1 line" if self._dropped_lines == 1 else f"{self._dropped_lines} lines"
        line = (
            f"{lines} ({self._dropped_chars} characters) of output dropped: over this "
            f"attempt's log rate of {self.rate:,.0f} characters/s (KUBETASK_LOG_RATE)"
        )
        self._dropped_lines = self._dropped_chars = 0
        return line
