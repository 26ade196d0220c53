"""Warm instances are bounded per node: with room for two, a third function's first task stops
the instance idle the longest (never one serving a task), and when every instance is busy it
waits until one is free — real instance processes throughout."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path

from kubetask.executors.base import Invocation
from kubetask.executors.function_users import FunctionUsers
from kubetask.executors.server import ServerExecutor
from kubetask.models import ObjectMeta, ServerSpec, TaskFunction, TaskFunctionSpec

SERVER = """
import json, os, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _reply(self, body):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._reply(b"{}")

    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        while payload.get("hold") and not os.path.exists(payload["hold"]):
            time.sleep(0.02)
        self._reply(str(os.getpid()).encode())

ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""


def _fn(name: str, script: Path) -> TaskFunction:
    return TaskFunction(
        metadata=ObjectMeta(name=name, namespace="inst"),
        spec=TaskFunctionSpec(server=ServerSpec(command=[sys.executable, str(script)])),
    )


def _inv(fn: TaskFunction, payload: object) -> Invocation:
    return Invocation("inst", f"t-{id(payload)}", 1, fn, payload, 30, 1 << 16, lambda *_: None)


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


async def test_a_full_node_stops_the_longest_idle_instance_and_waits_when_all_are_busy(
    tmp_path: Path,
) -> None:
    script = tmp_path / "server.py"
    script.write_text(textwrap.dedent(SERVER))
    a, b, c = (_fn(n, script) for n in "abc")
    executor = ServerExecutor(max_instances=2, users=FunctionUsers("platform"))
    try:

        async def run(fn: TaskFunction, payload: object) -> int:
            execution = await executor.start(_inv(fn, payload))
            outcome = await execution.wait()
            assert outcome.ok, outcome
            return int(outcome.result)

        pid_a = await run(a, {})
        pid_b = await run(b, {})
        pid_c = await run(c, {})  # no room: a's instance, idle the longest, is stopped
        assert not _alive(pid_a) and _alive(pid_b) and _alive(pid_c)
        assert sum(p.started() for p in executor._pools.values()) == 2

        gate = tmp_path / "gate"
        busy_b = asyncio.create_task(run(b, {"hold": str(gate)}))
        busy_c = asyncio.create_task(run(c, {"hold": str(gate)}))
        await asyncio.sleep(0.5)
        waiting_a = asyncio.create_task(run(a, {}))
        await asyncio.sleep(1.0)
        assert not waiting_a.done(), "started a third instance on a node with room for two"
        assert _alive(pid_b) and _alive(pid_c), "stopped an instance serving a task"
        gate.write_text("open")
        assert await busy_b == pid_b and await busy_c == pid_c
        pid_a2 = await asyncio.wait_for(waiting_a, 10)
        assert _alive(pid_a2) and [_alive(pid_b), _alive(pid_c)].count(True) == 1
    finally:
        await executor.close()
