"""The HTTP API's contract: audit queries, bad input, authentication and tenant isolation."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from harness import Api
from kubetask import names
from kubetask.plane import DataPlane
from kubetask.settings import Settings
from nats.js.errors import KeyNotFoundError


async def _ids(api: Api, **params: object) -> list[str]:
    page = await api.call("GET", "/v1/tasks", 200, params=params)
    return [t["metadata"]["name"] for t in page["items"]]


async def test_list_filters_alone_and_combined(api: Api) -> None:
    await api.function("ok", command=["true"])
    await api.function("bad", command=["false"])
    await api.async_config("bad", function="bad", maxAsyncRetryAttempts=0)
    await api.function("held", command=["sleep", "30"])
    for i in range(3):
        await api.wait((await api.submit("ok", task_id=f"traceA-ok-{i}"))["metadata"]["name"])
    for i in range(2):
        await api.wait((await api.submit("bad", task_id=f"traceA-bad-{i}"))["metadata"]["name"])
    middle = datetime.now(UTC)
    await asyncio.sleep(0.05)
    for i in range(2):
        await api.wait((await api.submit("ok", task_id=f"traceB-ok-{i}"))["metadata"]["name"])
    await api.submit("held", task_id="traceB-held")
    await api.wait("traceB-held", {"Running"})

    everything = [
        "traceA-bad-0",
        "traceA-bad-1",
        "traceA-ok-0",
        "traceA-ok-1",
        "traceA-ok-2",
        "traceB-held",
        "traceB-ok-0",
        "traceB-ok-1",
    ]
    assert await _ids(api) == everything
    assert await _ids(api, status="Failed") == ["traceA-bad-0", "traceA-bad-1"]
    assert await _ids(api, status="Running,Failed") == [
        "traceA-bad-0",
        "traceA-bad-1",
        "traceB-held",
    ]
    # As people type it (a 422 before): phases are told apart by their letters, not their case.
    assert await _ids(api, status="running, failed") == await _ids(api, status="Running,Failed")
    assert await _ids(api, function="ok") == [
        "traceA-ok-0",
        "traceA-ok-1",
        "traceA-ok-2",
        "traceB-ok-0",
        "traceB-ok-1",
    ]
    assert await _ids(api, idPrefix="traceB") == ["traceB-held", "traceB-ok-0", "traceB-ok-1"]
    assert await _ids(api, startedAfter=middle.isoformat()) == everything[5:]
    assert await _ids(api, startedBefore=middle.isoformat()) == everything[:5]
    assert await _ids(
        api, idPrefix="traceA", status="Succeeded", function="ok", startedBefore=middle.isoformat()
    ) == ["traceA-ok-0", "traceA-ok-1", "traceA-ok-2"]
    assert await _ids(api, idPrefix="traceB", startedBefore=middle.isoformat()) == []
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert await _ids(
        api, startedAfter=middle.isoformat(), startedBefore=later, function="ok", status="Succeeded"
    ) == ["traceB-ok-0", "traceB-ok-1"]
    await api.call("POST", "/v1/tasks/traceB-held/stop", 200)


async def test_list_pages_with_a_cursor(api: Api) -> None:
    await api.function("pg", command=["true"])
    for i in range(7):
        await api.submit("pg", task_id=f"page-{i}")
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = await api.call("GET", "/v1/tasks", 200, params=params)
        seen += [t["metadata"]["name"] for t in page["items"]]
        pages += 1
        cursor = page["cursor"]
        if cursor is None:
            break
    assert seen == [f"page-{i}" for i in range(7)]
    assert pages == 3


async def test_a_page_of_large_tasks_ends_at_its_byte_budget(api: Api, settings: Settings) -> None:
    """One tenant's list of its largest tasks cannot make the gateway hold a page of
    hundreds of megabytes: a page ends at `KUBETASK_PAGE_MAX_BYTES` of records (here 256 KiB,
    four 60 KB payloads), with a cursor to the rest, whatever `limit` asks."""
    await api.function("wide", command=["true"])
    payload = "w" * 60_000
    for i in range(10):
        await api.submit("wide", payload=payload, task_id=f"wide-{i}")
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        pages += 1
        params = {"limit": 1000, "idPrefix": "wide-", **({"cursor": cursor} if cursor else {})}
        resp = await api.http.get("/v1/tasks", params=params)
        assert resp.status_code == 200, resp.text
        assert len(resp.content) < settings.page_max_bytes + 16_000, len(resp.content)
        page = resp.json()
        assert page["items"], page
        assert all(t["spec"]["payload"] == payload for t in page["items"])
        seen += [t["metadata"]["name"] for t in page["items"]]
        cursor = page["cursor"]
        if cursor is None:
            break
    assert seen == [f"wide-{i}" for i in range(10)]
    assert pages >= 3  # at most four such tasks a page


async def test_pages_of_large_functions_and_configs_end_at_the_byte_budget(api: Api) -> None:
    """Functions and AsyncConfigs are paged by bytes too (256 KiB here: four of these a page),
    whatever `limit` asks, and the pages still give every object once, in order."""
    names = [f"big{i}" for i in range(6)]
    for name in names:
        env = [{"name": "BIG", "value": "e" * 60_000}]
        await api.function(name, command=["true"], env=env)
        meta = {"name": name, "annotations": {"note": "n" * 60_000}}
        body = {"metadata": meta, "spec": {"function": name}}
        await api.call("PUT", f"/v1/asyncconfigs/{name}", 200, json=body)
    for path in ("/v1/functions", "/v1/asyncconfigs"):
        seen: list[str] = []
        cursor = None
        while True:
            params = {"limit": 500, **({"cursor": cursor} if cursor else {})}
            resp = await api.http.get(path, params=params)
            assert resp.status_code == 200, resp.text
            assert 1 <= len(resp.json()) <= 4, (path, len(resp.json()))
            seen += [o["metadata"]["name"] for o in resp.json()]
            cursor = resp.headers.get("Next-Cursor")
            if cursor is None:
                break
        assert seen == names, path


async def test_bad_input_gets_a_clear_4xx(api: Api) -> None:
    await api.function("f", command=["true"])
    cases = [
        (dict(json={"function": "ghost"}), 404, "function 'ghost' is not registered"),
        (
            dict(content=b'{"function": "f", ', headers={"content-type": "application/json"}),
            400,
            "malformed JSON",
        ),
        (dict(json={"function": "f", "payload": "x" * 70_000}), 413, "the limit is 65536 bytes"),
        (
            dict(content=b"x" * 200_000, headers={"content-type": "application/json"}),
            413,
            "a request body may be at most 131072 bytes (a task's payload at most 65536)",
        ),
        (dict(json={"function": "f", "id": "has space"}), 422, "task id may use only letters"),
        (dict(json={"function": "f", "id": "a.b"}), 422, "task id may use only letters"),
        (dict(json={"function": "f", "id": "x" * 129}), 422, "task id may use only letters"),
        (dict(json={"function": "Bad_Name"}), 422, "function:"),
        (dict(json={"payload": 1}), 422, "function: Field required"),
        (dict(json={"function": "f", "surprise": 1}), 422, "surprise: Extra inputs"),
    ]
    for kwargs, status, message in cases:
        resp = await api.http.post("/v1/tasks", **kwargs)  # type: ignore[arg-type]
        assert resp.status_code == status, (kwargs.get("json"), resp.text)
        assert message in resp.json()["error"], resp.json()
    bad_functions = [
        ({}, "exactly one of spec.command or spec.server"),
        ({"command": ["x"], "server": {"command": ["y"]}}, "exactly one of"),
        ({"command": ["x"], "timeoutSeconds": 86401}, "timeoutSeconds"),
        ({"command": ["x"], "maxConcurrency": -1}, "maxConcurrency"),
    ]
    for spec, message in bad_functions:
        body = {
            "apiVersion": "kubetask.io/v1alpha1",
            "kind": "TaskFunction",
            "metadata": {"name": "g", "namespace": api.account},
            "spec": spec,
        }
        resp = await api.http.put("/v1/functions/g", json=body)
        assert resp.status_code == 422 and message in resp.json()["error"], resp.text
    resp = await api.http.put(
        "/v1/asyncconfigs/c",
        json={
            "apiVersion": "kubetask.io/v1alpha1",
            "kind": "AsyncConfig",
            "metadata": {"name": "c", "namespace": api.account},
            "spec": {
                "function": "f",
                "destinationConfig": {"onSuccess": {"kind": "email", "target": "x"}},
            },
        },
    )
    assert resp.status_code == 422 and "kind" in resp.json()["error"]
    assert (await api.http.get("/v1/tasks", params={"status": "Done"})).status_code == 422
    assert (await api.http.get("/v1/tasks/none-such")).status_code == 404


async def test_a_body_over_its_bound_is_told_that_bound(api: Api) -> None:
    """A function's body, which holds no payload, may pass the payload limit (64 KiB here) by
    the envelope's room (64 KiB); past that, the 413 names the bound it was held to, whether
    the body declared its length or arrived without one."""

    def function(annotation: int) -> bytes:
        return json.dumps(
            {
                "apiVersion": "kubetask.io/v1alpha1",
                "kind": "TaskFunction",
                "metadata": {"name": "big", "annotations": {"a": "x" * annotation}},
                "spec": {"command": ["true"]},
            }
        ).encode()

    headers = {"content-type": "application/json"}
    ok = await api.http.put("/v1/functions/big", content=function(100_000), headers=headers)
    assert ok.status_code == 200, ok.text

    async def streamed(body: bytes) -> AsyncIterator[bytes]:
        for i in range(0, len(body), 16_384):
            yield body[i : i + 16_384]

    told = "a request body may be at most 131072 bytes (a task's payload at most 65536)"
    for content in (function(140_000), streamed(function(140_000))):
        resp = await api.http.put("/v1/functions/big", content=content, headers=headers)
        assert resp.status_code == 413 and told in resp.json()["error"], resp.text


async def test_authentication_is_required(api: Api) -> None:
    await api.function("f", command=["true"])
    for headers in ({}, {"Authorization": "Bearer kt_wrong"}, {"Authorization": "Basic abc"}):
        headers = headers | {"Authorization": headers.get("Authorization", "")}
        for resp in (
            await api.http.get("/v1/tasks", headers=headers),
            await api.http.post("/v1/tasks", headers=headers, json={"function": "f"}),
        ):
            assert resp.status_code == 401
            assert resp.headers["www-authenticate"] == "Bearer"
            assert "token" in resp.json()["error"]
    assert (await api.call("GET", "/v1/tasks", 200))["items"] == []


async def test_one_account_cannot_see_or_touch_another(
    make_api: Callable[..., Awaitable[Api]],
) -> None:
    alice, bob = await make_api(), await make_api()
    await alice.function("work", command=["sleep", "5"])
    await bob.function("work", command=["true"])
    tid = (await alice.submit("work", {"secret": 1}, task_id="alice-1"))["metadata"]["name"]
    await alice.wait(tid, {"Running"})
    params = {"account": alice.account}
    for method, path in [
        ("GET", f"/v1/tasks/{tid}"),
        ("POST", f"/v1/tasks/{tid}/stop"),
        ("POST", f"/v1/tasks/{tid}/pause"),
        ("DELETE", f"/v1/tasks/{tid}"),
        ("GET", f"/v1/tasks/{tid}/logs"),
        ("GET", f"/v1/tasks/{tid}/events"),
        ("GET", "/v1/tasks"),
        ("GET", "/v1/functions/work"),
        ("DELETE", "/v1/functions/work"),
    ]:
        for p in (params, {}):
            if p == {} and path in ("/v1/tasks", "/v1/functions/work"):
                if method == "GET":  # bob's own list and function: nothing of alice's in it
                    resp = await bob.http.get(path)
                    assert resp.status_code == 200 and "alice" not in resp.text
                continue
            resp = await bob.http.request(method, path, params=p)
            assert resp.status_code == 404, (method, path, p, resp.status_code)
    resp = await bob.http.post("/v1/tasks", params=params, json={"function": "work"})
    assert resp.status_code == 404
    alice_fn = {
        "apiVersion": "kubetask.io/v1alpha1",
        "kind": "TaskFunction",
        "metadata": {"name": "work", "namespace": alice.account},
        "spec": {"command": ["x"]},
    }
    assert (await bob.http.put("/v1/functions/work", json=alice_fn)).status_code == 404
    # nothing of alice's changed
    task = await alice.get(tid)
    assert task["status"]["phase"] == "Running"
    assert (await alice.call("GET", "/v1/functions/work", 200))["spec"]["command"] == ["sleep", "5"]
    await alice.call("POST", f"/v1/tasks/{tid}/stop", 200)


async def test_admin_spans_accounts(make_api: Callable[..., Awaitable[Api]]) -> None:
    tenant = await make_api()
    admin = await make_api(admin=True)
    await tenant.function("t", command=["true"])
    tid = (await tenant.submit("t", task_id="adm-1"))["metadata"]["name"]
    got = await admin.call("GET", f"/v1/tasks/{tid}", 200, params={"account": tenant.account})
    assert got["metadata"]["namespace"] == tenant.account
    everyone = await admin.call("GET", "/v1/tasks", 200, params={"idPrefix": "adm-"})
    assert tenant.account in {t["metadata"]["namespace"] for t in everyone["items"]}


async def test_the_docs_page_runs_no_code_but_the_pinned_release(api: Api) -> None:
    """`/docs` is where users type their tokens: every script and stylesheet it loads from
    elsewhere names one release and carries its hash, so a changed file is never run. FastAPI's
    own pages loaded `swagger-ui-dist@5` (whatever that is today) and ReDoc's `redoc@2`."""
    page = await api.http.get("/docs", headers={"Authorization": ""})
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    loaded = re.findall(r"<(?:script|link)\b[^>]*>", page.text)
    external = [tag for tag in loaded if re.search(r'(src|href)="https?://', tag)]
    assert len(external) == 2, loaded  # Swagger UI's script and stylesheet
    for tag in external:
        assert re.search(r'integrity="sha384-[A-Za-z0-9+/]{64}"', tag), tag
        assert re.search(r"@\d+\.\d+\.\d+/", tag), tag  # an exact version
        assert 'crossorigin="anonymous"' in tag, tag
    assert '"/openapi.json"' in page.text
    assert (await api.http.get("/redoc")).status_code == 404


