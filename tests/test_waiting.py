""" "Why is my task waiting?": a waiting task read from the API says where it waits, about how
many are ahead of it, and why."""

from __future__ import annotations

from harness import Api


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
