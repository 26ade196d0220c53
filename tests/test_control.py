"""Stop, pause, resume and delete, and max concurrency across dispatchers."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from harness import Api, read_lines
from kubetask import actions, submission
from kubetask.models import TaskPhase
from kubetask.plane import DataPlane
from kubetask.states import IllegalTransition
from kubetask.store import TaskRecord, new_token, now


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


async def _pid_from(path: Path, timeout: float = 10) -> int:
    for _ in range(int(timeout / 0.05)):
        lines = read_lines(path)
        if lines:
            return int(lines[0])
        await asyncio.sleep(0.05)
    raise AssertionError("task never started")


async def test_stop_kills_a_running_60s_task_within_2s(api: Api) -> None:
    pidfile = api.workdir / "pid"
    argv = api.script(
        "long",
        f"""
        import os, subprocess, time
        child = subprocess.Popen(["sleep", "60"])
        open({str(pidfile)!r}, "w").write(f"{{os.getpid()}}\\n{{child.pid}}\\n")
        time.sleep(60)
    """,
    )
    await api.function("long", command=argv, timeoutSeconds=120)
    task = await api.submit("long")
    tid = task["metadata"]["name"]
    pid = await _pid_from(pidfile)
    child = int(read_lines(pidfile)[1])
    assert (await api.get(tid))["status"]["phase"] == "Running"
    t0 = asyncio.get_running_loop().time()
    stopping = await api.call("POST", f"/v1/tasks/{tid}/stop", 200)
    assert stopping["status"]["phase"] in ("Stopping", "Stopped")
    done = await api.wait(tid, timeout=5)
    elapsed = asyncio.get_running_loop().time() - t0
    assert done["status"]["phase"] == "Stopped"
    assert elapsed < 2.0, elapsed
    assert not _alive(pid) and not _alive(child)  # the process and its children are gone


async def test_stop_a_queued_task_never_runs_it(api: Api) -> None:
    ran = api.workdir / "ran"
    blocker = api.script(
        "block",
        f"""
        import json, sys, time
        p = json.load(sys.stdin)
        open({str(ran)!r}, "a").write(f"{{p}}\\n")
        time.sleep(1 if p == "first" else 0)
    """,
    )
    await api.function("one", command=blocker, maxConcurrency=1)
    first = await api.submit("one", "first")
    queued = await api.submit("one", "second")
    await api.wait(first["metadata"]["name"], {"Running"})
    stopped = await api.call("POST", f"/v1/tasks/{queued['metadata']['name']}/stop", 200)
    assert stopped["status"]["phase"] == "Stopped"
    await api.wait(first["metadata"]["name"])
    await asyncio.sleep(0.5)
    assert read_lines(ran) == ["first"]


async def test_a_resume_answers_the_task_as_it_is_after_a_quicker_writer(
    api: Api, plane: DataPlane
) -> None:
    """A resume publishes the task's message, then marks it Queued; a dispatcher may claim it
    (or a user stop it) in between. The answer was then the record from before the publish,
    Pending, a phase the task had already left (seen as a flaky `test_pause_then_resume`).
    Here the quicker writer is a stop, made between the two steps for certain."""
    await api.function("held", command=["sleep", "30"], maxConcurrency=1)
    running = (await api.submit("held", 0))["metadata"]["name"]
    task_id = (await api.submit("held", 1))["metadata"]["name"]
    await api.wait(running, {"Running"})
    await api.call("POST", f"/v1/tasks/{task_id}/pause", 200)
    fn = plane.registry.function(api.account, "held")
    assert fn is not None
    paused = await plane.store.get(api.account, task_id)
    assert paused is not None and paused.record.phase is TaskPhase.Paused

    def to_pending(r: TaskRecord) -> TaskRecord:  # resume's first step
        r.task.status.phase = TaskPhase.Pending
        r.token = new_token()
        return r

    pending = await plane.store.transition(api.account, task_id, to_pending, paused)
    await actions.stop(plane, pending)
    answered = await submission.enqueue(plane, fn, pending)
    assert answered.record.phase is TaskPhase.Stopped
    await api.call("POST", f"/v1/tasks/{running}/stop", 200)


async def test_pause_then_resume(api: Api) -> None:
    ran = api.workdir / "ran"
    argv = api.script(
        "pr",
        f"""
        import json, sys, time
        p = json.load(sys.stdin)
        open({str(ran)!r}, "a").write(f"{{p}}\\n")
        time.sleep(1.0 if p == "first" else 0)
        print(json.dumps(p))
    """,
    )
    await api.function("pr", command=argv, maxConcurrency=1)
    first = await api.submit("pr", "first")
    paused_id = (await api.submit("pr", "later"))["metadata"]["name"]
    await api.wait(first["metadata"]["name"], {"Running"})
    paused = await api.call("POST", f"/v1/tasks/{paused_id}/pause", 200)
    assert paused["status"]["phase"] == "Paused"
    await api.wait(first["metadata"]["name"])
    await asyncio.sleep(1.0)
    assert (await api.get(paused_id))["status"]["phase"] == "Paused"
    assert read_lines(ran) == ["first"]  # paused: not run although the function is free
    resumed = await api.call("POST", f"/v1/tasks/{paused_id}/resume", 200)
    assert resumed["status"]["phase"] in ("Queued", "Running", "Succeeded")
    done = await api.wait(paused_id)
    assert done["status"]["phase"] == "Succeeded"
    assert done["status"]["result"] == "later"
    assert read_lines(ran) == ["first", "later"]


async def test_illegal_transitions_answer_409_with_the_phase(api: Api) -> None:
    await api.function("quick", command=["true"])
    tid = (await api.submit("quick"))["metadata"]["name"]
    await api.wait(tid)
    for action in ("resume", "pause", "stop"):
        resp = await api.http.post(f"/v1/tasks/{tid}/{action}")
        assert resp.status_code == 409
        assert resp.json()["error"] == f"cannot {action} the task: the task is Succeeded"
        assert resp.json()["phase"] == "Succeeded"


async def test_delete_removes_a_finished_task_and_refuses_a_running_one(api: Api) -> None:
    await api.function("del", command=["sleep", "2"])
    running = (await api.submit("del"))["metadata"]["name"]
    await api.wait(running, {"Running"})
    resp = await api.http.delete(f"/v1/tasks/{running}")
    assert resp.status_code == 409 and "stop it first" in resp.json()["error"]
    await api.call("POST", f"/v1/tasks/{running}/stop", 200)
    await api.wait(running)
    await api.call("DELETE", f"/v1/tasks/{running}", 204)
    assert (await api.http.get(f"/v1/tasks/{running}")).status_code == 404
    listed = await api.call("GET", "/v1/tasks", 200, params={"idPrefix": running})
    assert listed["items"] == []
    # A deleted task's id may be used again: a new task, which runs.
    await api.function("quick", command=["true"])
    again = await api.submit("quick", task_id=running)
    assert again["metadata"]["name"] == running
    assert (await api.wait(running))["status"]["phase"] == "Succeeded"
    listed = await api.call("GET", "/v1/tasks", 200, params={"idPrefix": running})
    assert [t["spec"]["function"] for t in listed["items"]] == ["quick"]


async def test_a_delete_decides_on_the_task_as_it_is_after_a_quicker_writer(
    api: Api, plane: DataPlane
) -> None:
    """A delete read the task, then deleted it if it had not changed; a resume in between
    lost it the compare-and-set, which was answered 500. Now the task is read again: deleted
    if it may still be, else 409 with its phase. The quicker writers here are made between
    the two steps for certain."""
    await api.function("held", command=["sleep", "30"], maxConcurrency=1)
    running = (await api.submit("held", 0))["metadata"]["name"]
    await api.wait(running, {"Running"})
    task_ids = [(await api.submit("held", i))["metadata"]["name"] for i in (1, 2)]
    read = {}
    for task_id in task_ids:
        await api.call("POST", f"/v1/tasks/{task_id}/pause", 200)
        read[task_id] = await plane.store.get(api.account, task_id)
        await api.call("POST", f"/v1/tasks/{task_id}/resume", 200)
    await api.call("POST", f"/v1/tasks/{task_ids[1]}/pause", 200)
    with pytest.raises(IllegalTransition) as refused:
        await actions.delete(plane, read[task_ids[0]])
    assert refused.value.current is TaskPhase.Queued
    await actions.delete(plane, read[task_ids[1]])  # paused again: deleted
    assert (await api.http.get(f"/v1/tasks/{task_ids[1]}")).status_code == 404
    await api.call("POST", f"/v1/tasks/{running}/stop", 200)
    await api.call("POST", f"/v1/tasks/{task_ids[0]}/stop", 200)


async def test_logs_after_the_fact_and_followed_live(api: Api) -> None:
    argv = api.script(
        "talk",
        """
        import sys, time
        for i in range(3):
            print(f"line {i}", file=sys.stderr, flush=True)
            time.sleep(0.3)
    """,
    )
    await api.function("talk", command=argv)
    tid = (await api.submit("talk"))["metadata"]["name"]
    await api.wait(tid, {"Running"})
    followed = []
    async with api.http.stream("GET", f"/v1/tasks/{tid}/logs", params={"follow": "true"}) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line:
                followed.append(line)
    assert (await api.get(tid))["status"]["phase"] == "Succeeded"
    import json

    records = [json.loads(x) for x in followed]
    assert [r["line"] for r in records if r["stream"] == "stderr"] == ["line 0", "line 1", "line 2"]
    assert records[-1]["final"] is True
    assert records[-1]["line"] == "attempt 1 succeeded; task Succeeded"
    assert records[0]["line"].startswith("attempt 1 started (pid-")
    after = await api.http.get(f"/v1/tasks/{tid}/logs")
    assert [json.loads(x) for x in after.text.splitlines()] == records


async def test_following_the_log_of_a_waiting_task_ends_when_it_is_stopped(api: Api) -> None:
    """A task stopped before it ran is ended by the gateway, which closes its log with the final
    line a dispatcher would write: a follower then ends. (The gateway's NATS user could not
    publish log lines, the line was refused, and `logs -f` waited for an hour.)"""
    import json

    await api.function("one", command=["sleep", "30"], maxConcurrency=1)
    await api.submit("one", task_id="ahead")
    await api.wait("ahead", {"Running"})
    for task_id in ("queued", "paused"):
        await api.submit("one", task_id=task_id)
    await api.call("POST", "/v1/tasks/paused/pause", 200)
    try:
        for task_id in ("queued", "paused"):
            followed: list[str] = []

            async def follow(task_id: str = task_id, into: list[str] = followed) -> None:
                path = f"/v1/tasks/{task_id}/logs"
                async with api.http.stream("GET", path, params={"follow": "true"}) as resp:
                    assert resp.status_code == 200
                    async for line in resp.aiter_lines():
                        if line:
                            into.append(line)

            reading = asyncio.create_task(follow())
            await asyncio.sleep(0.5)  # the follower is waiting for lines
            assert not reading.done()
            await api.call("POST", f"/v1/tasks/{task_id}/stop", 200)
            await asyncio.wait_for(reading, 10)
            [last] = [json.loads(x) for x in followed]
            assert last["final"] is True and last["line"] == "task Stopped", last
    finally:
        await api.call("POST", "/v1/tasks/ahead/stop")


async def test_a_follower_ends_when_its_task_ended_without_a_final_line(
    api: Api, plane: DataPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A final line can be lost (a writer refused by nats-server, as the gateway's were, or a
    history quota); a follower that hears nothing for a while then asks the record, and ends
    once its task has been over long enough. The loss is made here by ending a queued task
    through the store directly, with no line, as such a writer would have."""
    from datetime import timedelta

    from kubetask import logs
    from kubetask.gateway import app

    monkeypatch.setattr(logs, "ENDED_CHECK", 0.5)
    monkeypatch.setattr(app, "FINAL_LINE_SETTLES", timedelta(seconds=0.2))
    await api.function("one", command=["sleep", "30"], maxConcurrency=1)
    await api.submit("one", task_id="ahead")
    await api.wait("ahead", {"Running"})
    await api.submit("one", task_id="lost")
    followed: list[str] = []

    async def follow() -> None:
        async with api.http.stream("GET", "/v1/tasks/lost/logs", params={"follow": "true"}) as r:
            followed.extend([line async for line in r.aiter_lines() if line])

    try:
        reading = asyncio.create_task(follow())
        await asyncio.sleep(1)
        assert not reading.done()  # the task waits: its log is followed

        def stopped(r: TaskRecord) -> TaskRecord:
            r.task.status.phase = TaskPhase.Stopped
            r.task.status.timestamps.finished = now()
            return r

        await plane.store.transition(api.account, "lost", stopped)
        await asyncio.wait_for(reading, 10)
        assert followed == []
    finally:
        await api.call("POST", "/v1/tasks/ahead/stop")


