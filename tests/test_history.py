"""History per account: an account with a shorter retention loses its records, audit trail and
logs after it (JetStream per-message TTLs, no sweeping of ours) while another account keeps
them; the audit trail and logs are stored compressed; a bad retention setting is refused."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import nats
import pytest
from kubetask.auth import create_token
from kubetask.settings import Settings
from test_crash import Lab, lab  # noqa: F401 (the fixture)


def test_a_bad_account_retention_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("short", "short=0", "short=-5", "Short=10", "short=soon"):
        monkeypatch.setenv("KUBETASK_ACCOUNT_RETENTION", bad)
        with pytest.raises(ValueError, match="KUBETASK_ACCOUNT_RETENTION"):
            Settings()


async def _count(js: nats.js.JetStreamContext, stream: str, subject: str) -> int:
    info = await js.stream_info(stream, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def test_a_short_retention_account_loses_its_history_and_only_it(lab: Lab) -> None:  # noqa: F811
    url, short_token, env = lab.start_nats_and_gateway(
        "short", KUBETASK_ACCOUNT_RETENTION="short=3"
    )
    long_token = create_token(lab.root / "tokens.json", "long", "long")
    lab.spawn("dispatcher", env=env, log="d.log")
    ids = {}
    for account, token in (("short", short_token), ("long", long_token)):
        auth = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=url, headers=auth, timeout=30) as http:
            fn = {
                "apiVersion": "kubetask.io/v1alpha1",
                "kind": "TaskFunction",
                "metadata": {"name": "say", "namespace": account},
                "spec": {"command": ["sh", "-c", "echo hello"]},
            }
            assert (await http.put("/v1/functions/say", json=fn)).status_code == 200
            limits = (await http.get("/v1/limits")).json()
            assert limits["retentionSeconds"] == (3 if account == "short" else 7 * 86400)
            task = (await http.post("/v1/tasks", json={"function": "say"})).json()
            ids[account] = task["metadata"]["name"]
            deadline = time.monotonic() + 20
            while (await http.get(f"/v1/tasks/{ids[account]}")).json()["status"][
                "phase"
            ] != "Succeeded":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
    nc = await nats.connect(env["KUBETASK_NATS_URL"])
    js = nc.jetstream()
    try:
        for stream, packed in (("KV_kt_tasks", "none"), ("KT_EVENTS", "s2"), ("KT_LOGS", "s2")):
            config = (await js.stream_info(stream)).config
            assert config.compression == packed and config.allow_msg_ttl, stream
        assert await _count(js, "KT_LOGS", f"kt.logs.short.{ids['short']}") > 0
        assert await _count(js, "KT_EVENTS", f"kt.events.short.{ids['short']}") >= 3

        deadline = time.monotonic() + 20
        while await _count(js, "KV_kt_tasks", f"$KV.kt_tasks.short.{ids['short']}"):
            assert time.monotonic() < deadline, "the short account's record outlived its retention"
            await asyncio.sleep(0.25)
        await asyncio.sleep(0.5)
        assert await _count(js, "KT_EVENTS", "kt.events.short.>") == 0
        assert await _count(js, "KT_LOGS", "kt.logs.short.>") == 0
        assert await _count(js, "KV_kt_tasks", f"$KV.kt_tasks.long.{ids['long']}") == 1
        assert await _count(js, "KT_EVENTS", f"kt.events.long.{ids['long']}") >= 3
        assert await _count(js, "KT_LOGS", f"kt.logs.long.{ids['long']}") > 0
    finally:
        await nc.close()
    for account, token in (("short", short_token), ("long", long_token)):
        auth = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=url, headers=auth, timeout=30) as http:
            got = await http.get(f"/v1/tasks/{ids[account]}")
            assert got.status_code == (404 if account == "short" else 200)
            deadline = time.monotonic() + 10
            while True:  # the index drops the expired row within its check interval
                listed = [
                    t["metadata"]["name"] for t in (await http.get("/v1/tasks")).json()["items"]
                ]
                if listed == ([] if account == "short" else [ids[account]]):
                    break
                assert time.monotonic() < deadline, listed
                await asyncio.sleep(0.25)


async def test_the_audit_trail_stays_under_its_disk_cap_oldest_revisions_first(
    lab: Lab,  # noqa: F811
) -> None:
    """The audit trail had a retention age and no size limit: enough changes could fill the disk
    that records and queues need too. Past `KUBETASK_EVENTS_MAX_BYTES` (1 MiB here) the oldest
    revisions go; the records themselves stay."""
    cap = 1 << 20
    url, token, env = lab.start_nats_and_gateway("trail", KUBETASK_EVENTS_MAX_BYTES=str(cap))
    auth = {"Authorization": f"Bearer {token}"}
    ids = []
    async with httpx.AsyncClient(base_url=url, headers=auth, timeout=30) as http:
        fn = {"metadata": {"name": "f"}, "spec": {"command": ["true"]}}
        assert (await http.put("/v1/functions/f", json=fn)).status_code == 200
        for i in range(30):  # ~6 MB of revisions, random so that compression cannot shrink them
            payload = {"i": i, "noise": os.urandom(50_000).hex()}
            task = await http.post("/v1/tasks", json={"function": "f", "payload": payload})
            assert task.status_code == 202, task.text
            ids.append(task.json()["metadata"]["name"])
        nc = await nats.connect(env["KUBETASK_NATS_URL"])
        js = nc.jetstream()
        try:
            deadline = time.monotonic() + 20
            while not await _count(js, "KT_EVENTS", f"kt.events.trail.{ids[-1]}"):
                assert time.monotonic() < deadline, "the last task's trail never arrived"
                await asyncio.sleep(0.1)
            info = await js.stream_info("KT_EVENTS")
            assert info.config.max_bytes == cap and info.config.discard == "old", info.config
            assert 0 < info.state.bytes <= cap, info.state
            assert await _count(js, "KT_EVENTS", f"kt.events.trail.{ids[0]}") == 0
        finally:
            await nc.close()
        for task_id in (ids[0], ids[-1]):
            got = await http.get(f"/v1/tasks/{task_id}")
            assert got.status_code == 200 and got.json()["spec"]["payload"]["i"] in (0, 29)
        assert (await http.get(f"/v1/tasks/{ids[0]}/events")).status_code == 200
        assert len((await http.get(f"/v1/tasks/{ids[-1]}/events")).json()) >= 1
