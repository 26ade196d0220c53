"""A record JetStream expires (the retention has passed since its last write) leaves the
gateway's list results, and reading it is a 404 — JetStream does not announce expiries, so the
index has to find them."""

from __future__ import annotations

import asyncio
import time

import httpx
from test_crash import Lab, lab  # noqa: F401 (the fixture)


async def test_an_expired_record_leaves_the_list(lab: Lab) -> None:  # noqa: F811
    url, token, _ = lab.start_nats_and_gateway("exp", KUBETASK_RETENTION_SECONDS="3")
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=auth) as http:
        fn = {
            "apiVersion": "kubetask.io/v1alpha1",
            "kind": "TaskFunction",
            "metadata": {"name": "idle", "namespace": "exp"},
            "spec": {"command": ["true"]},
        }
        assert (await http.put("/v1/functions/idle", json=fn)).status_code == 200
        for i in range(3):  # no dispatcher: they stay Queued, written once
            resp = await http.post("/v1/tasks", json={"function": "idle", "id": f"old-{i}"})
            assert resp.status_code == 202, resp.text
        listed = (await http.get("/v1/tasks")).json()["items"]
        assert [t["metadata"]["name"] for t in listed] == ["old-0", "old-1", "old-2"]
        deadline = time.monotonic() + 15
        while (await http.get("/v1/tasks")).json()["items"]:
            assert time.monotonic() < deadline, "expired records are still listed"
            await asyncio.sleep(0.25)
        assert (await http.get("/v1/tasks/old-0")).status_code == 404
        queued = (await http.get("/v1/tasks", params={"status": "Queued"})).json()["items"]
        assert queued == []
