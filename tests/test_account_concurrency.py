"""An account's concurrency limit: all its functions together run at most that many attempts at
once (each function's own maxConcurrency notwithstanding), the rest wait Queued and say why, a
neighbour is not held by it, and the limit is split over the live dispatchers so that the parts
add up to it (two real dispatchers with a limit of one run one at a time); limits of one's own
are validated settings, shown in `GET /v1/limits`."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from harness import Api, all_succeed, as_user, gateway, running
from kubetask.dispatch.account_concurrency import AccountConcurrency, NoPart
from kubetask.dispatch.dispatcher import Dispatcher
from kubetask.dispatch.leases import member_key
from kubetask.plane import DataPlane
from kubetask.settings import Settings


async def test_an_accounts_functions_together_run_no_more_than_its_limit(
    make_api: Callable[..., Awaitable[Api]], dispatcher: Dispatcher
) -> None:
    capped, free = await make_api(), await make_api()
    saved = dispatcher.concurrency
    assert dispatcher.leases is not None
    dispatcher.concurrency = AccountConcurrency(
        lambda account: 3 if account == capped.account else 0,
        dispatcher.leases.members,
        member_key(dispatcher.id),
    )
    try:
        for name in ("one", "two"):
            await capped.function(name, command=["sleep", "1"], maxConcurrency=10)
        await free.function("one", command=["sleep", "1"], maxConcurrency=10)
        ids = [(await capped.submit(name))["metadata"]["name"] for name in ("one", "two") * 5]
        for _ in range(5):
            await free.submit("one")
        most = [0, 0]
        reason = None
        for _ in range(15):
            most = [max(most[0], await running(capped)), max(most[1], await running(free))]
            for task_id in ids:
                waiting = (await capped.get(task_id))["status"]["waiting"]
                if (
                    reason is None
                    and waiting is not None
                    and "concurrency limit" in waiting["reason"]
                ):
                    reason = waiting["reason"]
            await asyncio.sleep(0.1)
        assert most[0] == 3, most  # two functions of ten each: three in all
        assert (await capped.call("GET", "/v1/limits", 200))["running"] <= 3
        assert most[1] == 5, most  # the neighbour's five at once
        assert reason is not None and "KUBETASK_ACCOUNT_MAX_CONCURRENCY" in reason, reason
        assert f"account {capped.account!r} runs 3 attempts there" in reason, reason
        await all_succeed(capped, "one", 5, timeout=60)
        await all_succeed(capped, "two", 5, timeout=60)
        await all_succeed(free, "one", 5, timeout=60)
    finally:
        dispatcher.concurrency = saved


def part_of(me: str, members: list[str], limit: int = 1, account: str = "x") -> int | None:
    """`me`'s part of `account`'s limit, split over `members`."""
    return AccountConcurrency(lambda a: limit, lambda: members, me).share(account)


def test_the_parts_over_the_live_dispatchers_add_up_to_the_limit() -> None:
    members = ["m.a", "m.b", "m.c"]
    limits = {"big": 10, "small": 2, "one": 1}
    parts = {
        me: AccountConcurrency(lambda account: limits.get(account, 0), lambda: members, me)
        for me in members
    }
    for account, limit in limits.items():
        shares = [parts[me].share(account) for me in members]
        assert sum(s or 0 for s in shares) == limit, (account, shares)
        assert max(s or 0 for s in shares) - min(s or 0 for s in shares) <= 1, shares
    assert parts["m.a"].share("other") is None
    # The remainder goes to different dispatchers for different accounts.
    limits.update({f"acct{i}": 1 for i in range(12)})
    firsts = {next(me for me in members if parts[me].share(f"acct{i}")) for i in range(12)}
    assert len(firsts) > 1, firsts
    # A dispatcher leasing one of the account's partitions keeps a place whatever its part.
    nothing = next(me for me in members if parts[me].share("one") == 0)
    keeper = AccountConcurrency(lambda a: 1, lambda: members, nothing, lambda a: a == "one")
    assert keeper.share("one") == 1


def test_a_puller_held_by_the_limit_is_woken_when_an_attempt_ends() -> None:
    limits = AccountConcurrency(lambda a: 2, lambda: ["m.me"], "m.me")
    ends = [limits.delivered_one("x") for _ in range(2)]
    woken: list[str] = []
    assert limits.free("x", lambda: woken.append("first")) == 0
    assert limits.free("x", lambda: woken.append("second")) == 0
    ends.pop()()
    assert woken == ["first"]  # one ended: one more may be asked for
    ends.pop()()
    assert woken == ["first", "second"] and limits.delivered == {}


def test_a_dispatcher_with_no_part_looks_again_when_the_others_leave() -> None:
    members = ["m.a", "m.b"]
    parts = {me: AccountConcurrency(lambda a: 1, lambda: members, me) for me in members}
    idle = next(me for me in members if parts[me].share("x") == 0)
    limits = parts[idle]
    woken: list[str] = []
    assert limits.free("x", lambda: woken.append("puller")) == 0
    assert not limits.try_take("x")
    limits.rebalanced()
    assert woken == ["puller"]  # still no part: woken, and it asks for nothing
    assert limits.free("x", lambda: woken.append("again")) == 0
    members.remove(next(me for me in members if me != idle))  # the other one left
    limits.rebalanced()
    assert woken == ["puller", "again"]
    assert limits.free("x", lambda: None) == 1 and limits.try_take("x")


async def test_a_task_waiting_where_no_part_is_left_goes_back_to_its_queue() -> None:
    """A dispatcher alone holds the whole limit; another joins and takes all of it: what
    waited here for a place must go to the other, not wait here for good."""
    members = ["m.a"]
    limits = AccountConcurrency(lambda a: 1, lambda: members, "m.a")
    assert limits.try_take("x")
    waiter = asyncio.create_task(limits.wait("x"))
    await asyncio.sleep(0)
    # One that comes first in the account's order joins.
    first = next(m for m in (f"m.b{i}" for i in range(64)) if part_of("m.a", ["m.a", m]) == 0)
    members.append(first)
    assert limits.share("x") == 0
    limits.rebalanced()
    with pytest.raises(NoPart):
        await asyncio.wait_for(waiter, 1)
    assert not limits.try_take("x")  # no part here now
    with pytest.raises(NoPart):
        await asyncio.wait_for(limits.wait("x"), 1)  # one delivered later goes back at once
    limits.release("x")
    members.remove(first)  # alone again: nothing left waiting stands before a new task
    assert limits.running == {} and limits.try_take("x")


async def test_two_dispatchers_with_a_limit_of_one_run_one_at_a_time(
    make_api: Callable[..., Awaitable[Api]],
    dispatcher: Dispatcher,
    settings: Settings,
    nats_passwords: dict[str, str],
) -> None:
    api = await make_api()
    limited = dataclasses.replace(
        as_user(settings, "dispatcher", nats_passwords),
        account_concurrency_limits={api.account: 1.0},
    )
    plane = await DataPlane.connect(limited, "test-second-dispatcher")
    second = Dispatcher(plane)
    saved = dispatcher.concurrency
    assert dispatcher.leases is not None
    dispatcher.concurrency = AccountConcurrency(
        limited.concurrency_limit, dispatcher.leases.members, member_key(dispatcher.id)
    )
    try:
        await second.start()
        assert second.leases is not None
        for _ in range(100):  # each has seen the other's member key
            if dispatcher.leases.dispatchers() == second.leases.dispatchers() == 2:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the two dispatchers never saw each other")
        await api.function("nap", command=["sleep", "0.5"], maxConcurrency=10)
        ids = [(await api.submit("nap"))["metadata"]["name"] for _ in range(6)]
        most, reasons = 0, set()
        for _ in range(40):
            most = max(most, await running(api))
            for task_id in ids:
                waiting = (await api.get(task_id))["status"]["waiting"]
                if waiting is not None:
                    reasons.add(waiting["reason"])
            await asyncio.sleep(0.05)
        await all_succeed(api, "nap", 6, timeout=60)
        assert most == 1, most
        said = " ".join(reasons)
        assert "runs 1 attempt there, its part of its concurrency limit" in said, reasons
        assert "no part of it falls to this one" in said, reasons
    finally:
        dispatcher.concurrency = saved
        await second.close(drain_timeout=5)
        await plane.close()


async def test_when_the_dispatcher_with_the_part_leaves_the_other_runs_the_rest(
    make_api: Callable[..., Awaitable[Api]],
    dispatcher: Dispatcher,
    settings: Settings,
    nats_passwords: dict[str, str],
) -> None:
    """The dispatcher without a part has nothing of the account's to end and wake its
    pullers: only hearing that the other left (its next lease round) lets it start."""
    names = [f"part{i}-{os.getpid()}" for i in range(64)]
    limited = dataclasses.replace(
        as_user(settings, "dispatcher", nats_passwords),
        account_concurrency_limits=dict.fromkeys(names, 1.0),
    )
    plane = await DataPlane.connect(limited, "test-leaving-dispatcher")
    second = Dispatcher(plane)
    both = sorted([member_key(dispatcher.id), member_key(second.id)])
    # An account whose one place falls to the second dispatcher.
    account = next(n for n in names if part_of(member_key(second.id), both, account=n) == 1)
    api = await make_api(account)
    saved = dispatcher.concurrency
    assert dispatcher.leases is not None
    dispatcher.concurrency = AccountConcurrency(
        limited.concurrency_limit, dispatcher.leases.members, member_key(dispatcher.id)
    )
    closed = False
    try:
        await second.start()
        for _ in range(100):
            if dispatcher.leases.dispatchers() == 2:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the first dispatcher never saw the second")
        await api.function("nap", command=["sleep", "0.5"], maxConcurrency=10)
        for _ in range(4):
            await api.submit("nap")
        for _ in range(100):
            if await running(api):
                break
            await asyncio.sleep(0.05)
        await second.close(drain_timeout=5)  # its attempt ends; the rest are the other's now
        closed = True
        most = 0
        for _ in range(30):
            most = max(most, await running(api))
            await asyncio.sleep(0.1)
        await all_succeed(api, "nap", 4, timeout=30)
        assert most <= 1, most
    finally:
        dispatcher.concurrency = saved
        if not closed:
            await second.close(drain_timeout=5)
        await plane.close()


async def test_attempts_delivered_past_the_limit_wait_for_a_place_in_turn() -> None:
    """Two functions pulling at the same moment each see the account's whole room: what one
    of them brings past the limit waits for a place rather than running."""
    limits = AccountConcurrency(lambda account: 2, lambda: ["m.me"], "m.me")
    assert limits.try_take("a") and limits.try_take("a")
    assert not limits.try_take("a")
    first = asyncio.create_task(limits.wait("a"))
    second = asyncio.create_task(limits.wait("a"))
    await asyncio.sleep(0)
    assert not first.done() and not second.done()
    assert limits.try_take("b")  # another account's place is its own
    limits.release("a")
    await asyncio.sleep(0)
    assert first.done() and not second.done()  # in the order they came
    assert not limits.try_take("a"), "a free place goes to those already waiting"
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)
    limits.release("a")
    limits.release("a")
    assert limits.running == {"b": 1}


async def test_limits_of_ones_own_show_in_the_api(
    make_api: Callable[..., Awaitable[Api]],
    settings: Settings,
    tokens_file: Path,
    nats_passwords: dict[str, str],
) -> None:
    usual, gold, tight = await make_api(), await make_api(), await make_api()
    limited = dataclasses.replace(
        as_user(settings, "gateway", nats_passwords),
        account_max_concurrency=50,
        account_concurrency_limits={gold.account: 0.0, tight.account: 2.0},
    )
    seen = {}
    async with gateway(limited, tokens_file) as url:
        for api in (usual, gold, tight):
            headers = {"Authorization": f"Bearer {api.token}"}
            async with httpx.AsyncClient(base_url=url, headers=headers) as http:
                seen[api.account] = (await http.get("/v1/limits")).json()["maxConcurrency"]
    assert seen == {usual.account: 50, gold.account: 0, tight.account: 2}


def test_concurrency_limits_are_account_names_and_whole_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for variable, bad in (
        ("KUBETASK_ACCOUNT_CONCURRENCY_LIMITS", "gold=1.5"),
        ("KUBETASK_ACCOUNT_CONCURRENCY_LIMITS", "gold=-1"),
        ("KUBETASK_ACCOUNT_CONCURRENCY_LIMITS", "Gold=3"),
        ("KUBETASK_ACCOUNT_MAX_CONCURRENCY", "-1"),
        ("KUBETASK_ACCOUNT_MAX_CONCURRENCY", "lots"),
    ):
        with monkeypatch.context() as env:
            env.setenv(variable, bad)
            with pytest.raises(ValueError, match=variable):
                Settings()
    monkeypatch.setenv("KUBETASK_ACCOUNT_MAX_CONCURRENCY", "100")
    monkeypatch.setenv("KUBETASK_ACCOUNT_CONCURRENCY_LIMITS", "gold=0, free=10")
    ours = Settings()
    assert [ours.concurrency_limit(a) for a in ("gold", "free", "other")] == [0, 10, 100]
