""" "Why is my task waiting?": a waiting task read from the API says where it waits, about how
many are ahead of it, and why."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from harness import Api
from kubetask.dispatch.dispatcher import Dispatcher
from kubetask.fairness import Fairness, FairnessSettings


async def test_a_waiting_task_says_why(api: Api) -> None:
    await api.function("one", command=["sleep", "30"], maxConcurrency=1)
    for i in range(4):
        await api.submit("one", task_id=f"w-{i}")
    await api.wait("w-0", {"Running"})
    running = await api.get("w-0")
    assert running["status"]["waiting"] is None
    third = (await api.get("w-3"))["status"]["waiting"]
    assert third["queue"] == f"KT_Q_{api.account}"
    assert third["position"] == 3, third
    assert "maxConcurrency (1 of 1 running)" in third["reason"], third
    await api.call("POST", "/v1/tasks/w-1/pause", 200)
    paused = (await api.get("w-1"))["status"]["waiting"]
    assert paused["position"] is None and "paused" in paused["reason"], paused
    assert (await api.get("w-3"))["status"]["waiting"]["position"] == 2
    listed = await api.call("GET", "/v1/tasks", 200)
    assert all(t["status"]["waiting"] is None for t in listed["items"])  # only a single read
    for i in range(4):
        await api.call("POST", f"/v1/tasks/w-{i}/stop", 200)


async def test_a_task_held_below_max_concurrency_says_by_what(
    make_api: Callable[..., Awaitable[Api]], dispatcher: Dispatcher
) -> None:
    busy, other = await make_api(), await make_api()
    saved = dispatcher.fairness
    dispatcher.fairness = Fairness(FairnessSettings(slots=2))  # one each while both have work
    try:
        await other.function("long", command=["sleep", "30"])
        await other.submit("long", task_id="other-0")
        await other.wait("other-0", {"Running"})
        await busy.function("four", command=["sleep", "30"], maxConcurrency=4)
        for i in range(3):
            await busy.submit("four", task_id=f"b-{i}")
        await busy.wait("b-0", {"Running"})
        waiting = (await busy.get("b-2"))["status"]["waiting"]
        assert waiting["position"] == 2, waiting
        assert "1 of at most 4 run now" in waiting["reason"], waiting
        assert "fair share" in waiting["reason"], waiting
    finally:
        dispatcher.fairness = saved
        for api, ids in ((busy, ["b-0", "b-1", "b-2"]), (other, ["other-0"])):
            for task_id in ids:
                await api.call("POST", f"/v1/tasks/{task_id}/stop")
