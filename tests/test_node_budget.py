"""The node budget: a dispatcher never runs more attempts (nor more processes) than its budget,
whatever the functions' own limits; a burst over hundreds of functions completes with every task
Succeeded once, no slow-consumer disconnect and never more executor processes than the budget;
and slots are handed to waiting accounts in proportion to their weights."""

from __future__ import annotations

import asyncio
import functools
import os
from collections import Counter
from pathlib import Path

from harness import Api, all_succeed
from kubetask.dispatch.dispatcher import Dispatcher
from kubetask.dispatch.node_budget import BudgetSettings, NodeBudget


async def test_waiting_accounts_get_slots_in_proportion_to_their_weights() -> None:
    budget = NodeBudget(
        BudgetSettings(processes=1, slots=1), weight=lambda a: 3.0 if a == "gold" else 1.0
    )
    assert budget.try_take("held", process=True)
    admitted: list[str] = []

    async def task(account: str) -> None:
        await budget.wait(account, process=True)
        admitted.append(account)

    waiters = [asyncio.create_task(task(a)) for a in ["plain"] * 8 + ["gold"] * 8]
    await asyncio.sleep(0)
    assert not budget.try_take("held", process=False), "a free slot goes to those already waiting"
    woken: list[int] = []
    budget.room("held", process=True, wake=lambda: woken.append(1))  # a worker that found no room
    for _ in range(8):
        budget.release("held", process=True)
        await asyncio.sleep(0)
    assert Counter(admitted) == {"gold": 6, "plain": 2}, admitted
    assert woken, "a worker that found no room is woken when a slot frees"
    for w in waiters:
        w.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert budget.running == 1 and budget.processes == 1
    assert budget.room("held", process=False, wake=lambda: None) == 0


async def test_an_attempt_without_a_process_is_not_held_behind_those_waiting_for_one() -> None:
    """Every process slot taken and attempts waiting for one, another account's or its own: an
    attempt that needs only a slot starts at once, not at the next release (up to a whole
    attempt later). Those waiting for a process start in the order they came when one frees,
    ahead of a slot-only attempt that came after them."""
    budget = NodeBudget(BudgetSettings(processes=1, slots=5))
    assert budget.try_take("held", process=True)
    busy = [asyncio.create_task(budget.wait("busy", process=True)) for _ in range(3)]
    await asyncio.sleep(0)
    assert not budget.try_take("held", process=False), "try_take never jumps a queue"
    await asyncio.wait_for(budget.wait("calm", process=False), timeout=1)
    await asyncio.wait_for(budget.wait("calm", process=False), timeout=1)
    assert (budget.running, budget.processes) == (3, 1)
    await asyncio.wait_for(budget.wait("busy", process=False), timeout=1)  # behind its own
    assert (budget.running, budget.processes) == (4, 1) and not any(b.done() for b in busy)
    late = asyncio.create_task(budget.wait("calm", process=False))
    await asyncio.sleep(0)
    assert late.done() and budget.running == 5
    left = asyncio.create_task(budget.wait("busy", process=False))  # no slot at all now
    await asyncio.sleep(0.05)
    assert not left.done() and not any(b.done() for b in busy)
    # busy's oldest waiter gets it, not the later slot-only one
    budget.release("held", process=True)
    await asyncio.sleep(0)
    assert [b.done() for b in busy] == [True, False, False] and not left.done()
    budget.release("calm", process=False)  # a slot but no process: the slot-only one
    await asyncio.sleep(0)
    assert left.done() and not any(b.done() for b in busy[1:])
    assert (budget.running, budget.processes, budget.waiting()) == (5, 1, 2)
    for w in busy:
        w.cancel()
    await asyncio.gather(*busy, return_exceptions=True)
    assert budget.waiting() == 0 and (budget.running, budget.processes) == (5, 1)


async def test_a_few_slots_stay_kept_for_each_other_active_account() -> None:
    """Long attempts lend their place in the fair share back (`share_lending.py`), so the node
    budget is what keeps one account's long jobs from taking every process ahead of a
    neighbour's next task: while both are active, `least` of each (at most an account's weighted
    part of the node) stay free for the one not holding them."""
    active = {"long", "tick"}
    budget = NodeBudget(
        BudgetSettings(processes=6, slots=8), active=lambda: sorted(active), least=2, recheck=0.1
    )
    taken = 0
    while budget.try_take("long", process=True):
        taken += 1
    assert taken == 4, taken  # two of the six processes are kept for "tick"
    woken: list[int] = []
    assert budget.room("long", process=True, wake=lambda: woken.append(1)) == 0
    assert budget.room("long", process=False, wake=lambda: None) == 2  # slots: 8 - 4 - 2 kept
    assert budget.try_take("tick", process=True) and budget.try_take("tick", process=True)
    assert not budget.try_take("tick", process=True)  # its kept two, not "long"'s processes
    budget.release("tick", process=True)
    assert not budget.try_take("long", process=True)  # "tick" holds one: one is still kept
    active.discard("tick")  # the neighbour went quiet: nothing frees, yet "long" may go on
    await asyncio.sleep(0.3)
    assert woken, "a worker held back by what was kept is woken when that may have changed"
    assert budget.try_take("long", process=True)
    # Three active accounts on a node of four: each keeps what its weight's part allows (one),
    # never so much that nobody may start.
    small = NodeBudget(
        BudgetSettings(processes=4, slots=4), active=lambda: ["a", "b", "c"], least=4
    )
    assert small.try_take("a", process=True) and small.try_take("a", process=True)
    assert not small.try_take("a", process=True)
    assert small.try_take("b", process=True) and small.try_take("c", process=True)


