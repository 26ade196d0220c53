"""An attempt counts against its account's fair share only for its first seconds.

Why: the share (`fairness.py`) exists so that one account's many attempts starting and ending
do not stand before a neighbour's next task in the dispatcher's event loop and on its NATS
connection. An attempt that has run for a while costs the loop nothing until it ends, yet it
kept its account's share taken: under `kubetask dev`, account A's forty 60-second jobs
(`maxConcurrency` 64) ran 24 at a time while account B started one short task every 0.2 s,
leaving most of the node idle. Once an attempt has run `lend_after` seconds its slot in the
share is lent back, so the account may start more; the node budget (`node_budget.py`) then
keeps a few slots free for every other active account, so what was lent cannot fill the node
ahead of a neighbour's next task. An account holding only lent slots is, to the share, idle.
"""

from __future__ import annotations

import asyncio

from ..fairness import Fairness


class Counted:
    """One attempt's place in its account's share, given back after the share's `lend_after`
    seconds or when the attempt ends, whichever comes first."""

    __slots__ = ("_account", "_counted", "_fairness", "_timer")

    def __init__(self, fairness: Fairness, account: str) -> None:
        self._fairness = fairness
        self._account = account
        self._counted = True
        self._timer: asyncio.TimerHandle | None = None
        fairness.started(account)
        after = fairness.settings.lend_after
        if after is not None:
            self._timer = asyncio.get_running_loop().call_later(after, self._lend)

    def _lend(self) -> None:
        self._timer = None
        if self._counted:
            self._counted = False
            self._fairness.finished(self._account)

    def end(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._lend()