async def test_a_quick_attempt_is_told_in_one_line_a_slow_one_is_announced(api: Api) -> None:
    import json

    await api.function("quick", command=["true"])
    await api.function("slow", command=["sleep", "0.6"])
    quick = (await api.submit("quick"))["metadata"]["name"]
    slow = (await api.submit("slow"))["metadata"]["name"]
    for tid in (quick, slow):
        await api.wait(tid)
    lines = {}
    for tid in (quick, slow):
        text = (await api.http.get(f"/v1/tasks/{tid}/logs")).text
        lines[tid] = [json.loads(x)["line"] for x in text.splitlines()]
    [only] = lines[quick]
    assert only.startswith("attempt 1 (pid-") and only.endswith(") succeeded; task Succeeded")
    started, final = lines[slow]
    assert started.startswith("attempt 1 started (pid-")
    assert final == "attempt 1 succeeded; task Succeeded"


async def test_max_concurrency_one_holds_under_50_concurrent_submissions_across_two_dispatchers(
    api: Api, settings: object
) -> None:
    from kubetask.dispatch.dispatcher import Dispatcher
    from kubetask.plane import DataPlane

    journal = api.workdir / "journal"
    argv = api.script(
        "serial",
        f"""
        import os, time
        with open({str(journal)!r}, "a") as f:
            f.write(f"start {{time.monotonic_ns()}}\\n")
        time.sleep(0.02)
        with open({str(journal)!r}, "a") as f:
            f.write(f"end {{time.monotonic_ns()}}\\n")
    """,
    )
    second = Dispatcher(await DataPlane.connect(settings, "second-dispatcher"))  # type: ignore[arg-type]
    await second.start()
    try:
        await api.function("serial", command=argv, maxConcurrency=1)
        tasks = await asyncio.gather(*(api.submit("serial", i) for i in range(50)))
        done = await asyncio.gather(*(api.wait(t["metadata"]["name"], timeout=90) for t in tasks))
        assert {d["status"]["phase"] for d in done} == {"Succeeded"}
        running = peak = 0
        events = sorted((int(ts), kind) for kind, ts in (x.split() for x in read_lines(journal)))
        for _, kind in events:
            running += 1 if kind == "start" else -1
            peak = max(peak, running)
        assert len(events) == 100
        assert peak == 1
        dispatchers = {d["status"]["executor"]["dispatcher"] for d in done}
        assert len(dispatchers) == 2  # both dispatchers took part, and still one at a time
    finally:
        await second.close(drain_timeout=2)
        await second.plane.close()