async def test_openapi_and_metrics_are_served(api: Api) -> None:
    doc = (await api.http.get("/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    assert {"Task", "TaskFunction", "AsyncConfig", "TaskSubmission"} <= set(schemas)
    assert "/v1/tasks/{task_id}/stop" in doc["paths"]
    submit = doc["paths"]["/v1/tasks"]["post"]
    body = submit["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/TaskSubmission"}
    accepted = submit["responses"]["202"]["content"]["application/json"]["schema"]
    assert accepted == {"$ref": "#/components/schemas/Task"}
    assert [p["name"] for p in submit["parameters"]] == ["account"]
    assert "get" in doc["paths"]["/v1/tasks"]
    await api.function("m", command=["true"])
    await api.wait((await api.submit("m"))["metadata"]["name"])
    text = (await api.http.get("/metrics")).text
    for name in (
        "kubetask_tasks_submitted_total",
        "kubetask_tasks_succeeded_total",
        "kubetask_submit_to_start_seconds_bucket",
        "kubetask_execution_duration_seconds",
        "kubetask_tasks_running",
        "kubetask_backlog",
    ):
        assert name in text
    assert f'kubetask_tasks_succeeded_total{{account="{api.account}",function="m"}} 1.0' in text


async def test_an_accepted_task_says_where_it_is_read(api: Api) -> None:
    """202 with `Location`, as an asynchronous API answers: the caller polls there."""
    await api.function("located", command=["true"])
    resp = await api.http.post("/v1/tasks", json={"function": "located", "id": "here-1"})
    assert resp.status_code == 202
    assert resp.headers["location"] == f"/v1/tasks/here-1?account={api.account}"
    got = await api.call("GET", resp.headers["location"], 200)
    assert got["metadata"]["name"] == "here-1"
    again = await api.http.post("/v1/tasks", json={"function": "located", "id": "here-1"})
    assert again.status_code == 409 and "location" not in again.headers


def _pointer(document: Any, expression: str) -> Any:
    """`$response.body#/items/0/metadata/name` against an answer's body."""
    assert expression.startswith("$response.body#/"), expression
    for part in expression.split("#/", 1)[1].split("/"):
        document = document[int(part)] if isinstance(document, list) else document[part]
    return document


async def test_every_link_in_the_document_leads_from_a_real_answer_to_its_operation(
    api: Api,
) -> None:
    """The document's links say how an answer's ids feed the next call: each is followed here
    from a real answer (its source operation called), and the operation it names answers for
    the object it was led to, not 404 (a link to a renamed route, or a wrong pointer, would)."""
    doc = (await api.http.get("/openapi.json")).json()
    routes = {
        op["operationId"]: (method.upper(), path)
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
    }
    await api.function("linked", command=["sleep", "30"])
    await api.submit("linked")
    sources = {
        ("post", "/v1/tasks"): {"json": {"function": "linked"}},
        ("get", "/v1/tasks"): {},
        ("get", "/v1/functions"): {},
        ("put", "/v1/functions/{name}"): {
            "json": {"metadata": {"name": "linked"}, "spec": {"command": ["sleep", "30"]}}
        },
        ("put", "/v1/asyncconfigs/{name}"): {
            "json": {"metadata": {"name": "linked"}, "spec": {"function": "linked"}}
        },
    }
    followed = set()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for status, answer_doc in op["responses"].items():
                for name, link in answer_doc.get("links", {}).items():
                    url = path.replace("{name}", "linked")
                    answer = await api.call(
                        method.upper(), url, int(status), **sources[(method, path)]
                    )
                    target_method, target_path = routes[link["operationId"]]
                    params, query = {}, {}
                    for key, expression in link["parameters"].items():
                        where, param = key.split(".")
                        value = _pointer(answer, expression)
                        (params if where == "path" else query)[param] = value
                    assert query.get("account") == api.account, (name, query)
                    body = {}
                    for field, expression in link.get("requestBody", {}).items():
                        if isinstance(expression, dict):
                            body[field] = {k: _pointer(answer, e) for k, e in expression.items()}
                        else:
                            body[field] = _pointer(answer, expression)
                    if target_method == "PUT":
                        body = {**body, "spec": {**body["spec"], "maxAsyncRetryAttempts": 1}}
                    got = await api.http.request(
                        target_method,
                        target_path.format(**params),
                        params=query,
                        **({"json": body} if body else {}),
                    )
                    # The task may have ended or been stopped by a link followed before.
                    assert got.status_code in (200, 202, 204, 409), (
                        name,
                        got.status_code,
                        got.text,
                    )
                    followed.add((method, path, name))
    assert len(followed) == 22, sorted(followed)  # every one the document has


async def test_function_with_unfinished_tasks_cannot_be_deleted(api: Api) -> None:
    await api.function("busy", command=["sleep", "3"])
    tid = (await api.submit("busy"))["metadata"]["name"]
    resp = await api.http.delete("/v1/functions/busy")
    assert resp.status_code == 409 and "unfinished" in resp.json()["error"]
    await api.call("POST", f"/v1/tasks/{tid}/stop", 200)
    await api.wait(tid)
    await api.call("DELETE", "/v1/functions/busy", 204)
    assert (await api.http.post("/v1/tasks", json={"function": "busy"})).status_code == 404


async def test_a_submission_its_queue_refuses_is_taken_back(api: Api, plane: DataPlane) -> None:
    """The record is created first; if the message cannot be published the submission is not
    accepted (503) and the record is deleted again, so the same id can be submitted later."""
    await api.function("unqueued", command=["true"], queueMode="dedicated")
    await api.wait((await api.submit("unqueued", 0))["metadata"]["name"])
    fn = plane.registry.function(api.account, "unqueued")
    assert fn is not None
    await plane.js.delete_stream(names.queues_of(fn)[0].stream)
    # Admission still counts on the depth it read a moment ago, so the record gets created.
    refused = await api.call(
        "POST", "/v1/tasks", 503, json={"function": "unqueued", "id": "again", "payload": 1}
    )
    assert "unavailable" in refused["error"] and "retry" in refused["error"]
    await api.call("GET", "/v1/tasks/again", 404)
    with pytest.raises(KeyNotFoundError) as gone:
        await (await plane.js.key_value(names.TASKS_BUCKET)).get(
            names.task_key(api.account, "again")
        )
    assert gone.value.op == "DEL"  # created, then taken back
    unknown = await api.call(
        "POST", "/v1/tasks", 503, json={"function": "unqueued", "id": "other", "payload": 1}
    )
    assert "unavailable" in unknown["error"]  # admission cannot read the queue's depth either
    await api.function("unqueued", command=["true"], queueMode="dedicated", maxConcurrency=2)
    await api.submit("unqueued", 1, task_id="again")
    assert (await api.wait("again"))["status"]["phase"] == "Succeeded"
