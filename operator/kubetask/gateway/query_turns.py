"""Accounts take turns at the task index: at most `slots` queries are handed to its one thread
at a time, and the next one goes to the account that waited longest for its turn, not to the
request that arrived first.

Why: the index answers on one thread, in order (`indexing.py`). An account that sent fifty list
queries at once put fifty queries ahead of a neighbour's one, and the neighbour's list waited
for all of them. Now it waits for at most the queries in progress and one turn of each other
waiting account. Alone, an account has every slot, so this costs a single tenant nothing.
"""

from __future__ import annotations

from .turns import Turns


class QueryTurns(Turns):
    def __init__(self, slots: int = 2) -> None:
        super().__init__()
        # Two keep the thread busy while the loop hands the next query over.
        self.slots = slots
        self.busy = 0

    def _may_enter(self, account: str) -> bool:
        return self.busy < self.slots and not self._waiting

    def _enter(self, account: str) -> None:
        self.busy += 1

    def _leave(self, account: str) -> None:
        self.busy -= 1
        while self._waiting and self.busy < self.slots:
            first = next(iter(self._waiting))
            # To the back of the round: its next query waits for everyone else's turn.
            self._waiting[first] = self._waiting.pop(first)
            self._wake(first)
