"""The platform's queue assignment (`queue_routes.py`): an `auto` function whose backlog crowds
its account's shared queue is given a queue of its own while tasks wait and run — none lost, none
run twice, none interrupted, no attempt spent — and is taken back once idle, the same way. The
assignment and its reason are visible; a function pinned to a queue is never moved."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from harness import Api, all_succeed, kt, read_lines, warm_server
from kubetask import names
from kubetask.models import QueueAssignment, QueueMode
from kubetask.plane import DataPlane
from kubetask.queue_routes import Router, RouteSettings
from kubetask.store import now
from nats.js.errors import NotFoundError
from prometheus_client import REGISTRY

# Answers each invocation after `seconds` (its payload's "s"), noting its payload's "n" in a file
# first, so a task run twice shows up twice.
RECORDING_SERVER = warm_server(
    """
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    with open(sys.argv[1], "a") as f:
        f.write(f"{body['n']}\\n")
    time.sleep(body["s"])
    self.send_response(200)
    self.send_header("Content-Length", "2")
    self.end_headers()
    self.wfile.write(b"{}")
    """,
    head="import json, os, sys, time",
)


async def _gone(probe: Callable[[], Awaitable[Any]]) -> bool:
    for _ in range(100):
        try:
            await probe()
        except NotFoundError:
            return True
        await asyncio.sleep(0.1)
    return False


async def test_a_crowding_function_gets_its_own_queue_and_gives_it_back_when_idle(
    api: Api, plane: DataPlane, tmp_path: Path, gateway_url: str
) -> None:
    ran = tmp_path / "ran"
    server = {
        "command": [*api.script("recording", RECORDING_SERVER), str(ran)],
        "maxInstances": 1,
        "concurrency": 8,
    }
    await api.function("hog", server=server, maxConcurrency=4)
    await api.function("calm", command=["true"])  # a neighbour in the account's queue
    for i in range(4):
        await api.submit("hog", {"n": i, "s": 8.0}, task_id=f"long-{i}")
    for i in range(4):
        await api.wait(f"long-{i}", {"Running"})
    for i in range(4, 1004):
        await api.submit("hog", {"n": i, "s": 0})
    router = Router(plane, RouteSettings(dedicate_backlog=500, recycle_after=0.5, period=1))
    await router.sweep()
    running = [(await api.get(f"long-{i}"))["status"]["phase"] for i in range(4)]
    assert running == ["Running"] * 4, "the move is meant to happen while tasks run"

    fn = await api.call("GET", "/v1/functions/hog", 200)
    assert fn["spec"]["queueMode"] == "auto"
    assert fn["status"]["queue"] == names.dedicated_stream(api.account, "hog")
    assignment = fn["status"]["queueAssignment"]
    assert assignment["mode"] == "dedicated", assignment
    waited = re.match(r"(\d+) tasks waiting in the shared queue", assignment["reason"])
    assert waited and int(waited[1]) >= 500, assignment
    labels = {"account": api.account, "function": "hog"}
    assert REGISTRY.get_sample_value("kubetask_queue_dedicated", labels) == 1
    listing = (await kt(api, gateway_url, "functions", "list")).stdout
    hog = next(line.split() for line in listing.splitlines() if line.startswith("hog "))
    assert hog[4:7] == [names.dedicated_stream(api.account, "hog"), "auto:", "dedicated"], hog
    assert f"{api.account}/hog: dedicated queue since" in listing
    for i in range(1004, 1104):  # new submissions go to the new queue
        await api.submit("hog", {"n": i, "s": 0})
    await all_succeed(api, "hog", 1104)
    for i in range(4):
        long = await api.get(f"long-{i}")
        assert long["status"]["attempts"] == 1, "the running attempt was not interrupted"
    assert sorted(Counter(read_lines(ran)).values()) == [1] * 1104, "a task ran twice"
    # The old consumer went once drained; the account's stream stays for its neighbour.
    account_stream = names.account_stream(api.account)
    assert await _gone(lambda: plane.js.consumer_info(account_stream, "fn_hog"))
    await api.submit("calm", task_id="neighbour")
    assert (await api.wait("neighbour"))["status"]["phase"] == "Succeeded"

    # Idle for longer than recycle_after: back to the account's queue, the same way.
    # (the last acks may still be on their way: the queue must be seen empty for 0.5 s)
    for _ in range(50):
        await router.sweep()
        if plane.registry.routes.get((api.account, "hog")) is None:
            break
        await asyncio.sleep(0.2)
    for i in range(1104, 1154):  # submitted while the move back goes on
        await api.submit("hog", {"n": i, "s": 0})
    for _ in range(20):  # the gateway follows the assignment within a second
        fn = await api.call("GET", "/v1/functions/hog", 200)
        if fn["status"]["queue"] == account_stream:
            break
        await asyncio.sleep(0.1)
    assert fn["status"]["queue"] == account_stream and fn["status"]["queueAssignment"] is None
    assert REGISTRY.get_sample_value("kubetask_queue_dedicated", labels) == 0
    await all_succeed(api, "hog", 1154)
    assert sorted(Counter(read_lines(ran)).values()) == [1] * 1154, "a task ran twice"
    assert await _gone(lambda: plane.js.stream_info(names.dedicated_stream(api.account, "hog")))


async def test_a_function_alone_in_its_account_or_pinned_to_a_queue_stays(
    make_api: Callable[..., Awaitable[Api]], plane: DataPlane
) -> None:
    solo, shared = await make_api(), await make_api()
    slow = {"command": ["sleep", "0.1"], "maxConcurrency": 1}
    await solo.function("solo", **slow)
    await shared.function("pinned", **slow, queueMode="account")
    await shared.function("other", command=["true"])
    for _ in range(20):
        await solo.submit("solo")
        await shared.submit("pinned")
    await Router(plane, RouteSettings(dedicate_backlog=5, recycle_after=0.1)).sweep()
    for api, name in ((solo, "solo"), (shared, "pinned"), (shared, "other")):
        fn = plane.registry.function(api.account, name)
        assert fn is not None and names.queue_mode(fn) is QueueMode.account, name
    await all_succeed(solo, "solo", 20)
    await all_succeed(shared, "pinned", 20)


async def test_an_account_without_room_for_a_queue_of_its_own_keeps_a_crowding_function_shared(
    api: Api, plane: DataPlane
) -> None:
    """A dedicated queue is a stream in the nats-server every account shares: the platform does
    not give an account more of them than its quota (KUBETASK_ACCOUNT_MAX_OWN_QUEUES)."""
    await api.function("crowd", command=["sleep", "0.05"], maxConcurrency=1)
    await api.function("calm", command=["true"])
    for _ in range(20):
        await api.submit("crowd")
    sweep = RouteSettings(dedicate_backlog=5, recycle_after=60)
    full = dataclasses.replace(plane.settings, account_max_own_queues=0)
    settings, plane.settings = plane.settings, full
    try:
        await Router(plane, sweep).sweep()
    finally:
        plane.settings = settings
    await plane.registry.caught_up()  # an assignment, had there been one, is seen
    crowd = plane.registry.function(api.account, "crowd")
    assert crowd is not None and names.queue_mode(crowd) is QueueMode.account
    await Router(plane, sweep).sweep()  # with room, the same sweep gives it one
    await plane.registry.caught_up()
    crowd = plane.registry.function(api.account, "crowd")
    assert crowd is not None and names.queue_mode(crowd) is QueueMode.dedicated
    await all_succeed(api, "crowd", 20)


async def test_a_route_written_just_before_its_function_is_not_taken_for_stale(
    api: Api, plane: DataPlane
) -> None:
    """A small account's function gets its shared assignment written just before the function
    itself. A sweep by another gateway in between took the route for a stale one and removed
    it, and the function ran on its account's stream (seen once in a full run of the suite)."""
    since = now()
    coming = QueueAssignment(mode=QueueMode.shared, reason="registering", since=since)
    gone = QueueAssignment(mode=QueueMode.shared, reason="left", since=since - timedelta(hours=1))
    assert await plane.registry.assign_queue(api.account, "coming", coming)
    assert await plane.registry.assign_queue(api.account, "gone", gone)
    await plane.registry.caught_up()
    try:
        await Router(plane, RouteSettings()).sweep()
        await plane.registry.caught_up()
        assert (api.account, "coming") in plane.registry.routes
        assert (api.account, "gone") not in plane.registry.routes
    finally:
        await plane.registry.delete_function(api.account, "coming")
