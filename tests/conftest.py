"""Test harness: one real nats-server (JetStream, own store dir, free port) per session, a real
gateway served over HTTP by uvicorn and a real dispatcher running real subprocesses.

Each test works in an account of its own, so tests share the platform without seeing each
other's tasks — which is also what tenancy promises.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from harness import (
    DENIED_WEBHOOK_HOST,
    LOG_BURST,
    LOG_RATE,
    LOG_STREAMS,
    LOGS_MAX_BYTES,
    METRICS_TOKEN,
    REQUEST_TIMEOUT,
    Api,
    as_user,
    gateway,
    refusals,
)
from kubetask import nats_auth
from kubetask.auth import create_token
from kubetask.dispatch.dispatcher import Dispatcher
from kubetask.embedded import free_port, start_nats
from kubetask.networks import DEFAULT_DENIED, parse_networks
from kubetask.plane import DataPlane
from kubetask.settings import Settings

_accounts = itertools.count(1)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The loop the gateway and dispatchers run on in production (uvloop), so tests exercise
    the same transports."""
    import uvloop

    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def nats_passwords(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return nats_auth.load_or_create(tmp_path_factory.mktemp("secrets") / "nats-users.json")


@pytest.fixture(scope="session")
def nats_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the session's nats-server logs (slow consumers, for one)."""
    return tmp_path_factory.mktemp("natslog") / "nats-server.log"


@pytest.fixture(scope="session")
def nats_url(
    tmp_path_factory: pytest.TempPathFactory, nats_passwords: dict[str, str], nats_log: Path
) -> Iterator[str]:
    """One nats-server with the platform's users and permissions, as `kubetask dev` runs it."""
    port = free_port()
    conf = nats_auth.write_server_config(
        tmp_path_factory.mktemp("natsconf") / "nats.conf", nats_passwords
    )
    proc = start_nats(
        tmp_path_factory.mktemp("jetstream"),
        port,
        tie_to_parent=True,
        config=conf,
        log_file=nats_log,
    )
    yield f"nats://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(autouse=True)
def no_permission_violations(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every component connects with only the subjects it needs, so a publish or subscription
    nats-server refuses is a component doing something its user was not given: a lost write
    (a task's final log line was once refused this way, and its followers hung). nats-server
    logs each refusal; a test during which one appears fails, naming it, unless it is marked
    as making them on purpose."""
    if "nats_url" not in request.fixturenames or request.node.get_closest_marker("refused"):
        yield
        return
    log: Path = request.getfixturevalue("nats_log")
    start = log.stat().st_size if log.exists() else 0
    yield
    refused = refusals(log, start)
    assert not refused, "nats-server refused a component:\n" + "\n".join(refused[:5])


@pytest.fixture(scope="session")
def settings(nats_url: str, nats_passwords: dict[str, str]) -> Settings:
    """Admin settings, for tests that look behind the API."""
    return Settings(
        nats_url=nats_url,
        nats_user="admin",
        nats_password=nats_passwords["admin"],
        ack_wait=3.0,
        sweep_grace=2.0,
        dedup_window=1.0,
        max_payload_bytes=64 * 1024,
        # Tests register functions as fast as they like; the change rate is tested with a
        # gateway of its own (`test_throttle.py`).
        account_max_changes=0.0,
        max_result_bytes=64 * 1024,
        # Four of the largest payloads fill a page of `GET /v1/tasks`; a few hundred small tasks.
        page_max_bytes=256 * 1024,
        # Functions doze after one empty 5 s pull, so every test's idle functions go through
        # the doze and must be woken by their next task.
        pull_idle_expires=5.0,
        # and nats-server removes their consumers 8 s later, so their next task re-creates it.
        consumer_idle=8.0,
        metrics_token=METRICS_TOKEN,
        account_max_log_streams=LOG_STREAMS,
        request_timeout=REQUEST_TIMEOUT,
        log_rate=LOG_RATE,
        log_burst=LOG_BURST,
        # Each attempt's budget is what the log tests look at; an account's pace is tested
        # with a pace of its own (`test_execution.py`).
        account_log_rate=float(1 << 30),
        account_log_burst=float(1 << 34),
        dispatcher_log_rate=float(1 << 34),
        logs_max_bytes=LOGS_MAX_BYTES,
        # 127.0.0.2 is loopback too, so a webhook server can listen there and show it is never
        # called.
        webhook_denied_networks=(
            *parse_networks("", DEFAULT_DENIED),
            ipaddress.ip_network(DENIED_WEBHOOK_HOST),
        ),
    )


@pytest.fixture(scope="session")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("auth") / "tokens.json"


@pytest.fixture(scope="session")
async def gateway_url(
    settings: Settings, tokens_file: Path, nats_passwords: dict[str, str]
) -> AsyncIterator[str]:
    async with gateway(as_user(settings, "gateway", nats_passwords), tokens_file) as url:
        yield url


@pytest.fixture(scope="session")
async def plane(settings: Settings) -> AsyncIterator[DataPlane]:
    p = await DataPlane.connect(settings, "tests")
    yield p
    await p.close()


@pytest.fixture(scope="session")
async def dispatcher(
    settings: Settings, gateway_url: str, nats_passwords: dict[str, str]
) -> AsyncIterator[Dispatcher]:
    p = await DataPlane.connect(as_user(settings, "dispatcher", nats_passwords), "test-dispatcher")
    d = Dispatcher(p)
    await d.start()
    yield d
    await d.close(drain_timeout=2)
    await p.close()


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
