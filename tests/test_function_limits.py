"""How many functions an account may have: past nats-server's default of 1,000 consumers per
stream (2.15) when sharing the account's queue, and a clear 409 — not a 500 — at the configured
limit (KUBETASK_QUEUE_MAX_FUNCTIONS)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable

import pytest
from harness import Api
from kubetask import names, queues
from kubetask.gateway import errors
from kubetask.models import ObjectMeta, TaskFunction, TaskFunctionSpec
from kubetask.plane import DataPlane
from kubetask.queue_moves import Mover


def _fn(account: str, name: str) -> TaskFunction:
    return TaskFunction(
        metadata=ObjectMeta(name=name, namespace=account),
        spec=TaskFunctionSpec(command=["true"]),
    )


async def test_an_account_shares_its_queue_among_more_than_1000_functions(
    api: Api, plane: DataPlane, make_api: Callable[..., Awaitable[Api]]
) -> None:
    names = [f"f{i:04d}" for i in range(1001)]
    try:
        for name in names:
            await plane.mover.register(plane.registry, _fn(api.account, name))
        last = await api.call("GET", f"/v1/functions/{names[-1]}", 200)
        assert last["status"]["queue"] == f"KT_Q_{api.account}" and last["status"]["ready"]
        await api.submit(names[-1], task_id="the-1001st")
        assert (await api.wait("the-1001st"))["status"]["phase"] == "Succeeded"

        # Listed in pages that follow each other: every function once, in name order.
        seen: list[str] = []
        cursor = None
        while True:
            page = await api.http.get(
                "/v1/functions", params={"limit": 300, "cursor": cursor or ""}
            )
            assert page.status_code == 200, page.text
            assert len(page.json()) <= 300
            seen += [f["metadata"]["name"] for f in page.json()]
            cursor = page.headers.get("Next-Cursor")
            if cursor is None:
                break
            assert cursor == f"{api.account}/{seen[-1]}"
        assert seen == names
        other = await make_api()  # another tenant's cursor into this account shows it nothing
        page = await other.http.get("/v1/functions", params={"cursor": f"{api.account}/f0000"})
        assert page.status_code == 200 and page.json() == []
        for bad in ("nope", "a/B!", "/x", "a/"):
            refused = await api.http.get("/v1/functions", params={"cursor": bad})
            assert refused.status_code == 422 and refused.json()["field"] == "cursor", bad
        configs = await api.http.get("/v1/asyncconfigs", params={"limit": 1})
        assert configs.status_code == 200 and configs.json() == []
    finally:
        for name in names:
            await api.call("DELETE", f"/v1/functions/{name}")


async def test_past_the_limit_registering_is_a_409(api: Api, plane: DataPlane) -> None:
    """Also once nats-server removed the registered functions' consumers for idleness: the
    stream's consumer count no longer says how many functions share it."""
    limited = dataclasses.replace(plane.settings, queue_max_functions=2, consumer_idle=0.5)
    mover = Mover(plane.js, limited)
    for name in ("one", "two"):
        await mover.register(plane.registry, _fn(api.account, name))
    stream = names.account_stream(api.account)
    deadline = time.monotonic() + 20
    while (await plane.js.stream_info(stream)).state.consumer_count:
        assert time.monotonic() < deadline, "nats-server kept the idle consumers"
        await asyncio.sleep(0.2)
    with pytest.raises(queues.TooManyFunctions) as refused:
        await mover.register(plane.registry, _fn(api.account, "three"))
    assert plane.registry.function(api.account, "three") is None, "not registered half-way"
    await mover.register(plane.registry, _fn(api.account, "two"))  # registered again: room
    answer = errors.render(refused.value)
    assert answer is not None and answer.status_code == 409
    assert b"KUBETASK_QUEUE_MAX_FUNCTIONS" in answer.body
