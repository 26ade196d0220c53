"""Small accounts share one stream (`KT_QM`): their `auto` functions start there, their tasks run
apart, one account's backlog throttles only that account, and a function crowding the shared
stream gets a stream of its own and comes back to the shared one when idle."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from harness import Api, all_succeed, as_user
from kubetask import names
from kubetask.models import ObjectMeta, TaskFunction, TaskFunctionSpec
from kubetask.plane import DataPlane
from kubetask.queue_moves import Mover
from kubetask.queue_routes import Router, RouteSettings
from kubetask.settings import Settings
from nats.js.errors import NotFoundError
from test_throttle import _flood, gateway

GATED = """
    import os, sys, time
    gate, record = sys.argv[1], sys.argv[2]
    while not os.path.exists(gate):
        time.sleep(0.05)
    with open(record, "a") as f:
        f.write(os.environ["KUBETASK_TASK_ID"] + "\\n")
"""


def small(settings: Settings, nats_passwords: dict[str, str], *accounts: str) -> Settings:
    gateway_settings = as_user(settings, "gateway", nats_passwords)
    return dataclasses.replace(gateway_settings, small_accounts=frozenset(accounts))


def client(url: str, api: Api) -> Api:
    http = httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {api.token}"}, timeout=30
    )
    return Api(http, api.account, api.token, api.workdir)


async def test_small_accounts_share_one_stream_and_their_tasks_run_apart(
    make_api: Callable[..., Awaitable[Api]],
    settings: Settings,
    tokens_file: Path,
    nats_passwords: dict[str, str],
    plane: DataPlane,
) -> None:
    tag = os.getpid()
    one, two = await make_api(f"smallone-{tag}"), await make_api(f"smalltwo-{tag}")
    big = await make_api()
    async with gateway(
        small(settings, nats_passwords, one.account, two.account), tokens_file
    ) as url:
        one, two, big = client(url, one), client(url, two), client(url, big)
        for api in (one, two):
            await api.function("work", command=["true"])
        await big.function("pinned", command=["true"], queueMode="shared")
        await big.function("own", command=["true"])  # not small: the account's stream
        for api, name in ((one, "work"), (two, "work"), (big, "pinned")):
            fn = await api.call("GET", f"/v1/functions/{name}", 200)
            assert fn["status"]["queue"] == names.SHARED_STREAM, fn["status"]
        placed = (await one.call("GET", "/v1/functions/work", 200))["status"]["queueAssignment"]
        assert placed["mode"] == "shared" and "KUBETASK_SMALL_ACCOUNTS" in placed["reason"]
        pinned = await big.call("GET", "/v1/functions/pinned", 200)
        assert pinned["status"]["queueAssignment"] is None  # the user's choice, not a placement
        own = await big.call("GET", "/v1/functions/own", 200)
        assert own["status"]["queue"] == names.account_stream(big.account)

        ids = {}
        for api, name in ((one, "work"), (two, "work"), (big, "pinned")):
            ids[api.account] = [(await api.submit(name, i))["metadata"]["name"] for i in range(15)]
        for api in (one, two, big):
            for task_id in ids[api.account]:
                done = await api.wait(task_id)
                assert done["status"]["phase"] == "Succeeded", done["status"]
                assert done["status"]["attempts"] == 1
        # No stream of their own was made for the small accounts; each function is its own
        # consumer in the shared one.
        for api in (one, two):
            try:
                await plane.js.stream_info(names.account_stream(api.account))
                raise AssertionError(f"{api.account} got a stream of its own")
            except NotFoundError:
                pass
        consumers = {c.name for c in await plane.js.consumers_info(names.SHARED_STREAM)}
        assert {f"fn_{one.account}_work", f"fn_{two.account}_work"} <= consumers
        assert f"fn_{big.account}_pinned" in consumers

        # Unpinned, the function goes back to its account's stream with what it has queued.
        await big.function("pinned", command=["true"], queueMode="account")
        moved = await big.call("GET", "/v1/functions/pinned", 200)
        assert moved["status"]["queue"] == names.account_stream(big.account)
        task_id = (await big.submit("pinned", 1))["metadata"]["name"]
        assert (await big.wait(task_id))["status"]["phase"] == "Succeeded"

        # Registered again where its account is not listed as small: back to its own stream.
        work = plane.registry.function(one.account, "work")
        assert work is not None
        label = await plane.mover.register(plane.registry, work.model_copy(update={"status": None}))
        assert label == names.account_stream(one.account)
        assert (one.account, "work") not in plane.registry.routes
        task_id = (await one.submit("work", 1))["metadata"]["name"]
        assert (await one.wait(task_id))["status"]["phase"] == "Succeeded"
        for api in (one, two, big):
            await api.http.aclose()


async def test_a_small_accounts_backlog_throttles_that_account_only(
    make_api: Callable[..., Awaitable[Api]],
    settings: Settings,
    tokens_file: Path,
    nats_passwords: dict[str, str],
) -> None:
    tag = os.getpid()
    heavy, calm = await make_api(f"smallheavy-{tag}"), await make_api(f"smallcalm-{tag}")
    limited = dataclasses.replace(
        small(settings, nats_passwords, heavy.account, calm.account), account_max_backlog=20
    )
    async with gateway(limited, tokens_file) as url:
        heavy, calm = client(url, heavy), client(url, calm)
        await heavy.function("held", command=["sleep", "30"], maxConcurrency=1)
        await calm.function("quick", command=["true"])
        (flooded, answers), (neighbour, _) = await asyncio.gather(
            _flood(url, heavy, "held", 60), _flood(url, calm, "quick", 12)
        )
        assert neighbour == {202: 12}, neighbour
        assert flooded[429] > 0 and flooded[202] >= 16, flooded
        refused = next(r.json() for r in answers if r.status_code == 429)
        assert names.SHARED_STREAM in refused["error"] and refused["retryAfter"] >= 1
        limits = await heavy.call("GET", "/v1/limits", 200)
        assert limits["queues"][0]["queue"] == names.SHARED_STREAM
        assert limits["queues"][0]["waiting"] >= 16, limits
        calm_limits = await calm.call("GET", "/v1/limits", 200)
        assert calm_limits["queues"][0]["waiting"] < 16, "counted with its neighbour's backlog"
        page = await heavy.call("GET", "/v1/tasks", 200, params={"limit": 1000})
        for task in page["items"]:
            if task["status"]["phase"] in ("Queued", "Running"):
                await heavy.call("POST", f"/v1/tasks/{task['metadata']['name']}/stop", 200)
        for api in (heavy, calm):
            await api.http.aclose()


async def test_a_crowding_function_leaves_the_shared_stream_and_comes_back_when_idle(
    make_api: Callable[..., Awaitable[Api]],
    settings: Settings,
    tokens_file: Path,
    nats_passwords: dict[str, str],
    plane: DataPlane,
    tmp_path: Path,
) -> None:
    tag = os.getpid()
    crowd, neighbour = await make_api(f"smallcrowd-{tag}"), await make_api(f"smallnext-{tag}")
    gate, record = tmp_path / "gate", tmp_path / "ran"
    shared_settings = small(settings, nats_passwords, crowd.account, neighbour.account)
    async with gateway(shared_settings, tokens_file) as url:
        crowd, neighbour = client(url, crowd), client(url, neighbour)
        argv = [*crowd.script("gated", GATED), str(gate), str(record)]
        await crowd.function("hog", command=argv, maxConcurrency=2)
        await neighbour.function("calm", command=["true"])
        for i in range(2):
            await crowd.submit("hog", i, task_id=f"long-{i}")
        for i in range(2):
            await crowd.wait(f"long-{i}", {"Running"})
        for i in range(2, 302):
            await crowd.submit("hog", i, task_id=f"t-{i}")

        gateway_plane = dataclasses.replace(plane, settings=shared_settings)
        router = Router(gateway_plane, RouteSettings(dedicate_backlog=200, recycle_after=0.5))
        await router.sweep()
        # This gateway follows the assignment through its registry's watch: within a second,
        # longer in a loaded full run (it once read KT_QM straight after the sweep).
        for _ in range(50):
            fn = await crowd.call("GET", "/v1/functions/hog", 200)
            if fn["status"]["queue"] != names.SHARED_STREAM:
                break
            await asyncio.sleep(0.1)
        assert fn["status"]["queue"] == names.dedicated_stream(crowd.account, "hog"), fn
        assert fn["status"]["queueAssignment"]["mode"] == "dedicated"
        assert "KT_QM" in fn["status"]["queueAssignment"]["reason"]
        calm = await neighbour.call("GET", "/v1/functions/calm", 200)
        assert calm["status"]["queue"] == names.SHARED_STREAM  # the neighbour stays

        gate.write_text("open")
        await all_succeed(crowd, "hog", 302)
        assert sorted(Counter(record.read_text().split()).values()) == [1] * 302
        for i in range(2):
            assert (await crowd.get(f"long-{i}"))["status"]["attempts"] == 1

        for _ in range(50):  # idle for longer than recycle_after: back home, to KT_QM
            await router.sweep()
            route = plane.registry.routes.get((crowd.account, "hog"))
            if route is not None and route[0].mode.value == "shared":
                break
            await asyncio.sleep(0.2)
        for _ in range(20):
            fn = await crowd.call("GET", "/v1/functions/hog", 200)
            if fn["status"]["queue"] == names.SHARED_STREAM:
                break
            await asyncio.sleep(0.1)
        assert fn["status"]["queue"] == names.SHARED_STREAM, fn["status"]
        assert fn["status"]["queueAssignment"]["mode"] == "shared"
        await crowd.submit("hog", 0, task_id="after")
        assert (await crowd.wait("after"))["status"]["phase"] == "Succeeded"
        for api in (crowd, neighbour):
            await api.http.aclose()


async def test_a_full_shared_stream_leaves_a_small_accounts_function_in_its_own(
    make_api: Callable[..., Awaitable[Api]], plane: DataPlane
) -> None:
    """The small accounts' stream serves KUBETASK_QUEUE_MAX_FUNCTIONS functions like any other;
    once it has that many, a small account's new function starts in its account's stream
    rather than being refused."""
    api = await make_api(f"smallfull-{os.getpid()}")
    await api.function("pinned", command=["true"], queueMode="shared")  # KT_QM holds one at least
    full = dataclasses.replace(
        plane.settings, small_accounts=frozenset({api.account}), queue_max_functions=1
    )
    fn = TaskFunction(
        metadata=ObjectMeta(name="late", namespace=api.account),
        spec=TaskFunctionSpec(command=["true"]),
    )
    assert await Mover(plane.js, full).register(plane.registry, fn) == names.account_stream(
        api.account
    )
    assert (api.account, "late") not in plane.registry.routes
    task_id = (await api.submit("late"))["metadata"]["name"]
    assert (await api.wait(task_id))["status"]["phase"] == "Succeeded"
