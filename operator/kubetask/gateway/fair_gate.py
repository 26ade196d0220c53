"""Take turns at submitting: while accounts compete, each works on at most its weighted share of
the gateway's submission slots at once (`fairness.py`); the rest of its requests wait here, in
arrival order, before any of their work is done.

Why: every submission is several awaits (record, queue) on one event loop. Thirty-two requests
of a flooding account in progress put thirty-two steps ahead of each step of a neighbour's one
request, and its task's submit-to-start time grew tenfold. Waiting here costs a request no CPU,
and the flooding account's throughput is bounded by its share, not stopped.
"""

from __future__ import annotations

from ..fairness import Fairness, FairnessSettings
from .turns import Turns


class FairGate(Turns):
    def __init__(self, settings: FairnessSettings) -> None:
        super().__init__()
        self.shares = Fairness(settings)

    def _may_enter(self, account: str) -> bool:
        free = self.shares.free(account)
        return (free is None or free > 0) and not self._waiting.get(account)

    def _enter(self, account: str) -> None:
        self.shares.started(account)

    def _leave(self, account: str) -> None:
        """Wake the first waiters of every account that has room now."""
        self.shares.finished(account)
        for waiting in list(self._waiting):
            while waiting in self._waiting:
                free = self.shares.free(waiting)
                if free is not None and free <= 0:
                    break
                self._wake(waiting)
