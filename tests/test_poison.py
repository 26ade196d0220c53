"""Poison never spreads: an undecodable record and an undecodable queue message, planted behind
the API's back, are quarantined; everything else keeps working, the function's slot is free,
and a gateway started over the bad record starts and answers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from harness import Api, as_user, gateway
from kubetask import names
from kubetask.plane import DataPlane
from kubetask.settings import Settings
from prometheus_client import REGISTRY


def _quarantined(source: str) -> float:
    return REGISTRY.get_sample_value("kubetask_quarantined_total", {"source": source}) or 0.0


async def test_undecodable_record_and_message_are_quarantined(
    make_api: Callable[..., Awaitable[Api]],
    plane: DataPlane,
    settings: Settings,
    tokens_file: Path,
    nats_passwords: dict[str, str],
) -> None:
    api = await make_api()
    admin = await make_api(admin=True)
    await api.function("one", command=["true"], maxConcurrency=1)
    records_before, queue_before = _quarantined("record"), _quarantined("queue")
    # A record that is not a record, and messages that are not task references.
    await plane.js.publish(f"$KV.{names.TASKS_BUCKET}.{api.account}.rotten", b"\x00not json")
    for junk in (b"garbage", b'{"a": "x.y", "id": "*", "t": "t"}', b'{"a": 1}'):
        await plane.js.publish(f"kt.q.{api.account}.one", junk)
    # Everything else goes on: new tasks of the same function (concurrency 1) run.
    for i in range(3):
        await api.submit("one", task_id=f"fine-{i}")
    for i in range(3):
        assert (await api.wait(f"fine-{i}", timeout=20))["status"]["phase"] == "Succeeded"
    page = await api.call("GET", "/v1/tasks", 200)
    assert [t["metadata"]["name"] for t in page["items"]] == ["fine-0", "fine-1", "fine-2"]
    resp = await api.http.get("/v1/tasks/rotten")
    assert resp.status_code == 404 and "quarantined" in resp.json()["error"], resp.text
    for _ in range(100):
        if _quarantined("queue") >= queue_before + 3 and _quarantined("record") > records_before:
            break
        await asyncio.sleep(0.1)
    assert _quarantined("queue") >= queue_before + 3
    assert _quarantined("record") > records_before
    # Visible to admins, with the reason; not to tenants.
    assert (await api.http.get("/v1/quarantine")).status_code == 403
    entries = await admin.call("GET", "/v1/quarantine", 200, params={"limit": 1000})
    mine = [e for e in entries if api.account in e["where"]]
    assert {e["source"] for e in mine} == {"record", "queue"}, mine
    assert all(e["reason"] for e in mine)
    # The messages were terminated, not left to come back: the queue holds nothing.
    info = await plane.js.consumer_info(f"KT_Q_{api.account}", "fn_one")
    assert info.num_pending == 0 and info.num_ack_pending == 0, info
    # A gateway starting over the bad record starts and lists.
    gateway_user = as_user(settings, "gateway", nats_passwords)
    async with (
        asyncio.timeout(10),  # a gateway that cannot start over it fails the test, not hangs it
        gateway(gateway_user, tokens_file) as url,
        httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {api.token}"}) as http,
    ):
        resp = await http.get("/v1/tasks")
        assert resp.status_code == 200 and len(resp.json()["items"]) == 3, resp.text
