""" "Why is my task waiting?": a waiting task read from the API says where it waits, about how
many are ahead of it, and why."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from harness import SLOW_SERVER, Api, exited, parent_of, pids_running, running_dev
from kubetask.dispatch.dispatcher import Dispatcher
from kubetask.fairness import Fairness, FairnessSettings
from kubetask.gateway.queue_looks import FRESH_FOR, LOOKS_BURST
from kubetask.plane import DataPlane
from nats.aio.msg import Msg


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
        said = f"held back by dispatcher {dispatcher.id}: account {busy.account!r} has 1 recently "
        assert said + "started attempt in flight there, its fair share" in waiting["reason"], (
            waiting
        )
    finally:
        dispatcher.fairness = saved
        for api, ids in ((busy, ["b-0", "b-1", "b-2"]), (other, ["other-0"])):
            for task_id in ids:
                await api.call("POST", f"/v1/tasks/{task_id}/stop")


async def test_a_task_held_by_the_dispatch_window_says_so(api: Api, dispatcher: Dispatcher) -> None:
    """A warm instance's window starts at KUBETASK_AIMD_START (8) and grows only as its answers
    come: with eight long requests in flight, the ninth of a function allowed twenty waits for
    the window."""
    server = {"command": api.script("slow", SLOW_SERVER), "concurrency": 20, "maxInstances": 1}
    await api.function("wide", server=server, maxConcurrency=20)
    ids = [f"wide-{i}" for i in range(10)]
    for task_id in ids:
        await api.submit("wide", 30, task_id=task_id)
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            phases = [(await api.get(t))["status"]["phase"] for t in ids]
            if phases.count("Running") == 8:
                break
            assert asyncio.get_running_loop().time() < deadline, phases
            await asyncio.sleep(0.1)
        queued = ids[phases.index("Queued")]
        # Reads share a look at the queue for 0.5 s (`queue_looks.py`): one taken while the
        # eighth was starting says 7 or fewer run.
        deadline = asyncio.get_running_loop().time() + 5
        while "8 of at most 20 run now" not in (
            reason := (await api.get(queued))["status"]["waiting"]["reason"]
        ):
            assert asyncio.get_running_loop().time() < deadline, reason
            await asyncio.sleep(0.2)
        assert f"dispatcher {dispatcher.id}: its dispatch window" in reason, reason
        assert "(8 running of 8;" in reason, reason
    finally:
        for task_id in ids:
            await api.call("POST", f"/v1/tasks/{task_id}/stop")


FUNCTIONS = """
apiVersion: kubetask.io/v1alpha1
kind: TaskFunction
metadata: {name: long}
spec: {command: ["sleep", "60"], maxConcurrency: 10}
"""


async def test_a_task_says_when_the_node_or_no_dispatcher_holds_it(tmp_path: Path) -> None:
    """Under `kubetask dev` with two attempt slots: the third task waits for a slot, then for a
    dispatcher that is stopped (SIGSTOP: it still listens, but does not answer), then for one
    that is gone (killed while `kubetask dev` was stopped, so not restarted yet)."""
    async with running_dev(tmp_path, FUNCTIONS, env={"KUBETASK_NODE_SLOTS": "2"}) as d:
        async with d.http(timeout=10) as http:

            async def reason(task_id: str) -> str:
                said: str = (await http.get(f"/v1/tasks/{task_id}")).json()["status"]["waiting"][
                    "reason"
                ]
                return said

            for i in range(3):
                resp = await http.post("/v1/tasks", json={"function": "long", "id": f"n-{i}"})
                assert resp.status_code == 202, resp.text
            deadline = time.monotonic() + 30
            while (await http.get("/v1/tasks/n-1")).json()["status"]["phase"] != "Running":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            said = await reason("n-2")
            assert "of at most 10 run now" in said, said
            assert "all 2 of its attempt slots are taken (KUBETASK_NODE_SLOTS)" in said, said

            [dispatcher] = [
                p for p in pids_running(b"\0dispatcher\0") if parent_of(p) == d.proc.pid
            ]
            await asyncio.sleep(FRESH_FOR)  # the reads above share a look until then
            os.kill(dispatcher, signal.SIGSTOP)
            try:
                said = await reason("n-2")
            finally:
                os.kill(dispatcher, signal.SIGCONT)
            assert "no dispatcher answered within 0.5 s" in said, said

            os.kill(d.proc.pid, signal.SIGSTOP)
            try:
                os.kill(dispatcher, signal.SIGKILL)
                while not exited(dispatcher):
                    await asyncio.sleep(0.01)
                await asyncio.sleep(FRESH_FOR)
                said = await reason("n-2")
            finally:
                os.kill(d.proc.pid, signal.SIGCONT)
            assert "no dispatcher is running to take it" in said, said


async def test_reads_of_waiting_tasks_share_the_dispatchers_answers(
    api: Api, plane: DataPlane
) -> None:
    """However often a tenant reads its waiting tasks, each queue is put to the dispatchers at
    most once per FRESH_FOR, and an account's looks at many queues are bounded too: the
    questions are counted on the wire (an admin subscription to the subject)."""
    asked: list[str] = []

    async def note(msg: Msg) -> None:
        asked.append(msg.subject)

    sub = await plane.nc.subscribe(f"kt.holds.{api.account}.>", cb=note)
    # More queues than a burst, read at once below: read one after another, a loaded machine
    # took long enough over them for the allowance to refill, and the last was asked after all.
    fns = [f"one-{i}" for i in range(int(LOOKS_BURST) + 10)]
    try:
        for fn in fns:  # one start a minute: the first task runs, the second waits below
            await api.function(fn, command=["true"], maxStartsPerSecond=1 / 60)
            await api.submit(fn, task_id=f"{fn}-run")
            await api.submit(fn, task_id=f"{fn}-wait")
        await api.wait(f"{fns[-1]}-run")
        await asyncio.sleep(FRESH_FOR)
        asked.clear()
        reads = await asyncio.gather(*(api.get(f"{fns[0]}-wait") for _ in range(40)))
        await plane.nc.flush()
        assert len(asked) == 1, asked  # forty reads, one question
        assert all(r["status"]["waiting"] == reads[0]["status"]["waiting"] for r in reads)
        assert (
            "maxStartsPerSecond allows no more starts" in reads[0]["status"]["waiting"]["reason"]
        ), reads[0]
        said = [
            r["status"]["waiting"]["reason"]
            for r in await asyncio.gather(*(api.get(f"{fn}-wait") for fn in fns[1:]))
        ]
        await plane.nc.flush()
        assert len(asked) < len(fns), asked
        held = [s for s in said if "dispatchers not asked: its account asked too often" in s]
        assert len(held) == len(fns) - len(asked), said
    finally:
        await sub.unsubscribe()
        for fn in fns:
            await api.call("POST", f"/v1/tasks/{fn}-wait/stop")


PARTITIONED = """
apiVersion: kubetask.io/v1alpha1
kind: TaskFunction
metadata: {name: split}
spec: {command: ["true"], partitions: 2}
"""


async def test_a_task_in_a_partition_whose_dispatcher_is_stopped_says_so(tmp_path: Path) -> None:
    """Two dispatchers, one partition each; one is stopped (SIGSTOP), so its lease stands until
    it expires: that partition's tasks wait, and their reason says no dispatcher that answered
    holds the partition, and that one did not answer."""
    async with running_dev(tmp_path, PARTITIONED, "--dispatchers", "2") as d:
        async with d.http(timeout=10) as http:
            # Both hold their partition once each has run a task.
            deadline = time.monotonic() + 30
            ran: set[str] = set()
            while len(ran) < 2:
                assert time.monotonic() < deadline, ran
                resp = await http.post("/v1/tasks", json={"function": "split"})
                task_id = resp.json()["metadata"]["name"]
                while (task := (await http.get(f"/v1/tasks/{task_id}")).json())["status"][
                    "phase"
                ] != "Succeeded":
                    await asyncio.sleep(0.05)
                ran.add(task["status"]["executor"]["dispatcher"])
            mine = [p for p in pids_running(b"\0dispatcher\0") if parent_of(p) == d.proc.pid]
            stopped = mine[0]
            os.kill(stopped, signal.SIGSTOP)
            try:
                ids = []
                for _ in range(8):
                    resp = await http.post("/v1/tasks", json={"function": "split"})
                    ids.append(resp.json()["metadata"]["name"])
                await asyncio.sleep(2)
                waiting = [
                    t["status"]["waiting"]
                    for t in [(await http.get(f"/v1/tasks/{i}")).json() for i in ids]
                    if t["status"]["phase"] == "Queued"
                ]
            finally:
                os.kill(stopped, signal.SIGCONT)
    assert waiting, "every task ran: none went to the stopped dispatcher's partition"
    said = waiting[0]["reason"]
    assert waiting[0]["partition"] is not None, waiting[0]
    assert f"holds partition {waiting[0]['partition']}'s lease yet" in said, said
    assert "(1 of 2 dispatchers did not answer within 0.5 s)" in said, said
