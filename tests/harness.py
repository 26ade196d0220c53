"""Helpers the tests share: one account's view of the API and small file utilities."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web
from kubetask.embedded import free_port
from kubetask.gateway.app import create_app
from kubetask.gateway.server import Server, config
from kubetask.settings import Settings

PY = sys.executable


def python_as(uid: int, script: str, *args: str) -> list[str]:
    """The argv that runs `script` in this Python as user `uid` (group `uid`, no others)."""
    become = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    return [*become, PY, "-I", "-c", script, *args]


TERMINAL = {"Succeeded", "Failed", "Expired", "Stopped"}
# The tests' dispatcher may send no webhook here (`conftest.settings`).
DENIED_WEBHOOK_HOST = "127.0.0.2"
# What the tests' gateway takes for Prometheus' token (`conftest.settings`).
METRICS_TOKEN = "scrape-secret"
# Log reads one account may have open at once in the tests' gateway.
LOG_STREAMS = 4
# How long a request may take to reach the tests' gateway whole.
REQUEST_TIMEOUT = 3.0
# Output one attempt may log in the tests' dispatcher: characters a second, and at once.
LOG_RATE = 128 * 1024
LOG_BURST = 512 * 1024
# What all tasks' logs may take on the tests' nats-server's disk.
LOGS_MAX_BYTES = 8 << 20


@dataclass
class Api:
    """One account's view of the API, plus helpers to wait on tasks."""

    http: httpx.AsyncClient
    account: str
    token: str
    workdir: Path

    async def call(self, method: str, path: str, expect: int | None = None, **kw: Any) -> Any:
        resp = await self.http.request(method, path, **kw)
        if expect is not None:
            assert resp.status_code == expect, f"{method} {path}: {resp.status_code} {resp.text}"
        if resp.status_code == 204 or not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            return resp.text

    async def function(self, name: str, expect: int = 200, **spec: Any) -> Any:
        body = {
            "apiVersion": "kubetask.io/v1alpha1",
            "kind": "TaskFunction",
            "metadata": {"name": name, "namespace": self.account},
            "spec": spec,
        }
        return await self.call("PUT", f"/v1/functions/{name}", expect, json=body)

    async def async_config(self, name: str, expect: int = 200, **spec: Any) -> Any:
        body = {
            "apiVersion": "kubetask.io/v1alpha1",
            "kind": "AsyncConfig",
            "metadata": {"name": name, "namespace": self.account},
            "spec": spec,
        }
        return await self.call("PUT", f"/v1/asyncconfigs/{name}", expect, json=body)

    async def submit(
        self,
        function: str,
        payload: Any = None,
        task_id: str | None = None,
        expect: int | None = 202,
    ) -> Any:
        body: dict[str, Any] = {"function": function, "payload": payload}
        if task_id is not None:
            body["id"] = task_id
        return await self.call("POST", "/v1/tasks", expect, json=body)

    async def get(self, task_id: str) -> Any:
        return await self.call("GET", f"/v1/tasks/{task_id}", 200)

    async def wait(self, task_id: str, phases: set[str] = TERMINAL, timeout: float = 30) -> Any:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            task = await self.get(task_id)
            if task["status"]["phase"] in phases:
                return task
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"task {task_id} stuck in {task['status']['phase']}")
            await asyncio.sleep(0.05)

    def gated(self, name: str) -> tuple[list[str], Path]:
        """A command that runs until its gate file is written (a task held Running on purpose),
        and that gate."""
        gate = self.workdir / f"{name}-gate"
        body = f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n    time.sleep(0.05)\n"
        return self.script(name, body), gate

    def script(self, name: str, body: str) -> list[str]:
        """A Python program for a function's command; returns the argv."""
        path = self.workdir / f"{name}.py"
        path.write_text(textwrap.dedent(body))
        return [PY, str(path)]


def warm_server(post: str, head: str = "import json, os", serving: str = "") -> str:
    """A warm instance's program (for `Api.script`): ready on any GET, `post` the body of its
    `do_POST`, `head` its imports and globals, `serving` what it does before it serves. The
    tests' servers differ in how they answer an invocation and in nothing else."""
    return "\n".join(
        [
            textwrap.dedent(head).strip(),
            "from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer",
            "",
            "class H(BaseHTTPRequestHandler):",
            "    def log_message(self, *a):",
            "        pass",
            "",
            "    def do_GET(self):",
            "        self.send_response(200)",
            "        self.end_headers()",
            "",
            "    def do_POST(self):",
            textwrap.indent(textwrap.dedent(post).strip(), " " * 8),
            "",
            textwrap.dedent(serving).strip(),
            'ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()',
            "",
        ]
    )


# A warm instance answering each invocation after its payload's number of seconds.
SLOW_SERVER = warm_server(
    """
    seconds = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    time.sleep(seconds)
    out = json.dumps({"pid": os.getpid()}).encode()
    self.send_response(200)
    self.send_header("Content-Length", str(len(out)))
    self.end_headers()
    self.wfile.write(out)
    """,
    head="import json, os, time",
)


def read_lines(path: Path) -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return path.read_text().splitlines()
    return []


def echo_script(api: Api) -> list[str]:
    return api.script(
        "echo",
        """
        import json, sys
        payload = json.load(sys.stdin)
        print("echoing", file=sys.stderr)
        print(json.dumps({"echo": payload}))
    """,
    )


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


def as_user(settings: Settings, user: str, passwords: dict[str, str]) -> Settings:
    """The settings a component connecting as `user` has (`nats_auth.env_for`)."""
    extra = {}
    if user == "dispatcher":
        extra = {
            "destinations_user": "destinations",
            "destinations_password": passwords["destinations"],
        }
    return dataclasses.replace(settings, nats_user=user, nats_password=passwords[user], **extra)


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name (state, parent, ...); None once gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def parent_of(pid: int) -> int | None:
    fields = _stat(pid)
    return None if fields is None else int(fields[1])


