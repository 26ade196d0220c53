"""The dispatch window of one function (AIMD): how many of its tasks this dispatcher keeps in
flight, found by probing rather than configured, so executors that can take less than the
function's `maxConcurrency` are not flooded with work they answer "busy" to.

- **increase** while there is backlog (the window was full) and executors keep up: by one per
  completed task up to the threshold (doubling per round of tasks: a fresh function reaches
  hundreds in flight within a few hundred tasks), then by one per window's worth (additive);
- **multiplicative decrease** when executors pushed back (429/503, "busy") — but only once,
  within the current `period`, *both* the share of busy answers reaches `busy_rate` *and* their
  count reaches `busy_count`, so one isolated error never halves the window; the threshold drops
  with it. The decision is taken on the answer that crosses both, not at the period's end: every
  moment spent above the executors' capacity is refusals (bench/aimd.py measured 1 to 6% of all
  dispatches refused when it waited for the period to end). The answers to what was sent before
  a decrease arrive after it, so there is no second decrease within a period of the first;
- a window at which some answers are busy, but fewer than the thresholds, stops growing: the
  share refused there is at most `busy_rate`;
- **shrink when idle**: after `idle_periods` periods without work it falls back toward `start`,
  so a function waking up probes again instead of flooding with yesterday's window.

Only an executor that can answer busy needs a window: a warm instance (HTTP 429/503). A
command's process cannot push back, so for a command function the window is its
`maxConcurrency` from the start (`probing=False`): probing grew it only as tasks ended, and a
function allowed twenty ran eight thirty-second tasks at once while twelve waited.

A busy answer is not a task failure: the task goes back to its queue and spends no attempt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..settings import env_float, env_int


@dataclass(frozen=True)
class AimdSettings:
    start: int = field(default_factory=lambda: env_int("KUBETASK_AIMD_START", 8, 1))
    increase: float = field(default_factory=lambda: env_float("KUBETASK_AIMD_INCREASE", 1.0, 0.01))
    decrease: float = field(
        default_factory=lambda: env_float("KUBETASK_AIMD_DECREASE", 0.5, 0.01, 0.99)
    )
    period: float = field(default_factory=lambda: env_float("KUBETASK_AIMD_PERIOD", 0.5, 0.01))
    busy_rate: float = field(
        default_factory=lambda: env_float("KUBETASK_AIMD_BUSY_RATE", 0.03, 0, 1)
    )
    busy_count: int = field(default_factory=lambda: env_int("KUBETASK_AIMD_BUSY_COUNT", 3, 1))
    idle_periods: int = field(default_factory=lambda: env_int("KUBETASK_AIMD_IDLE_PERIODS", 20, 1))


class Window:
    def __init__(
        self, limit: int, settings: AimdSettings | None = None, probing: bool = True
    ) -> None:
        self.settings = settings or AimdSettings()
        self.limit = limit
        self.start = min(limit, self.settings.start) if probing else limit
        self.size = float(self.start)
        self.threshold = float(limit)
        self._busy = 0
        self._answered = 0
        self._full = False
        self._idle = 0
        self._period_end: float | None = None  # set by the first judgement
        self._calm_until = 0.0  # no second decrease for the answers to the first one

    def allowed(self) -> int:
        return max(1, min(self.limit, int(self.size)))

    def done(self, busy: bool, now: float | None = None) -> None:
        self._answered += 1
        if busy:
            self._busy += 1
            if self._pushed_back():
                now = time.monotonic() if now is None else now
                if now >= self._calm_until:
                    self._decrease()
                    self._calm_until = now + self.settings.period
        elif self._full and not self._busy:  # pushed back this period: stop growing
            step = 1.0 if self.size < self.threshold else 1.0 / self.size
            self.size = min(float(self.limit), self.size + step * self.settings.increase)

    def judge(self, inflight: int, now: float | None = None) -> None:
        """Called whenever the worker asks how much it may pull; acts once per period."""
        now = time.monotonic() if now is None else now
        self._full = self._full or inflight >= self.allowed()
        if self._period_end is None:
            self._period_end = now + self.settings.period
        if now < self._period_end:
            return
        s = self.settings
        if self._answered or inflight:
            self._idle = 0
        else:
            # Counted in elapsed periods, not in calls: a dozing worker asks rarely, and a
            # window that only shrank per call kept yesterday's size after an hour's idle.
            self._idle += 1 + int((now - self._period_end) / s.period)
            while self._idle >= s.idle_periods and self.size > self.start:
                self.size = max(float(self.start), self.size * s.decrease)
                self.threshold = float(self.limit)
                self._idle -= s.idle_periods
        self._busy = self._answered = 0
        self._full = inflight >= self.allowed()
        self._period_end = now + s.period

    def _pushed_back(self) -> bool:
        s = self.settings
        return self._busy >= s.busy_count and self._busy >= s.busy_rate * self._answered

    def _decrease(self) -> None:
        self.threshold = max(1.0, self.size * self.settings.decrease)
        self.size = self.threshold
        self._busy = self._answered = 0
