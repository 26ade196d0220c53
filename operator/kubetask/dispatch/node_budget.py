"""How many attempts one dispatcher runs at once, across all its functions: a node's budget.

Why: each function's concurrency is capped on its own, so a burst over a thousand functions
could start a thousand times their limits at once — thousands of processes on two cores, a
dispatcher too busy to read its NATS connection, and NATS cutting it off as a slow consumer.
The budget bounds the sum: `slots` attempts in all, of which at most `processes` may be
`command` attempts (each a process). Defaults come from the machine (CPU and memory) and are
settings (KUBETASK_NODE_SLOTS, KUBETASK_NODE_PROCESSES).

Workers pull only as many messages as the budget has room for. Several may pull at the same
moment, so a delivered message can still find the budget full; it then waits here (its message
kept alive by heartbeats, its record still Queued) until a slot frees. Waiters are admitted
round robin over accounts, in proportion to their weights, so the budget is shared with the
same fairness as the rest of the dispatcher. Workers that found no room are woken as slots
free, a few at a time.

One account's long jobs could otherwise fill the node and hold a neighbour's next task for a
job's length: an account alone is not held to a share, and long attempts lend their place in it
back (`share_lending.py`). So while several accounts are active, a few slots and processes
(`least` per unit of weight, at most the account's weighted part of the node) are kept for each
that does not hold that many, and nobody else takes them; and where more than one account has
functions, an account already holding `least` leaves `least` free (at most a quarter of the
node) for whoever comes next, so a tenant's first task after a quiet spell does not wait for a
neighbour's jobs to end either. A node serving one account keeps nothing back.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import math
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import metrics
from ..settings import env_int
from ..tallies import count_down, count_up


def _memory_mb() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 4096


def default_processes() -> int:
    """32 per core, and no more than one per 64 MB of available memory."""
    return max(1, min((os.cpu_count() or 1) * 32, _memory_mb() // 64))


def default_instances() -> int:
    """Warm instances stay resident: 8 per core, and no more than one per 128 MB available."""
    return max(1, min((os.cpu_count() or 1) * 8, _memory_mb() // 128))


@dataclass(frozen=True)
class BudgetSettings:
    processes: int = field(
        default_factory=lambda: env_int("KUBETASK_NODE_PROCESSES", default_processes(), 1)
    )
    slots: int = field(
        default_factory=lambda: env_int("KUBETASK_NODE_SLOTS", (os.cpu_count() or 1) * 128, 1)
    )
    # Warm `server` instances, all functions together (`executors/instance_budget.py`).
    instances: int = field(
        default_factory=lambda: env_int("KUBETASK_NODE_INSTANCES", default_instances(), 1)
    )


@dataclass
class _Waiter:
    future: asyncio.Future[None]
    process: bool
    arrived: int


class _Lanes:
    """An account's waiters: those that would start a process, and those that need only a
    slot, each in arrival order. The older head that fits goes first, so an account's warm
    task is not held behind its own `command` attempts waiting for a process slot (it was,
    while the account had one queue); one waiting for a process still goes ahead of every
    later one once a process slot frees, since the release that frees it also frees a slot."""

    def __init__(self) -> None:
        self.process: deque[_Waiter] = deque()
        self.plain: deque[_Waiter] = deque()

    def __len__(self) -> int:
        return len(self.process) + len(self.plain)

    def add(self, waiter: _Waiter) -> None:
        (self.process if waiter.process else self.plain).append(waiter)

    def remove(self, waiter: _Waiter) -> bool:
        lane = self.process if waiter.process else self.plain
        if waiter in lane:
            lane.remove(waiter)
            return True
        return False

    def first_fitting(self, fits: Callable[[bool], bool]) -> _Waiter | None:
        """Take out and return the oldest waiter that fits, if any does."""
        heads = [lane for lane in (self.process, self.plain) if lane and fits(lane[0].process)]
        if not heads:
            return None
        return min(heads, key=lambda lane: lane[0].arrived).popleft()


class NodeBudget:
    def __init__(
        self,
        settings: BudgetSettings | None = None,
        weight: Callable[[str], float] | None = None,
        active: Callable[[], list[str]] | None = None,
        shared: Callable[[], bool] | None = None,
        least: int = 0,
        recheck: float = 1.0,
    ) -> None:
        """`active`: the accounts that have work here now, for whom `least` slots are kept;
        `shared`: whether more than one account may bring work here."""
        self.settings = settings or BudgetSettings()
        self._weight = weight or (lambda _: 1.0)
        self._active = active or (lambda: [])
        self._shared = shared or (lambda: False)
        self._least = least
        self._recheck_after = recheck
        self._recheck: asyncio.TimerHandle | None = None
        self.running = 0
        self.processes = 0
        self._running_by: dict[str, int] = {}
        self._processes_by: dict[str, int] = {}
        self._waiting: dict[str, _Lanes] = {}
        self._arrivals = itertools.count()
        self._credit: dict[str, float] = {}
        self._order: deque[str] = deque()  # accounts with waiters, in turn order
        # Workers turned away, in order (ordered sets): those that would start a process apart,
        # since a freed slot has no room for them while the processes are all taken.
        self._starved: dict[Callable[[], None], None] = {}
        self._starved_processes: dict[Callable[[], None], None] = {}
        # Read when scraped, so counting costs the hot path nothing.
        metrics.NODE_RUNNING.labels("all").set_function(lambda: self.running)
        metrics.NODE_RUNNING.labels("processes").set_function(lambda: self.processes)
        metrics.NODE_WAITING.set_function(self.waiting)

    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    def kept(self, account: str) -> tuple[int, int]:
        """Slots and processes `account` must leave free for other accounts' next attempts."""
        return self._with_newcomers(account, *self._kept_for_active(account))

    def _with_newcomers(self, account: str, slots: int, processes: int) -> tuple[int, int]:
        """What is kept for the active accounts, or for whoever comes next if that is more."""
        if self._least and self._shared():
            if self._running_by.get(account, 0) >= self._least:
                slots = max(slots, min(self._least, self.settings.slots // 4))
            if self._processes_by.get(account, 0) >= self._least:
                processes = max(processes, min(self._least, self.settings.processes // 4))
        return slots, processes

    def _kept_for_active(self, account: str) -> tuple[int, int]:
        if not self._least:
            return 0, 0
        active = self._active()
        if not active or active == [account]:
            return 0, 0
        total = sum(map(self._weight, active))
        if account not in active:
            total += self._weight(account)
        slots = processes = 0
        for other in active:
            if other != account:
                weight = self._weight(other)
                least = math.ceil(self._least * weight)
                slots += max(
                    0,
                    min(least, int(self.settings.slots * weight / total))
                    - self._running_by.get(other, 0),
                )
                processes += max(
                    0,
                    min(least, int(self.settings.processes * weight / total))
                    - self._processes_by.get(other, 0),
                )
        return slots, processes

    def room(self, account: str, process: bool, wake: Callable[[], None]) -> int:
        """How many more attempts a worker may pull now; with none, `wake` is called once some
        slot frees, or once what is kept for other accounts may have changed."""
        waiting = self.waiting() if self._waiting else 0
        for_active = self._kept_for_active(account)
        kept_slots, kept_processes = self._with_newcomers(account, *for_active)
        free = self.settings.slots - self.running - waiting - kept_slots
        if process:
            free = min(free, self.settings.processes - self.processes - waiting - kept_processes)
        if free <= 0:
            (self._starved_processes if process else self._starved)[wake] = None
            if self._recheck is None and any(for_active):
                # A neighbour going quiet frees what was kept for it, and no release says so.
                self._recheck = asyncio.get_running_loop().call_later(
                    self._recheck_after, self._rechecked
                )
            return 0
        return free

    def _rechecked(self) -> None:
        self._recheck = None
        if self._starved or self._starved_processes:
            self._wake_starved()

    def _fits(self, account: str, process: bool) -> bool:
        kept_slots, kept_processes = self.kept(account)
        if self.running + kept_slots >= self.settings.slots:
            return False
        return not process or self.processes + kept_processes < self.settings.processes

    def _take(self, account: str, process: bool) -> None:
        self.running += 1
        count_up(self._running_by, account)
        if process:
            self.processes += 1
            count_up(self._processes_by, account)

    def try_take(self, account: str, process: bool) -> bool:
        """Take a slot if one is free and nobody waits for it (the usual case: no wait)."""
        if self._waiting or not self._fits(account, process):
            return False
        self._take(account, process)
        return True

    async def wait(self, account: str, process: bool) -> None:
        """Wait for a slot, in the account's turn; it is taken when this returns."""
        waiter = _Waiter(asyncio.get_running_loop().create_future(), process, next(self._arrivals))
        if account not in self._waiting:
            self._waiting[account] = _Lanes()
            if account not in self._order:
                self._order.append(account)
        self._waiting[account].add(waiter)
        # Those already waiting have no room (each release admits whoever fits), but this one
        # may fit where they do not: an attempt without a process while theirs wait for one.
        # It waited for the next release instead, up to a whole attempt of the neighbour's
        # holding every process slot (read in the code while chasing bench/busy_neighbour.py's
        # delays, which mostly have another cause: docs/decisions.md, "Fair sharing").
        self._admit()
        try:
            await waiter.future  # `_admit` took the slot for us
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(account, process)
            else:
                self._forget(account, waiter)
            raise

    def release(self, account: str, process: bool) -> None:
        self.running -= 1
        count_down(self._running_by, account)
        if process:
            self.processes -= 1
            count_down(self._processes_by, account)
        if self._waiting:
            self._admit()
        if self._starved or self._starved_processes:
            self._wake_starved()

    def _wake_starved(self) -> None:
        """Wake as many turned-away workers as there is room for — all of them once nothing
        runs, since a woken worker whose queue turned out empty starts nothing that would wake
        the next — and at least one. A worker of processes counts against both rooms: with
        every process slot taken, a freed slot wakes none of them (with 2,000 functions turned
        away it woke up to 190 a task, each to be turned away again)."""
        if self.running == 0:
            counts = (len(self._starved_processes), len(self._starved))
        else:
            waiting = self.waiting()
            slots = self.settings.slots - self.running - waiting
            processes = min(slots, self.settings.processes - self.processes - waiting)
            of_processes = max(0, min(processes, len(self._starved_processes)))
            counts = (of_processes, max(0, slots - of_processes))
        woken = 0
        for starved, count in zip((self._starved_processes, self._starved), counts, strict=True):
            for wake in list(itertools.islice(starved, count)):
                del starved[wake]
                wake()
                woken += 1
        if not woken:  # keep things moving: the first in line looks again
            starved = self._starved or self._starved_processes
            wake = next(iter(starved))
            del starved[wake]
            wake()

    def _forget(self, account: str, waiter: _Waiter) -> None:
        lanes = self._waiting.get(account)
        if lanes is not None and lanes.remove(waiter) and not lanes:
            del self._waiting[account]

    def _admit(self) -> None:
        """Deficit round robin over the accounts that wait: the account at the head of the turn
        order gets its weight in credit, is admitted while it has credit and a slot fits, then
        goes to the back. An account none of whose waiters fits (they all need a process slot)
        is passed over for this pass, so it cannot block others that need only a slot."""
        passed = 0
        while self._order and passed < len(self._order):
            account = self._order[0]
            lanes = self._waiting.get(account)
            if not lanes:
                self._order.popleft()
                self._credit.pop(account, None)
                continue
            waiter = lanes.first_fitting(functools.partial(self._fits, account))
            if waiter is None:
                self._order.rotate(-1)
                passed += 1
                continue
            passed = 0
            credit = self._credit.get(account, 0.0)
            if credit < 1:
                credit += self._weight(account)
            self._credit[account] = credit - 1
            if not waiter.future.done():
                self._take(account, waiter.process)
                waiter.future.set_result(None)
            if not lanes:
                del self._waiting[account]
            if credit - 1 < 1:
                self._order.rotate(-1)
