"""Fair sharing across accounts: weights are validated settings; while accounts compete, each
keeps at most its weighted share of a dispatcher's attempts in flight (end to end, with real
tasks) and of a gateway's requests in progress; alone, an account is not limited at all."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from harness import Api, all_succeed, running
from kubetask.auth import TokenBook, create_token
from kubetask.dispatch.dispatcher import Dispatcher
from kubetask.dispatch.node_budget import BudgetSettings, NodeBudget
from kubetask.fairness import (
    DISPATCH_LEAST_PER_ACCOUNT,
    Fairness,
    FairnessSettings,
    parse_weights,
)
from kubetask.gateway.fair_gate import FairGate, GatedRequests
from kubetask.gateway.query_turns import QueryTurns
from kubetask.settings import Settings
from starlette.types import Receive, Scope, Send


def test_weights_are_names_and_positive_numbers() -> None:
    assert parse_weights("") == {}
    assert parse_weights(" gold=4, silver=2.5 ,") == {"gold": 4.0, "silver": 2.5}
    for bad in ("gold", "gold=", "gold=0", "gold=-1", "gold=abc", "Gold=2", "a.b=2", "=3"):
        with pytest.raises(ValueError, match="KUBETASK_ACCOUNT_WEIGHTS"):
            parse_weights(bad)


def test_settings_refuse_a_bad_weight_or_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETASK_ACCOUNT_WEIGHTS", "gold=lots")
    with pytest.raises(ValueError, match="gold=lots"):
        Settings()
    monkeypatch.setenv("KUBETASK_ACCOUNT_WEIGHTS", "gold=3")
    monkeypatch.setenv("KUBETASK_FAIRNESS", "maybe")
    with pytest.raises(ValueError, match="KUBETASK_FAIRNESS"):
        Settings()
    monkeypatch.setenv("KUBETASK_FAIRNESS", "off")
    settings = Settings()
    assert settings.account_weights == {"gold": 3.0} and not settings.fairness


def test_shares_follow_the_active_accounts_and_their_weights() -> None:
    shares = Fairness(FairnessSettings(slots=8, active_for=0.2, weights={"gold": 3}))
    assert shares.share("gold") is None  # alone: no limit
    shares.started("gold")
    assert shares.free("gold") is None
    shares.started("plain")
    assert shares.share("gold") == 6 and shares.share("plain") == 2
    assert shares.free("gold") == 5
    shares.finished("plain")
    time.sleep(0.25)  # plain has nothing in flight and started nothing lately: inactive
    assert shares.share("gold") is None
    off = Fairness(FairnessSettings(enabled=False, slots=8))
    off.started("a")
    off.started("b")
    assert off.share("a") is None


def test_many_active_accounts_still_get_a_few_slots_each_in_proportion() -> None:
    """Eight slots over twenty accounts were one attempt in flight each, and each account's
    functions were held and released a hundred at a time; the slots grow with the accounts."""
    shares = Fairness(FairnessSettings(slots=8, least_per_account=4, weights={"gold": 2}))
    for i in range(19):
        shares.started(f"plain{i}")
    shares.started("gold")
    assert shares.share("plain0") == 4 and shares.share("gold") == 8
    few = Fairness(FairnessSettings(slots=32, least_per_account=4, weights={"gold": 3}))
    few.started("gold")
    few.started("plain")
    assert few.share("gold") == 24 and few.share("plain") == 8  # a few accounts: as before


def test_a_dispatcher_keeps_a_few_slots_per_account(dispatcher: Dispatcher) -> None:
    shares = Fairness(dispatcher.fairness.settings)  # the running dispatcher's, fresh counts
    for i in range(20):
        shares.started(f"acct{i}")
    assert shares.share("acct0") == DISPATCH_LEAST_PER_ACCOUNT >= 4


async def test_the_gateway_gate_keeps_each_account_to_its_share_in_arrival_order() -> None:
    gate = FairGate(FairnessSettings(slots=4))
    order: list[str] = []
    release = asyncio.Event()

    async def submission(account: str, tag: str) -> None:
        async with gate.turn(account):
            order.append(tag)
            await release.wait()

    flood = [asyncio.create_task(submission("a", f"a{i}")) for i in range(6)]
    await asyncio.sleep(0.01)
    assert order == [f"a{i}" for i in range(6)], "alone, an account is not held back"
    calm = asyncio.create_task(submission("b", "b0"))
    await asyncio.sleep(0.01)
    assert order[-1] == "b0", "a neighbour gets in while the other floods"
    late = [asyncio.create_task(submission("a", f"late{i}")) for i in range(3)]
    await asyncio.sleep(0.01)
    assert not any(t.startswith("late") for t in order), "a is over its share of 2"
    late[0].cancel()  # a waiter that gives up holds nothing
    release.set()
    await asyncio.gather(*flood, calm, *late[1:])
    assert order[-2:] == ["late1", "late2"]
    assert gate.shares.inflight == {}
    assert not gate._waiting


async def test_accounts_take_turns_at_the_index_whoever_asked_first() -> None:
    turns = QueryTurns(slots=2)
    order: list[str] = []

    async def query(account: str, tag: str) -> None:
        async with turns.turn(account):
            order.append(tag)
            await asyncio.sleep(0.01)

    flood = [asyncio.create_task(query("a", f"a{i}")) for i in range(20)]
    await asyncio.sleep(0)
    late = [asyncio.create_task(query(acct, acct)) for acct in ("b", "c")]
    gives_up = asyncio.create_task(query("d", "d"))
    await asyncio.sleep(0)
    gives_up.cancel()
    await asyncio.gather(*flood, *late, return_exceptions=True)
    # Two of a's were running; then each waiting account's first query, b and c, before a's
    # third: arrival order would have put them after all twenty.
    assert order[:2] == ["a0", "a1"] and set(order[2:5]) == {"a2", "b", "c"}, order
    assert "d" not in order and turns.busy == 0 and not turns._waiting


async def test_a_neighbours_list_waits_for_a_turn_not_for_every_query_of_a_flood(
    make_api: Callable[..., Awaitable[Api]],
) -> None:
    """The index answers on one thread: in arrival order, a neighbour's list waited for every
    list query a flooding account had sent before it."""
    heavy, light = await make_api(), await make_api()
    for api in (heavy, light):
        await api.function("f", command=["true"], maxConcurrency=64)
    await asyncio.gather(*(heavy.submit("f", i) for i in range(1000)))
    await light.submit("f", 0)
    await all_succeed(heavy, "f", 1000, timeout=180)
    answered: list[str] = []

    async def listing(api: Api, tag: str) -> None:
        await api.call("GET", "/v1/tasks", params={"limit": "1000"})
        answered.append(tag)

    flood = [asyncio.create_task(listing(heavy, "heavy")) for _ in range(80)]
    await asyncio.sleep(0.3)  # the flood's queries have reached the index
    done_before = len(answered)
    await listing(light, "light")
    await asyncio.gather(*flood)
    # Counted from when the light list was sent: the heavy lists answered before then did not
    # make it wait (a faster gateway answers more of them in the 0.3 s, which is no unfairness).
    pending = 80 - done_before
    waited = answered.index("light") - done_before
    assert pending >= 20, f"only {pending} heavy lists were left when the light one was sent"
    # In arrival order it waited for about all of them; with turns, for those in progress and
    # the answers already on their way out.
    assert waited <= pending // 4, f"the light list waited for {waited} of the {pending} left"


async def test_every_request_of_an_account_takes_its_turn_at_the_gateway(
    tokens_file: Path,
) -> None:
    """Only submissions took turns: an account reading as fast as it could kept any number of
    reads in progress, and each step of a neighbour's request waited behind all of them. The
    gated app here is a stand-in that holds each request until released, so what is in
    progress can be counted; the tokens are real."""
    heavy, light = (create_token(tokens_file, a, a) for a in ("gate-heavy", "gate-light"))
    admin = create_token(tokens_file, "gate-admin", None, admin=True)
    gate = FairGate(FairnessSettings(slots=4))
    inside: list[str] = []
    release = asyncio.Event()

    async def held(scope: Scope, receive: Receive, send: Send) -> None:
        inside.append(scope["path"])
        await release.wait()

    gated = GatedRequests(held, gate, TokenBook(tokens_file))

    def request(token: str | None, path: str) -> asyncio.Task[None]:
        headers = [] if token is None else [(b"authorization", f"Bearer {token}".encode())]
        scope = {"type": "http", "method": "GET", "path": path, "headers": headers}
        return asyncio.create_task(gated(scope, _never_called, _never_called))

    flood = [request(heavy, f"/heavy/{i}") for i in range(6)]
    await asyncio.sleep(0.01)
    assert len(inside) == 6, "alone, an account is not held back"
    calm = request(light, "/light")
    await asyncio.sleep(0.01)
    assert inside[-1] == "/light", "a neighbour gets in while the other reads"
    late = [request(heavy, f"/late/{i}") for i in range(3)]
    others = [
        request(heavy, "/v1/tasks/t/logs"),  # log reads are bounded on their own
        request(admin, "/admin"),
        request(None, "/anonymous"),  # refused by its route
        request("kt_not-a-token", "/forged"),
    ]
    await asyncio.sleep(0.01)
    assert not any(p.startswith("/late") for p in inside), "heavy is over its share of 2"
    assert set(inside[-4:]) == {"/v1/tasks/t/logs", "/admin", "/anonymous", "/forged"}
    release.set()
    await asyncio.gather(*flood, calm, *late, *others)
    assert inside[-3:] == [f"/late/{i}" for i in range(3)]
    assert gate.shares.inflight == {} and not gate._waiting


async def test_long_jobs_lend_their_share_and_the_node_keeps_room_for_a_neighbour(
    make_api: Callable[..., Awaitable[Api]], dispatcher: Dispatcher
) -> None:
    """An attempt counts against its account's share only for its first seconds: account A's
    long jobs ran at its share (four here) the whole time a neighbour ticked along with one
    short task at a time, leaving the node idle. Now A runs all the node lets it, and the node
    keeps two processes for the neighbour, whose tasks still start at once. Once the neighbour
    has gone quiet, A is alone and held to no share, yet two stay free: the neighbour's next
    task does not wait for a 60-second job to end."""
    long, tick = await make_api(), await make_api()
    saved = dispatcher.fairness, dispatcher.budget
    dispatcher.fairness = Fairness(FairnessSettings(slots=8, lend_after=0.5))  # four each
    dispatcher.budget = NodeBudget(
        BudgetSettings(processes=12, slots=64),
        active=lambda: dispatcher.fairness.active(),
        shared=dispatcher.shared,  # this session's dispatcher runs many accounts' functions
        least=2,
        recheck=0.2,
    )
    jobs: list[str] = []
    ticks: list[str] = []
    ticking = True

    async def tick_along() -> None:
        while ticking:
            ticks.append((await tick.submit("tick"))["metadata"]["name"])
            await tick.wait(ticks[-1], timeout=5)  # a process was there for it at once
            await asyncio.sleep(0.2)

    try:
        await tick.function("tick", command=["true"])
        await long.function("job", command=["sleep", "60"], maxConcurrency=20)
        ticker = asyncio.create_task(tick_along())
        await tick.wait(await _first(ticks), timeout=5)
        jobs = [(await long.submit("job"))["metadata"]["name"] for _ in range(20)]
        most = 0
        for _ in range(40):
            most = max(most, await running(long))
            await asyncio.sleep(0.1)
            assert not ticker.done(), ticker  # a tick waited past its 5 s (or failed)
        assert most == 10, most  # 12 processes, 2 kept for the neighbour: not its share of 4
        waiting = [(await long.get(j))["status"]["waiting"] for j in jobs]
        reasons = [w["reason"] for w in waiting if w is not None]
        assert len(reasons) == 10, waiting
        assert "kept for other accounts' next tasks" in reasons[0], reasons[0]
        ticking = False
        await ticker
        await asyncio.sleep(3)  # the neighbour is idle after 2 s
        assert await running(long) == 10
        ticks.append((await tick.submit("tick"))["metadata"]["name"])
        await tick.wait(ticks[-1], timeout=5)
    finally:
        ticking = False
        for task_id in jobs:
            await long.call("POST", f"/v1/tasks/{task_id}/stop")
        for task_id in jobs:
            await long.wait(task_id)
        dispatcher.fairness, dispatcher.budget = saved
    phases = {(await tick.get(t))["status"]["phase"] for t in ticks}
    assert phases == {"Succeeded"} and len(ticks) > 10, (phases, len(ticks))


async def _first(items: list[str]) -> str:
    while not items:
        await asyncio.sleep(0.01)
    return items[0]


async def _never_called(*_: object) -> Any:
    raise AssertionError("the stand-in app neither receives nor sends")


async def test_a_flooding_account_keeps_to_its_weighted_share_of_the_dispatcher(
    make_api: Callable[..., Awaitable[Api]], dispatcher: Dispatcher
) -> None:
    gold, plain = await make_api(), await make_api()
    slow = ["sleep", "0.3"]
    for api in (gold, plain):
        await api.function("slow", command=slow, maxConcurrency=32)
    saved = dispatcher.fairness
    dispatcher.fairness = Fairness(FairnessSettings(slots=8, weights={gold.account: 3}))
    try:
        ids: list[list[str]] = [[], []]
        for i in range(200):  # both accounts have work from the start, and long after
            for j, api in enumerate((gold, plain)):
                ids[j].append((await api.submit("slow", i))["metadata"]["name"])
        await asyncio.sleep(1.5)  # the first round (the AIMD window starts at 8) has ended
        most = [0, 0]
        for _ in range(10):
            for i, api in enumerate((gold, plain)):
                most[i] = max(most[i], await running(api))
            await asyncio.sleep(0.1)
        assert most[0] <= 6 and most[1] <= 2, most
        assert most[0] > 2, most  # the heavier weight gets more, not the same
    finally:
        dispatcher.fairness = saved
    for api, task_ids in zip((gold, plain), ids, strict=True):
        await all_succeed(api, "slow", len(task_ids), timeout=120)


async def test_functions_held_back_by_their_accounts_share_are_woken_when_it_frees(
    make_api: Callable[..., Awaitable[Api]], dispatcher: Dispatcher
) -> None:
    """Several accounts with several functions each, a share of one attempt per account: a
    function turned away because its account's share was taken by a sibling must be pulled
    again once the sibling's task ends, or its tasks wait for ever (a burst over 100 accounts
    of 100 functions stalled this way with most of its tasks still Queued)."""
    accounts = [await make_api() for _ in range(3)]
    for api in accounts:
        for f in range(4):
            await api.function(f"sib{f}", command=["sleep", "0.05"], maxConcurrency=1)
    saved = dispatcher.fairness
    dispatcher.fairness = Fairness(FairnessSettings(slots=3, active_for=5))
    try:
        for i in range(5):
            for api in accounts:
                for f in range(4):
                    await api.submit(f"sib{f}", i)
        for api in accounts:
            for f in range(4):
                await all_succeed(api, f"sib{f}", 5, timeout=60)
    finally:
        dispatcher.fairness = saved


async def test_a_pull_opened_while_alone_brings_no_more_than_a_share_once_a_neighbour_wakes(
    make_api: Callable[..., Awaitable[Api]], dispatcher: Dispatcher
) -> None:
    """A pull request stays open until filled. One opened while its account was alone was
    sized by the function's window (up to its maxConcurrency) and, filled after a neighbour
    woke, ran 40 long tasks where the share was 16. Each request now asks for at most the
    share the account would have were one more account active; alone again, it still gets
    all it may run."""
    alone, neighbour = await make_api(), await make_api()
    saved = dispatcher.fairness
    dispatcher.fairness = Fairness(FairnessSettings(slots=8))  # two accounts: four each
    ids: list[str] = []
    try:
        await alone.function("job", command=["sleep", "30"], maxConcurrency=40)
        await neighbour.function("tick", command=["sleep", "30"])
        await asyncio.sleep(0.5)  # the job's request is open, sized while its account was alone
        await neighbour.submit("tick", task_id="n")
        await neighbour.wait("n", {"Running"})
        ids = [(await alone.submit("job"))["metadata"]["name"] for _ in range(40)]
        await asyncio.sleep(2)
        assert await running(alone) <= 4
        await neighbour.call("POST", "/v1/tasks/n/stop", 200)
        for task_id in ids:  # alone again (after 2 s): every task it may run, runs
            await alone.wait(task_id, {"Running"}, timeout=20)
    finally:
        dispatcher.fairness = saved
        for task_id in ids:
            await alone.call("POST", f"/v1/tasks/{task_id}/stop")
