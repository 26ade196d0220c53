"""The AIMD dispatch window: grows under backlog, shrinks on sustained busy answers but not on a
single isolated one, falls back when idle; and end to end, an executor that answers 429 beyond
its real capacity gets every task done with no attempt spent on a busy answer."""

from __future__ import annotations

import asyncio

from harness import Api, warm_server
from kubetask.dispatch.aimd import AimdSettings, Window
from prometheus_client import REGISTRY

SETTINGS = AimdSettings(
    start=8, increase=1.0, decrease=0.5, period=1.0, busy_rate=0.03, busy_count=3, idle_periods=3
)


def _period(window: Window, now: float, ok: int, busy: int, inflight: int) -> float:
    """One period of traffic, the window full; returns the next period's clock."""
    window.judge(inflight, now)
    for _ in range(busy):
        window.done(True)
    for _ in range(ok):
        window.done(False)
    now += SETTINGS.period
    window.judge(inflight, now)
    return now


def test_the_window_grows_under_backlog_and_halves_on_sustained_pushback() -> None:
    window = Window(limit=200, settings=SETTINGS)
    assert window.allowed() == 8
    now = _period(window, 0.0, ok=40, busy=0, inflight=8)
    grown = window.allowed()
    assert grown > 40, grown  # one per completed task while below the threshold
    now = _period(window, now, ok=20, busy=10, inflight=grown)
    assert window.allowed() == grown // 2
    # Past the threshold, growth is additive: about one per window's worth of tasks.
    before = window.size
    now = _period(window, now, ok=int(before), busy=0, inflight=window.allowed())
    assert before < window.size <= before + 1.5


def test_one_isolated_busy_answer_does_not_shrink_the_window() -> None:
    window = Window(limit=50, settings=SETTINGS)
    now = _period(window, 0.0, ok=30, busy=0, inflight=8)
    size = window.allowed()
    _period(window, now, ok=200, busy=1, inflight=size)  # count under 3
    assert window.allowed() >= size
    sparse = Window(limit=50, settings=SETTINGS)
    sparse.judge(8, 0.0)
    for _ in range(3):  # three busy answers, but under 3% of what was answered
        for _ in range(100):
            sparse.done(False, 0.1)
        sparse.done(True, 0.1)
    sparse.judge(8, 1.0)
    assert sparse.allowed() >= 8


def test_the_window_halves_once_both_thresholds_are_crossed_not_at_the_period_end() -> None:
    window = Window(limit=100, settings=SETTINGS)
    now = _period(window, 0.0, ok=40, busy=0, inflight=8)
    window.judge(window.allowed(), now)
    for _ in range(20):
        window.done(False, now + 0.1)
    grown = window.allowed()
    window.done(True, now + 0.1)
    window.done(True, now + 0.1)
    assert window.allowed() == grown  # two busy: under the count
    window.done(True, now + 0.1)
    assert window.allowed() == grown // 2  # the third crosses both, mid-period
    for _ in range(10):  # answers to what was sent before the decrease
        window.done(True, now + 0.2)
    assert window.allowed() == grown // 2


def test_an_idle_window_falls_back_to_its_start() -> None:
    window = Window(limit=100, settings=SETTINGS)
    now = _period(window, 0.0, ok=60, busy=0, inflight=8)
    assert window.allowed() > 8
    for _ in range(12):
        window.judge(0, now)
        now += SETTINGS.period
    assert window.allowed() == 8


def test_a_window_idle_for_long_falls_back_however_rarely_it_is_asked() -> None:
    """A dozing worker may ask once after minutes: the idle time counts, not the calls."""
    window = Window(limit=100, settings=SETTINGS)
    now = 0.0
    for _ in range(8):  # grown well past its start
        now = _period(window, now, ok=200, busy=0, inflight=window.allowed())
    assert window.allowed() >= 64
    window.judge(0, now + 2 * SETTINGS.period)  # idle for less than idle_periods
    assert window.allowed() >= 64
    window.judge(0, now + 600 * SETTINGS.period)  # then asked once, ten minutes later
    assert window.allowed() == SETTINGS.start


PICKY_SERVER = warm_server(
    """
    self.rfile.read(int(self.headers["Content-Length"]))
    if not busy.acquire(blocking=False):
        self.send_response(429)
        self.send_header("Content-Length", "4")
        self.end_headers()
        self.wfile.write(b"busy")
        return
    try:
        time.sleep(0.05)
    finally:
        busy.release()
    self.send_response(200)
    self.send_header("Content-Length", "2")
    self.end_headers()
    self.wfile.write(b"{}")
    """,
    head="""
    import json, os, threading, time
    busy = threading.Semaphore(2)  # what this server can really take at once
    """,
)


async def test_busy_answers_spend_no_attempt_and_shrink_the_window(api: Api) -> None:
    server = {"command": api.script("picky", PICKY_SERVER), "concurrency": 16, "maxInstances": 1}
    await api.function("picky", server=server, maxConcurrency=16)
    await api.async_config("picky", function="picky", maxAsyncRetryAttempts=0)
    labels = {"account": api.account, "function": "picky"}
    ids = [(await api.submit("picky", i))["metadata"]["name"] for i in range(40)]
    for task_id in ids:
        done = await api.wait(task_id, timeout=60)
        assert done["status"]["phase"] == "Succeeded", done["status"]
        assert done["status"]["attempts"] == 1, done["status"]
    busy = REGISTRY.get_sample_value("kubetask_executor_busy_total", labels) or 0
    assert busy > 0, "the server never pushed back: the test proves nothing"
    await asyncio.sleep(0)
    window = REGISTRY.get_sample_value("kubetask_dispatch_window", labels)
    assert window is not None and window < 16, window


async def test_a_command_functions_long_tasks_run_up_to_its_max_concurrency_at_once(
    api: Api,
) -> None:
    """Only a warm instance can answer busy; a command's process cannot. The window grew only as
    tasks ended, so a command function allowed twenty ran eight thirty-second tasks at once and
    the other twelve waited for them: its window now is its maxConcurrency."""
    await api.function("long", command=["sleep", "30"], maxConcurrency=20)
    ids = [(await api.submit("long"))["metadata"]["name"] for _ in range(20)]
    try:
        for task_id in ids:
            await api.wait(task_id, {"Running"}, timeout=15)
    finally:
        for task_id in ids:
            await api.call("POST", f"/v1/tasks/{task_id}/stop")
