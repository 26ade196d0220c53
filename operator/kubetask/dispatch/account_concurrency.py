"""How many attempts an account's functions may run at once, all together: its concurrency
limit, as an AWS account's concurrency in Lambda.

Why: each function's `maxConcurrency` is its own, so an account of a thousand functions could
run a thousand times that, and the fair share bounds it only while another account has work.
On Kubernetes every attempt is a pod, so an account alone could take every node the
dispatchers may use. An administrator gives each account a limit
(`KUBETASK_ACCOUNT_MAX_CONCURRENCY`, 1,000; a tier of its own in
`KUBETASK_ACCOUNT_CONCURRENCY_LIMITS`); past it the account's tasks wait in their queues,
Queued, costing nothing, and say why.

The limit is split over the live dispatchers (the lease bucket's members, as a function's
`maxStartsPerSecond` is: `start_rate.py`): each gets the limit divided by their number, and
the remainder goes one each to the first dispatchers in an order of the account's own (as
partitions are dealt: `leases.py`), so the parts add up to the limit. It used to be rounded
down and at least one each, so a limit of 1 over two dispatchers ran 2, and 10 over four
ran 8. A limit below the number of dispatchers leaves some with no part: they pull none of
the account's tasks, and the others run them; a task such a dispatcher had taken before
another joined goes back to its queue rather than wait there for a place that will not come
(`NoPart`). The one exception: a dispatcher leasing a partition of one of the account's
functions keeps at least one place, since nobody else consumes that partition. The parts add
up while the dispatchers agree on who is alive; a dispatcher joining or leaving is seen by
all within the lease TTL. A dispatcher that has none of the account's work leaves its part
unused; counting across dispatchers would put a shared write on every start.

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
from collections.abc import Callable, Sequence

from ..tallies import count_down, count_up
from .leases import rank


class NoPart(Exception):
    """This dispatcher has no part of the account's limit now (another joined): a task waiting
    here for a place goes back to its queue, where a dispatcher with a part takes it."""


class AccountConcurrency:
    def __init__(
        self,
        limit: Callable[[str], int],
        members: Callable[[], Sequence[str]],
        me: str,
        keeps_one: Callable[[str], bool] = lambda account: False,
    ) -> None:
        """`limit`: an account's limit (0: none); `members`: the dispatchers that split it now,
        `me` among them; `keeps_one`: whether this dispatcher must keep a place for the
        account whatever its part (it leases one of the account's partitions)."""
        self._limit = limit
        self._members = members
        self._me = me
        self._keeps_one = keeps_one
        # The account's order of the members last worked out, and this dispatcher's place in it.
        self._places: dict[str, tuple[tuple[str, ...], int]] = {}
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
        members = tuple(self._members())
        if len(members) <= 1:
            return limit
        part, rest = divmod(limit, len(members))
        if rest and self._place(account, members) < rest:
            part += 1
        if not part and self._keeps_one(account):
            return 1
        return part

    def _place(self, account: str, members: tuple[str, ...]) -> int:
        known = self._places.get(account)
        if known is None or known[0] != members:
            order = sorted(members, key=functools.partial(rank, f"limit.{account}"))
            known = (members, order.index(self._me))
            self._places[account] = known
        return known[1]

    def rebalanced(self) -> None:
        """The members changed: parts may have grown, so everything held for want of one looks
        again (a dispatcher with no part has no attempt of the account's to end and wake it)."""
        self._places.clear()
        for account in list(self._held):
            for wake in list(self._held.pop(account)):
                wake()
        for account in list(self._waiting):
            self._admit(account)

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
        when this returns. Raises NoPart when this dispatcher has, or comes to have, no part
        of the account's limit."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(account, deque()).append(future)
        self._admit(account)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(account)  # a place was given just as it was cancelled
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
        while waiting and share == 0:
            future = waiting.popleft()
            if not future.done():
                future.set_exception(NoPart())
        while waiting and (share is None or self.running.get(account, 0) < share):
            future = waiting.popleft()
            if not future.done():
                count_up(self.running, account)
                future.set_result(None)
        if not waiting:
            del self._waiting[account]
