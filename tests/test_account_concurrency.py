"""An account's concurrency limit: all its functions together run at most that many attempts at
once (each function's own maxConcurrency notwithstanding), the rest wait Queued and say why, a
neighbour is not held by it, and the limit is split over the live dispatchers; limits of one's
own are validated settings, shown in `GET /v1/limits`."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from harness import Api, all_succeed, as_user, gateway, running
from kubetask.dispatch.account_concurrency import AccountConcurrency
from kubetask.dispatch.dispatcher import Dispatcher
from kubetask.settings import Settings


async def test_an_accounts_functions_together_run_no_more_than_its_limit(
    make_api: Callable[..., Awaitable[Api]], dispatcher: Dispatcher
) -> None:
    capped, free = await make_api(), await make_api()
    saved = dispatcher.concurrency
    dispatcher.concurrency = AccountConcurrency(
        lambda account: 3 if account == capped.account else 0, lambda: 1
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


async def test_the_limit_is_split_over_the_live_dispatchers() -> None:
    dispatchers = 3
    limits = AccountConcurrency(
        lambda account: {"big": 10, "small": 2}.get(account, 0), lambda: dispatchers
    )
    assert limits.share("big") == 3  # rounded down: never more than the limit in all
    assert limits.share("small") == 1  # at least one each
    assert limits.share("other") is None
    woken: list[str] = []
    ends = [limits.delivered_one("big") for _ in range(3)]
    assert limits.free("big", lambda: woken.append("first")) == 0
    assert limits.free("big", lambda: woken.append("second")) == 0
    ends.pop()()
    assert woken == ["first"]  # one ended: one more may be asked for
    dispatchers = 1  # the others left: this one's part grows to all ten
    assert limits.free("big", lambda: None) == 8
    for end in ends:
        end()
    assert woken == ["first", "second"] and limits.delivered == {}


async def test_attempts_delivered_past_the_limit_wait_for_a_place_in_turn() -> None:
    """Two functions pulling at the same moment each see the account's whole room: what one
    of them brings past the limit waits for a place rather than running."""
    limits = AccountConcurrency(lambda account: 2, lambda: 1)
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
