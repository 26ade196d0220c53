"""How many attempts an account's functions may run at once, all together: its concurrency
limit, as an AWS account's concurrency in Lambda.

Why: each function's `maxConcurrency` is its own, so an account of a thousand functions could
run a thousand times that, and the fair share bounds it only while another account has work.
On Kubernetes every attempt is a pod, so an account alone could take every node the
dispatchers may use. An administrator gives each account a limit
(`KUBETASK_ACCOUNT_MAX_CONCURRENCY`, 1,000; a tier of its own in
`KUBETASK_ACCOUNT_CONCURRENCY_LIMITS`); past it the account's tasks wait in their queues,
Queued, costing nothing, and say why.

The limit is split evenly over the live dispatchers (the lease bucket's members, as a
function's `maxStartsPerSecond` is: `start_rate.py`), rounded down and at least one each, so
the account never runs more than its limit while it is at least the number of dispatchers.
A dispatcher that has none of the account's work leaves its part unused; counting across
dispatchers would put a shared write on every start.

Two counts, as for the node budget: pulls are sized by what the account has delivered and not
yet ended, which keeps most tasks over the limit in their queues; but two functions pulling at
once each see the same room (both started six where three were allowed), so an attempt also
takes a place before it is claimed, and one delivered past the limit waits for a place, its
message kept alive and its record Queued.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections import deque
from collections.abc import Callable

from ..tallies import count_down, count_up


class AccountConcurrency:
    def __init__(self, limit: Callable[[str], int], dispatchers: Callable[[], int]) -> None:
        """`limit`: an account's limit (0: none); `dispatchers`: how many split it now."""
        self._limit = limit
        self._dispatchers = dispatchers
        self.delivered: dict[str, int] = {}  # delivered and not ended, for sizing pulls
        self.running: dict[str, int] = {}  # holding a place
        # Wake-ups of pullers held back by their account's limit, by account (ordered sets).
        self._held: dict[str, dict[Callable[[], None], None]] = {}
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}

    def share(self, account: str) -> int | None:
        """What `account` may run at once on this dispatcher; None: no limit."""
        limit = self._limit(account)
        if not limit:
            return None
        return max(1, limit // max(1, self._dispatchers()))

    def free(self, account: str, wake: Callable[[], None]) -> int | None:
        """More of `account`'s tasks a pull may ask for now (None: no limit); with none, `wake`
        is called once one of its attempts ends."""
        share = self.share(account)
        if share is None:
            return None
        free = max(0, share - self.delivered.get(account, 0))
        if not free:
            self._held.setdefault(account, {})[wake] = None
        return free

    def delivered_one(self, account: str) -> Callable[[], None]:
        """Counts a delivered task of `account`; returns what to call when it ends."""
        count_up(self.delivered, account)
        return functools.partial(self._ended, account)

    def _ended(self, account: str) -> None:
        left = count_down(self.delivered, account)
        held = self._held.get(account)
        if not held:
            return
        share = self.share(account)
        # A woken puller whose queue is empty starts nothing, and so wakes nobody in turn:
        # with nothing of the account's delivered, every one of them looks again.
        room = len(held) if share is None or not left else max(0, share - left)
        for wake in list(itertools.islice(held, room)):
            del held[wake]
            wake()
        if not held:
            del self._held[account]

    def try_take(self, account: str) -> bool:
        """Take a place if the account has one free and none of its attempts waits for one."""
        share = self.share(account)
        if share is not None and (
            self._waiting.get(account) or self.running.get(account, 0) >= share
        ):
            return False
        count_up(self.running, account)
        return True

    async def wait(self, account: str) -> None:
        """Wait for a place, after the account's attempts that waited before; it is taken
        when this returns."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(account, deque()).append(future)
        self._admit(account)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(account)
            else:
                waiting = self._waiting.get(account)
                if waiting is not None and future in waiting:
                    waiting.remove(future)
                    if not waiting:
                        del self._waiting[account]
            raise

    def release(self, account: str) -> None:
        count_down(self.running, account)
        if account in self._waiting:
            self._admit(account)

    def _admit(self, account: str) -> None:
        waiting = self._waiting[account]
        share = self.share(account)
        while waiting and (share is None or self.running.get(account, 0) < share):
            future = waiting.popleft()
            if not future.done():
                count_up(self.running, account)
                future.set_result(None)
        if not waiting:
            del self._waiting[account]