def test_where_accounts_share_a_node_one_holding_it_leaves_a_few_for_whoever_comes_next() -> None:
    """An account alone is held to no share, so its long jobs took every process and another
    account's first task waited for one of them to end. Where functions of more than one
    account run, an account holding `least` leaves `least` (at most a quarter of the node) free
    for the next one; a node serving one account keeps nothing back."""
    shared = False
    budget = NodeBudget(
        BudgetSettings(processes=16, slots=64),
        active=lambda: ["long"],
        shared=lambda: shared,
        least=2,
    )
    taken = 0
    while budget.try_take("long", process=True):
        taken += 1
    assert taken == 16
    for _ in range(taken):
        budget.release("long", process=True)
    shared = True
    taken = 0
    while budget.try_take("long", process=True):
        taken += 1
    assert taken == 14, taken
    assert budget.kept("long") == (2, 2)
    assert budget.try_take("next", process=True) and budget.try_take("next", process=True)
    assert not budget.try_take("next", process=True)
    tiny = NodeBudget(BudgetSettings(processes=3, slots=3), shared=lambda: True, least=2)
    assert all(tiny.try_take("long", process=True) for _ in range(3))  # a quarter of 3 is 0


def _sleeping_children() -> int:
    """Executor processes of this test process's dispatcher (`sleep 0.05`) alive now."""
    me, count = os.getpid(), 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[1]) == me and (proc / "cmdline").read_bytes() == b"sleep\x000.05\x00":
                count += 1
        except (OSError, IndexError, ValueError):
            continue
    return count


async def test_a_burst_over_500_functions_keeps_to_the_node_budget(
    api: Api, dispatcher: Dispatcher, nats_log: Path
) -> None:
    functions, per_function, processes = 500, 3, 8
    for i in range(functions):
        await api.function(f"f{i:03d}", command=["sleep", "0.05"], maxConcurrency=64)
    saved = dispatcher.budget
    dispatcher.budget = NodeBudget(
        BudgetSettings(processes=processes, slots=processes * 2), dispatcher.fairness.weight
    )
    peak = 0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _sleeping_children())
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    try:
        for _ in range(per_function):
            for i in range(functions):
                await api.submit(f"f{i:03d}")
        await all_succeed(api, None, functions * per_function, timeout=120)
    finally:
        done.set()
        await watcher
        dispatcher.budget = saved
    assert 0 < peak <= processes, peak
    assert "Slow Consumer" not in await asyncio.to_thread(nats_log.read_text)


def test_workers_that_found_no_room_are_all_woken_once_nothing_runs() -> None:
    """A woken worker whose queue is empty starts nothing, so it wakes nobody in turn: were
    only a few woken per freed slot, the rest could wait for ever with their tasks queued."""
    budget = NodeBudget(BudgetSettings(processes=2, slots=2))
    assert budget.try_take("held", process=True) and budget.try_take("held", process=True)
    woken: list[int] = []
    for i in range(10):
        budget.room("held", process=True, wake=functools.partial(woken.append, i))
    budget.release("held", process=True)
    assert len(woken) == 1, woken  # room for one more: one is woken
    budget.release("held", process=True)
    assert sorted(woken) == list(range(10)), woken  # nothing runs: all are


def test_a_freed_slot_wakes_no_more_process_workers_than_processes_may_start() -> None:
    """With every process slot taken, a slot freed by a warm invocation has no room for a
    `command` attempt: it used to wake as many workers of processes as slots were free (up to
    190 a task with 2,000 functions turned away), each to be turned away again."""
    budget = NodeBudget(BudgetSettings(processes=2, slots=10))
    assert budget.try_take("held", process=True) and budget.try_take("held", process=True)
    assert budget.try_take("held", process=False)
    woken: list[int] = []
    for i in range(50):
        assert budget.room("held", process=True, wake=functools.partial(woken.append, i)) == 0
    budget.release("held", process=False)
    assert woken == [0], woken  # only the first in line looks again
    budget.release("held", process=True)
    assert woken == [0, 1], woken  # room for one process: one more is woken
