"""Share a component's capacity across accounts: while more than one account has work here,
each may keep at most its weighted share of `slots` requests in flight, so one account's flood
cannot fill the process's event loop (and its NATS connection) ahead of a neighbour's next task.
The dispatcher caps what an account's functions may pull (attempts in flight); the gateway caps
the submissions it works on at once (`gateway/fair_gate.py`).

Why a cap on work in flight and not a scheduler in front of it: the dispatcher's functions
already pull only as many messages as they have free slots, so capping what an account may pull
is weighted fair sharing with no queue of held messages. A neighbour's task waits at most for
the heavy account's work in flight to shrink to its share, which for short tasks is one round.

A puller turned away because its account is at its share is called back when the share may
have grown: a task of that account ended, or (checked every `active_for / 2` while anyone waits)
another account went quiet. Without that, a function held back while a sibling in its account
ran was never pulled again: a burst over 100 accounts of 100 functions stalled with a third of
its tasks Queued.

An account counts as active while it has work in flight or started some within the last
`active_for` seconds. Alone, an account is bounded only by its own limits, so fairness costs a
single tenant nothing. Weights come from KUBETASK_ACCOUNT_WEIGHTS (`gold=4,silver=2`; any other
account weighs 1).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import per_account
from .tallies import count_down, count_up

# A dispatcher's `least_per_account`. Thirty-two slots over twenty busy accounts left each one
# attempt in flight: its functions were held, then released all at once whenever it had
# nothing in flight, up to a hundred pulls at once, and a burst over 2,000 functions in 20 accounts
# ran at 283 tasks/s (0.82 of one function's pace); with four each, 302-322 in four runs
# (bench/burst.py, same hour). Up to eight accounts, 32 slots already give each four.
DISPATCH_LEAST_PER_ACCOUNT = 4


def parse_weights(text: str) -> dict[str, float]:
    """`account=weight,...`; raises ValueError naming the first bad entry."""
    return per_account.parse("KUBETASK_ACCOUNT_WEIGHTS", text, 1000, "weight")


@dataclass(frozen=True)
class FairnessSettings:
    enabled: bool = True
    slots: int = 64  # work in flight shared among the accounts active at once
    active_for: float = 2.0
    # With many accounts active, the slots grow to this many per unit of weight (per account,
    # at the default weight of 1), so even the lightest keeps a few in flight.
    least_per_account: int = 1
    weights: dict[str, float] = field(default_factory=dict)
    # Seconds after which an attempt's place is lent back (`dispatch/share_lending.py`); None:
    # it counts until it ends (a gateway's requests).
    lend_after: float | None = None


class Fairness:
    def __init__(self, settings: FairnessSettings) -> None:
        self.settings = settings
        self.inflight: dict[str, int] = {}
        self._seen: dict[str, float] = {}
        # Wake-ups of pullers held back by their account's share, by account (ordered sets).
        self._held: dict[str, dict[Callable[[], None], None]] = {}
        self._recheck: asyncio.TimerHandle | None = None

    def weight(self, account: str) -> float:
        return self.settings.weights.get(account, 1.0)

    def started(self, account: str) -> None:
        count_up(self.inflight, account)
        self._seen[account] = time.monotonic()

    def finished(self, account: str) -> None:
        count_down(self.inflight, account)
        if account in self._held:
            self._release(account)

    def active(self) -> list[str]:
        horizon = time.monotonic() - self.settings.active_for
        for account, at in list(self._seen.items()):
            if at < horizon and account not in self.inflight:
                del self._seen[account]
        return list(self._seen)

    def share(self, account: str) -> int | None:
        """Attempts `account` may have in flight now; None: no limit (it is alone, or fairness
        is off)."""
        if not self.settings.enabled:
            return None
        others = [a for a in self.active() if a != account]
        if not others:
            return None
        return self._share(account, sum(self.weight(a) for a in others))

    def most_at_once(self, account: str) -> int | None:
        """The most one pull of `account`'s may ask for (None: any number): its share were one
        more account active. A request stays open until filled, so one sized while the account
        was alone (by its dispatch window: up to its maxConcurrency) was later filled whole
        after a neighbour woke, far past the share: 40 of 40 long tasks ran where the share
        was 16. With this, what such a request brings is at most a share."""
        if not self.settings.enabled:
            return None
        return self._share(
            account, 1.0 + sum(self.weight(a) for a in self.active() if a != account)
        )

    def _share(self, account: str, others: float) -> int:
        total = self.weight(account) + others
        slots = max(self.settings.slots, int(self.settings.least_per_account * total))
        return max(1, int(slots * self.weight(account) / total))

    def free(self, account: str, wake: Callable[[], None] | None = None) -> int | None:
        """More attempts `account` may start now (None: no limit). With none, `wake` is called
        once the account may start more."""
        share = self.share(account)
        if share is None:
            return None
        free = max(0, share - self.inflight.get(account, 0))
        if not free and wake is not None:
            self._held.setdefault(account, {})[wake] = None
            if self._recheck is None:
                self._recheck = asyncio.get_running_loop().call_later(
                    self.settings.active_for / 2, self._release_all
                )
        return free

    def _release(self, account: str) -> None:
        """Wake as many of the account's held pullers as it may start attempts now, or all of
        them once it has nothing in flight: a puller does not know whether its queue holds
        anything, and waking one per free slot, when most had nothing left, drained the end of
        a burst over 10,000 functions at one function per account per recheck (20 s for its
        last few hundred tasks). What all of them may bring at once waits in the node budget,
        which admits it in turn across accounts."""
        held = self._held[account]
        free = self.free(account)
        if free is None or account not in self.inflight:
            free = len(held)
        for wake in list(itertools.islice(held, free)):
            del held[wake]
            wake()
        if not held:
            del self._held[account]

    def _release_all(self) -> None:
        self._recheck = None
        for account in list(self._held):
            if account in self._held:
                self._release(account)
        if self._held and self._recheck is None:
            self._recheck = asyncio.get_running_loop().call_later(
                self.settings.active_for / 2, self._release_all
            )
