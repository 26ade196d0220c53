"""Test harness: one real nats-server (JetStream, own store dir, free port) per session, a real
gateway served over HTTP by uvicorn and a real dispatcher running real subprocesses.

Each test works in an account of its own, so tests share the platform without seeing each
other's tasks — which is also what tenancy promises.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from kubetask.auth import create_token
from kubetask.dispatch.dispatcher import Dispatcher
from kubetask.embedded import free_port, start_nats
from kubetask.gateway.app import create_app
from kubetask.plane import DataPlane
from kubetask.settings import Settings

PY = sys.executable
TERMINAL = {"Succeeded", "Failed", "Expired", "Stopped"}
_accounts = itertools.count(1)


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    proc = start_nats(tmp_path_factory.mktemp("jetstream"), port, tie_to_parent=True)
    yield f"nats://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def settings(nats_url: str) -> Settings:
    return Settings(
        nats_url=nats_url,
        ack_wait=3.0,
        sweep_grace=2.0,
        dedup_window=1.0,
        max_payload_bytes=64 * 1024,
        max_result_bytes=64 * 1024,
    )


@pytest.fixture(scope="session")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("auth") / "tokens.json"


@pytest.fixture(scope="session")
async def gateway_url(settings: Settings, tokens_file: Path) -> AsyncIterator[str]:
    port = free_port()
    app = create_app(settings, tokens_file)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="on"
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task


@pytest.fixture(scope="session")
async def plane(settings: Settings) -> AsyncIterator[DataPlane]:
    p = await DataPlane.connect(settings, "tests")
    yield p
    await p.close()


@pytest.fixture(scope="session")
async def dispatcher(settings: Settings, gateway_url: str) -> AsyncIterator[Dispatcher]:
    p = await DataPlane.connect(settings, "test-dispatcher")
    d = Dispatcher(p)
    await d.start()
    yield d
    await d.close(drain_timeout=2)
    await p.close()


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

    def script(self, name: str, body: str) -> list[str]:
        """A Python program for a function's command; returns the argv."""
        path = self.workdir / f"{name}.py"
        path.write_text(textwrap.dedent(body))
        return [PY, str(path)]


@pytest.fixture
async def make_api(
    gateway_url: str, tokens_file: Path, dispatcher: Dispatcher, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[Api]]]:
    clients: list[httpx.AsyncClient] = []

    async def make(account: str | None = None, admin: bool = False) -> Api:
        acct = account or f"acct{next(_accounts)}-{os.getpid()}"
        token = create_token(tokens_file, acct, None if admin else acct, admin=admin)
        http = httpx.AsyncClient(
            base_url=gateway_url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
        clients.append(http)
        return Api(http, acct, token, tmp_path)

    yield make
    for c in clients:
        await c.aclose()


@pytest.fixture
async def api(make_api: Callable[..., Awaitable[Api]]) -> Api:
    return await make_api()


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