def exited(pid: int) -> bool:
    """Whether `pid` is gone or a zombie: its descriptors (sockets) are closed either way."""
    fields = _stat(pid)
    return fields is None or fields[0] == "Z"


def pids_running(needle: bytes) -> list[int]:
    """Processes whose command line contains `needle` (from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if needle in cmd:
                pids.append(int(entry.name))
    return pids


async def kt(
    api: Api, url: str, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as the account's user (its options before a `--` and what follows it)."""
    cut = args.index("--") if "--" in args else len(args)
    proc = await asyncio.to_thread(
        subprocess.run,
        [PY, "-m", "kubetask", *args[:cut], "--url", url, "--token", api.token, *args[cut:]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


async def tasks_of(api: Api, function: str | None = None) -> list[dict[str, Any]]:
    """Every task of the account (of one function), through the API's pages."""
    found: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"limit": "1000", **({"function": function} if function else {})}
        if cursor:
            params["cursor"] = cursor
        page = await api.call("GET", "/v1/tasks", 200, params=params)
        found += page["items"]
        cursor = page["cursor"]
        if not cursor:
            return found


async def running(api: Api) -> int:
    """The account's tasks Running now (up to a page of 1,000)."""
    page = await api.call("GET", "/v1/tasks", params={"status": "Running", "limit": "1000"})
    return len(page["items"])


async def all_succeed(api: Api, function: str | None, count: int, timeout: float = 90) -> None:
    """Wait until the account's `count` tasks (of `function`) have Succeeded; each must have
    taken exactly one attempt."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        tasks = await tasks_of(api, function)
        phases = Counter(t["status"]["phase"] for t in tasks)
        if len(tasks) == count and phases["Succeeded"] == count:
            break
        assert asyncio.get_running_loop().time() < deadline, phases
        await asyncio.sleep(0.5)
    assert all(t["status"]["attempts"] == 1 for t in tasks), "a task took more than one attempt"


@contextlib.asynccontextmanager
async def web_server(handler: Any, host: str = "127.0.0.1") -> Any:
    """A real HTTP server answering every POST with `handler`; yields its base URL."""
    app = web.Application()
    app.router.add_post("/{path:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def gateway(settings: Settings, tokens_file: Path) -> AsyncIterator[str]:
    """A gateway of its own, for a test that needs other settings than the session's."""
    port = free_port()
    app = create_app(settings, tokens_file)
    server = Server(config(app, "127.0.0.1", port, settings, lifespan="on"))
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if serving.done():  # it gave up starting: say why rather than wait for ever
                await serving
                raise AssertionError("the gateway exited before it started")
            await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving


@asynccontextmanager
async def gateway_clients(
    settings: Settings, tokens_file: Path, *apis: Api
) -> AsyncIterator[list[httpx.AsyncClient]]:
    """A gateway with `settings`, and a client of it for each account."""
    async with gateway(settings, tokens_file) as url, contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {a.token}"})
            )
            for a in apis
        ]


async def from_address(source: str, port: int, request: bytes = b"") -> bytes:
    """What 127.0.0.1:`port` answers a connection from loopback address `source` (sending
    `request`) before it closes: b"" from an endpoint that closed it unread (a reset, when
    the request had arrived)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(request)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def refusals(nats_log: Path, start: int = 0) -> list[str]:
    """The permissions violations nats-server logged after byte `start` of its log: a
    component publishing or subscribing where its user may not, i.e. a lost write."""
    if not nats_log.exists():
        return []
    with open(nats_log, "rb") as f:
        f.seek(start)
        said = f.read().decode(errors="replace")
    return [line for line in said.splitlines() if "Violation" in line]


@dataclass
class Dev:
    proc: asyncio.subprocess.Process
    data: Path
    port: int
    token: str
    log: Path

    def http(self, timeout: float = 10) -> httpx.AsyncClient:
        """A client of its API with the account token (use as a context manager)."""
        return httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.port}",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=timeout,
        )


@asynccontextmanager
async def running_dev(
    tmp_path: Path, functions: str, *flags: str, env: dict[str, str] | None = None
) -> AsyncIterator[Dev]:
    """`kubetask dev` (with `flags`, and `env` added to its environment) and `functions`
    applied; killed at the end if the test left it running."""
    data = tmp_path / "data"
    (tmp_path / "fns.yaml").write_text(functions)
    port = free_port()
    args = ["dev", "--data-dir", str(data), "--port", str(port), "--nats-port", "0", *flags]
    log = open(tmp_path / "dev.log", "ab")
    dev = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kubetask",
        *args,
        "-f",
        str(tmp_path / "fns.yaml"),
        stdout=log,
        stderr=log,
        env={**os.environ, "KUBETASK_SWEEP_GRACE": "2", **(env or {})},
    )
    try:
        cfg = data / "client.json"
        deadline = time.monotonic() + 60
        while not (cfg.exists() and "url" in cfg.read_text()):
            assert time.monotonic() < deadline, (tmp_path / "dev.log").read_text()
            await asyncio.sleep(0.1)
        token = json.loads(cfg.read_text())["token"]
        yield Dev(dev, data, port, token, tmp_path / "dev.log")
        refused = refusals(data / "logs" / "nats.log")
        assert not refused, "nats-server refused a component:\n" + "\n".join(refused[:5])
    finally:
        if dev.returncode is None:
            dev.kill()
            await dev.wait()
