"""Hostile input and tenancy: every route and verb as another account, every name outside the
grammar, every internal or foreign subject as a destination. Each answer is a 4xx with the one
error body, nothing changes, and the service stays healthy afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import (
    LOG_STREAMS,
    METRICS_TOKEN,
    REQUEST_TIMEOUT,
    Api,
    as_user,
    from_address,
    gateway,
)
from kubetask import metrics, names
from kubetask.embedded import free_port
from kubetask.plane import DataPlane
from kubetask.settings import Settings
from nats.js.errors import BadRequestError

BAD_IDS = [
    "*",
    ">",
    "a.b",
    "a b",
    "a\tb",
    "a\x01b",
    "a\x7fb",
    "é",
    "日本",
    "-lead",
    "x" * 129,
    "x" * 5000,
    "..",
    "$KV",
    "a%2Fb",
    "a;b",
    "a\\b",
    "a'b",
    '"',
]


def _check_error_body(resp: Any) -> None:
    body = resp.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str), resp.text
    assert set(body) <= {"error", "field", "phase", "task", "retryAfter"}, body


def _task_routes(task_id: str) -> list[tuple[str, str]]:
    quoted = "".join(c if c.isalnum() or c in "-_" else f"%{ord(c):02X}" for c in task_id)
    if any(ord(c) > 127 for c in task_id):
        quoted = task_id.encode().hex()  # non-ASCII: sent as raw UTF-8 bytes below instead
    base = f"/v1/tasks/{quoted}"
    return [
        ("GET", base),
        ("GET", base + "/logs"),
        ("POST", base + "/stop"),
        ("POST", base + "/pause"),
        ("POST", base + "/resume"),
        ("DELETE", base),
    ]


async def test_names_outside_the_grammar_are_404_on_every_task_route(
    api: Api, plane: DataPlane
) -> None:
    await api.function("held", command=["sleep", "30"])
    await api.submit("held", task_id="real")
    await api.wait("real", {"Running"})
    for bad in BAD_IDS:
        for method, path in _task_routes(bad):
            if any(ord(c) > 127 for c in bad):
                path = path.replace(bad.encode().hex(), "".join(f"%{b:02X}" for b in bad.encode()))
            resp = await api.http.request(method, path)
            assert resp.status_code == 404, (method, path[:80], resp.status_code, resp.text[:200])
            _check_error_body(resp)
    # The wildcard ids reached nothing: the real task still runs, and NATS never saw a subject
    # built from them (the gateway's connection is the one that would have been cut).
    assert (await api.get("real"))["status"]["phase"] == "Running"
    assert (await api.http.get("/healthz")).status_code == 200
    await api.call("POST", "/v1/tasks/real/stop", 200)
    for name in ["*", ">", "A", "a.b", "a%20b", "x" * 64, "x" * 5000, "-a"]:
        for method, path in (
            ("GET", f"/v1/functions/{name}"),
            ("DELETE", f"/v1/functions/{name}"),
            ("DELETE", f"/v1/asyncconfigs/{name}"),
        ):
            resp = await api.http.request(method, path)
            assert resp.status_code == 404, (method, path[:80], resp.text[:200])
            _check_error_body(resp)
        resp = await api.http.get("/v1/tasks", params={"account": name})
        assert resp.status_code == 404, resp.text
    assert (await api.http.get("/healthz")).status_code == 200


async def test_creations_with_bad_names_are_422(api: Api) -> None:
    await api.function("f", command=["true"])
    for bad in ["*", "a.b", "a b", "_a", "x" * 129, "é", "a\x00"]:
        resp = await api.http.post("/v1/tasks", json={"function": "f", "id": bad})
        assert resp.status_code == 422, resp.text
        _check_error_body(resp)
    for bad in ["A", "a.b", "x" * 64, "-a", "a_b"]:
        body = {"metadata": {"name": bad}, "spec": {"command": ["true"]}}
        resp = await api.http.put(f"/v1/functions/{bad}", json=body)
        assert resp.status_code == 422, resp.text
        _check_error_body(resp)
    # Told in words, not as a regular expression.
    for field, bad in (("function", "NOPE"), ("function", "a_b"), ("id", "-x")):
        resp = await api.http.post("/v1/tasks", json={"function": "f", field: bad})
        assert resp.status_code == 422 and resp.json()["field"] == field, resp.text
        assert "letters, digits" in resp.json()["error"] and "^" not in resp.text, resp.text
    dest = {"onSuccess": {"kind": "subject", "target": "kt.x"}}
    body = {"metadata": {"name": "f"}, "spec": {"function": "f", "destinationConfig": dest}}
    resp = await api.http.put("/v1/asyncconfigs/f", json=body)
    assert resp.status_code == 422 and "^" not in resp.text, resp.text


async def test_what_would_reach_exec_is_what_exec_takes(
    api: Api, settings: Settings, tokens_file: Path, nats_passwords: dict[str, str]
) -> None:
    """No process can be given an argument, a variable or a directory with a NUL byte in it, be
    a program without a name, or be given an argument, a variable or a path longer than the
    kernel takes (counted in bytes, as it counts): a function with any of these was accepted
    and then failed every attempt at its start (`Argument list too long`)."""
    arg, var, path = 131_071, 131_007, 4_095  # the kernel's bounds, without the NUL
    refused: list[tuple[dict[str, Any], str]] = [
        ({"command": ["tr\x00ue"]}, "spec.command.0"),
        ({"command": ["true", "a\x00"]}, "spec.command.1"),
        ({"server": {"command": ["srv\x00"]}}, "spec.server.command.0"),
        ({"command": ["true"], "env": [{"name": "A", "value": "x\x00y"}]}, "spec.env.0.value"),
        ({"command": ["true"], "workingDir": "/tmp\x00"}, "spec.workingDir"),
        # Nor be started as a program with no name.
        ({"command": [""]}, "spec.command"),
        ({"server": {"command": ["", "serve"]}}, "spec.server.command"),
        # Nor be given more than the kernel takes.
        ({"command": ["echo", "a" * (arg + 1)]}, "spec.command.1"),
        ({"command": ["echo", "\u20ac" * (arg // 3 + 1)]}, "spec.command.1"),
        ({"command": ["/" + "a" * path]}, "spec.command"),
        ({"server": {"command": ["/" + "\u00e9" * (path // 2 + 1)]}}, "spec.server.command"),
        ({"command": ["true"], "env": [{"name": "A", "value": "b" * (var - 1)}]}, "spec.env.0"),
        ({"command": ["true"], "env": [{"name": "A" * var, "value": ""}]}, "spec.env.0"),
        ({"command": ["true"], "workingDir": "/" + "d" * path}, "spec.workingDir"),
    ]
    # A body as large as the default allows: the tests' gateway takes a quarter of it.
    roomy = dataclasses.replace(
        as_user(settings, "gateway", nats_passwords), max_payload_bytes=256 * 1024
    )
    async with (
        gateway(roomy, tokens_file) as url,
        httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {api.token}"}, timeout=30
        ) as http,
    ):
        for spec, field in refused:
            body = {"metadata": {"name": "nul"}, "spec": spec}
            resp = await http.put("/v1/functions/nul", json=body)
            assert resp.status_code == 422 and resp.json()["field"] == field, resp.text[:300]
            _check_error_body(resp)
        assert (await http.get("/v1/functions/nul")).status_code == 404
        # At the bounds, what is accepted starts.
        spec = {
            "command": ["sh", "-c", 'echo "${#1} ${#B}"', "sh", "a" * arg],
            "env": [{"name": "B", "value": "b" * (var - 2)}],
        }
        resp = await http.put(
            "/v1/functions/longest", json={"metadata": {"name": "longest"}, "spec": spec}
        )
        assert resp.status_code == 200, resp.text[:300]
    await api.submit("longest", task_id="longest-1")
    task = await api.wait("longest-1")
    assert task["status"]["phase"] == "Succeeded", task["status"]
    assert str(task["status"]["result"]).split() == [str(arg), str(var - 2)], task["status"]


async def _put_destination(api: Api, when: str, kind: str, target: str) -> Any:
    """PUT the async config `c` of function `f` with one destination."""
    destination = {when: {"kind": kind, "target": target}}
    body = {"metadata": {"name": "c"}, "spec": {"function": "f", "destinationConfig": destination}}
    return await api.http.put("/v1/asyncconfigs/c", json=body)


async def test_what_reaches_an_http_request_line_is_one_well_formed_target(api: Api) -> None:
    """A warm instance's paths and a webhook URL are written into HTTP requests: a space, CR or
    LF in them would split or rewrite the request, and the HTTP client quietly drops or quotes
    what it does not like, so a different URL than the one registered would be asked."""
    for field, path in (
        ("invokePath", "/run now"),
        ("invokePath", "/run\r\nX-Injected: 1"),
        ("readinessPath", "/health\n"),
        ("readinessPath", "healthz"),
        ("invokePath", "/caf\u00e9"),
        ("invokePath", "/" + "a" * 3000),
    ):
        server = {"command": ["true"], field: path}
        body = {"metadata": {"name": "srv"}, "spec": {"server": server}}
        resp = await api.http.put("/v1/functions/srv", json=body)
        assert resp.status_code == 422, (path, resp.text)
        assert resp.json()["field"] == f"spec.server.{field}", resp.text
        _check_error_body(resp)
    server = {"command": ["true"], "invokePath": "/v1/run?mode=async&x=%20", "readinessPath": "/"}
    ok = await api.http.put(
        "/v1/functions/srv", json={"metadata": {"name": "srv"}, "spec": {"server": server}}
    )
    assert ok.status_code == 200, ok.text

    await api.function("f", command=["true"])
    for target in (
        "http://example.test/a b",
        "http://example.test/a\r\nHost: elsewhere",
        "http://user:secret@example.test/",
        "http://example.test:99999/",
        "http:///nohost",
        "http://",
        "https://ex ample.test/",
        "http://example.test/\u00e9",
        "http://example.test/\x00",
        "javascript:alert(1)",
    ):
        resp = await _put_destination(api, "onSuccess", "webhook", target)
        assert resp.status_code == 422, (target, resp.text)
        _check_error_body(resp)
    for target in ("https://example.test", "http://[::1]:8080/h?x=1&y=%2F", "http://10.0.0.1/h#f"):
        await api.async_config(
            "c",
            function="f",
            destinationConfig={"onSuccess": {"kind": "webhook", "target": target}},
        )


async def test_labels_and_annotation_keys_follow_the_kubernetes_grammar(api: Api) -> None:
    """The same objects are applied with kubectl, where the API server holds them to it."""
    good = {"app": "x", "example.com/tier": "gold-1", "empty": ""}
    body = {"metadata": {"name": "lab", "labels": good, "annotations": {"a/b": "any text"}}}
    body["spec"] = {"command": ["true"]}
    made = await api.http.put("/v1/functions/lab", json=body)
    assert made.status_code == 200 and made.json()["metadata"]["labels"] == good, made.text
    for meta in (
        {"labels": {"app": "x" * 64}},
        {"labels": {"app": "a b"}},
        {"labels": {"-app": "x"}},
        {"labels": {"Example.com/app": "x"}},
        {"labels": {"k" * 300: "x"}},
        {"annotations": {"a b": "x"}},
    ):
        body = {"metadata": {"name": "lab", **meta}, "spec": {"command": ["true"]}}
        resp = await api.http.put("/v1/functions/lab", json=body)
        assert resp.status_code == 422, (meta, resp.text)
        _check_error_body(resp)


async def test_a_pod_kubernetes_would_refuse_is_refused_at_registration(api: Api) -> None:
    """What a function asks of its pod follows Kubernetes' pod rules, so a function is refused
    when it is registered, not when its first attempt's pod is (the CRD has the same rules as
    CEL: e2e/test_crds.py)."""
    good: list[dict[str, Any]] = [
        {"tolerations": [{"operator": "Exists"}]},
        {"tolerations": [{"key": "a", "effect": "NoExecute", "tolerationSeconds": -5}]},
        {"tolerations": [{"key": "a", "operator": "Equal", "value": "b"}]},
        {"resources": {"requests": {"memory": "1Gi", "cpu": "500m"}, "limits": {"memory": "1Gi"}}},
        {"resources": {"requests": {"cpu": "1e3"}, "limits": {"cpu": "1001", "memory": "7Ei"}}},
    ]
    bad: list[dict[str, Any]] = [
        {"tolerations": [{"operator": "Equal", "value": "x"}]},
        {"tolerations": [{"value": "x"}]},
        {"tolerations": [{"key": "a", "operator": "Exists", "value": "x"}]},
        {"tolerations": [{"key": "a", "tolerationSeconds": 5}]},
        {"tolerations": [{"key": "a", "effect": "NoSchedule", "tolerationSeconds": 5}]},
        {"tolerations": [{"key": "a", "effect": "NoExecute", "tolerationSeconds": 2**53 + 1}]},
        {"resources": {"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}},
        {"resources": {"requests": {"cpu": "1001m"}, "limits": {"cpu": "1"}}},
        {"resources": {"limits": {"memory": "1e999"}}},
        {"resources": {"limits": {"memory": "1e99999999999999999999"}}},  # was a 500
        {"resources": {"requests": {"cpu": "99039198335350046035.935E0993621502102836"}}},
        {"resources": {"requests": {"memory": "8Ei"}}},
        {"resources": {"limits": {"memory": "1K"}}},
        {"resources": {"limits": {"memory": "1mi"}}},
    ]
    for extra in good:
        resp = await api.http.put(
            "/v1/functions/podded",
            json={"metadata": {"name": "podded"}, "spec": {"command": ["true"], **extra}},
        )
        assert resp.status_code == 200, (extra, resp.text)
    for extra in bad:
        resp = await api.http.put(
            "/v1/functions/podded",
            json={"metadata": {"name": "podded"}, "spec": {"command": ["true"], **extra}},
        )
        assert resp.status_code == 422, (extra, resp.text)
        _check_error_body(resp)
    kept = (await api.http.get("/v1/functions/podded")).json()["spec"]
    assert kept["resources"] == good[-1]["resources"], kept


async def test_strict_input(api: Api) -> None:
    await api.function("f", command=["true"])
    for raw in (b'{"function": "f", "payload": NaN}', b'{"function": "f", "payload": [Infinity]}'):
        resp = await api.http.post(
            "/v1/tasks", content=raw, headers={"content-type": "application/json"}
        )
        assert resp.status_code == 400, resp.text
        _check_error_body(resp)
    resp = await api.http.post(
        "/v1/tasks",
        content=b'{"function": "f", "payload": 1e400}',
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == 422, resp.text
    for headers in (
        {"content-type": "text/plain"},
        {"content-type": "application/x-www-form-urlencoded"},
        {},
        # A body read as UTF-8 JSON as it arrives: one in another charset, or compressed, would
        # be parsed as something it is not.
        {"content-type": "application/json; charset=latin-1"},
        {"content-type": 'application/json; charset="utf-16"'},
        {"content-type": "application/json", "content-encoding": "gzip"},
        {"content-type": "application/json", "content-encoding": "br"},
    ):
        for method, path in (("POST", "/v1/tasks"), ("PUT", "/v1/functions/f")):
            body = {"function": "f"} if method == "POST" else {"spec": {"command": ["true"]}}
            resp = await api.http.request(
                method, path, content=json.dumps(body).encode(), headers=headers
            )
            assert resp.status_code == 415, (headers, resp.text)
            _check_error_body(resp)
    for headers in (
        {"content-type": "application/json; charset=UTF-8"},
        {"content-type": "application/json", "content-encoding": "identity"},
    ):
        resp = await api.http.post("/v1/tasks", json={"function": "f"}, headers=headers)
        assert resp.status_code == 202, (headers, resp.text)
    body = {"metadata": {"name": "g"}, "spec": {"command": ["true"], "timeoutSeconds": True}}
    resp = await api.http.put("/v1/functions/g", json=body)
    assert resp.status_code == 422 and "timeoutSeconds" in resp.text, resp.text
    body["spec"] = {"command": ["true"], "maxConcurrency": "3"}
    resp = await api.http.put("/v1/functions/g", json=body)
    assert resp.status_code == 422, resp.text
    for stamp in ("2026-01-01T00:00:00", "2026-01-01", "0.5", "yesterday"):
        resp = await api.http.get("/v1/tasks", params={"startedAfter": stamp})
        assert resp.status_code == 422, (stamp, resp.text)
        _check_error_body(resp)
    for method, path in (
        ("PATCH", "/v1/tasks"),
        ("GET", "/nowhere"),
        ("PUT", "/v1/tasks/x"),
        # Not redirected (it was, to whatever Host the client sent, with no body).
        ("GET", "/v1/tasks/"),
        ("POST", "/v1/tasks/"),
        ("GET", "/v1/functions/"),
    ):
        resp = await api.http.request(method, path, headers={"host": "elsewhere.example"})
        assert resp.status_code in (404, 405), (path, resp.status_code, resp.headers)
        assert "location" not in resp.headers, resp.headers
        _check_error_body(resp)
    resp = await api.http.request("PATCH", "/v1/tasks")
    assert set(resp.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "POST"}


async def test_a_query_parameter_a_route_does_not_take_is_refused(api: Api) -> None:
    """A misspelt filter was ignored, so `?stauts=Failed` listed every task; a parameter given
    twice kept one of its values without a word. Every /v1 route, the submit route too."""
    await api.function("f", command=["true"])
    await api.async_config("c", function="f")
    done = (await api.submit("f"))["metadata"]["name"]
    await api.wait(done)
    routes = [
        ("GET", "/v1/tasks"),
        ("HEAD", "/v1/tasks"),
        ("POST", "/v1/tasks"),
        ("GET", f"/v1/tasks/{done}"),
        ("GET", f"/v1/tasks/{done}/events"),
        ("GET", f"/v1/tasks/{done}/logs"),
        ("POST", f"/v1/tasks/{done}/pause"),
        ("GET", "/v1/functions"),
        ("GET", "/v1/functions/f"),
        ("DELETE", "/v1/functions/f"),
        ("GET", "/v1/asyncconfigs"),
        ("GET", "/v1/asyncconfigs/c"),
        ("DELETE", "/v1/asyncconfigs/c"),
        ("GET", "/v1/limits"),
    ]
    for method, path in routes:
        kw: dict[str, Any] = {"json": {"function": "f"}} if method == "POST" else {}
        for query, field in (
            ("stauts=Failed", "query.stauts"),
            ("account=&account=", "query.account"),
            ("%FF=1", "query.\ufffd"),
        ):
            resp = await api.http.request(method, f"{path}?{query}", **kw)
            assert resp.status_code == 422, (method, path, query, resp.text)
            if method != "HEAD":
                _check_error_body(resp)
                assert resp.json()["field"] == field, resp.text
    listed = await api.http.get("/v1/tasks", params={"status": "Failed", "limit": 5})
    assert listed.status_code == 200 and listed.json()["items"] == []
    taken = await api.http.get("/v1/tasks", params={"idPrefix": done, "account": ""})
    assert [t["metadata"]["name"] for t in taken.json()["items"]] == [done]
    resp = await api.http.get("/v1/tasks?limit=1&limit=2")
    assert "given more than once" in resp.json()["error"], resp.text
    resp = await api.http.get("/v1/tasks?bogus=1")
    assert "this route takes: account, cursor, function" in resp.json()["error"], resp.text
    async with httpx.AsyncClient(base_url=api.http.base_url) as stranger:
        assert (await stranger.get("/v1/tasks?bogus=1")).status_code == 401
        # Probes and scrapers are configured elsewhere: they may add what they like.
        assert (await stranger.get("/healthz?probe=1")).status_code == 200
    assert (await api.http.get("/metrics?name[]=up")).status_code == 200
    for method, path in (("POST", "/v1/tasks"), ("GET", "/v1/asyncconfigs/c")):
        kw = {"json": {"function": "f"}} if method == "POST" else {}
        resp = await api.http.request(method, f"{path}?account=", **kw)
        assert resp.status_code in (200, 202), resp.text
    mine = (await api.http.get("/v1/asyncconfigs/c")).json()
    assert mine == (await api.http.get("/v1/asyncconfigs")).json()[0]
    assert (await api.http.get("/v1/asyncconfigs/none")).status_code == 404


async def test_another_accounts_token_reaches_nothing(
    make_api: Callable[..., Awaitable[Api]],
) -> None:
    owner, other = await make_api(), await make_api()
    await owner.function("mine", command=["sleep", "30"])
    await owner.async_config("mine", function="mine", maxAsyncRetryAttempts=1)
    await owner.submit("mine", task_id="t1")
    await owner.wait("t1", {"Running"})
    before = await owner.get("t1")
    acct = {"account": owner.account}
    body_fn = {"metadata": {"name": "mine", "namespace": owner.account}, "spec": {"command": ["x"]}}
    body_cfg = {
        "metadata": {"name": "mine", "namespace": owner.account},
        "spec": {"function": "mine"},
    }
    attempts: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/v1/tasks/t1", {}),
        ("GET", "/v1/tasks/t1/logs", {}),
        ("POST", "/v1/tasks/t1/stop", {}),
        ("POST", "/v1/tasks/t1/pause", {}),
        ("POST", "/v1/tasks/t1/resume", {}),
        ("DELETE", "/v1/tasks/t1", {}),
        ("GET", "/v1/functions/mine", {}),
        ("GET", "/v1/asyncconfigs/mine", {}),
        ("DELETE", "/v1/functions/mine", {}),
        ("DELETE", "/v1/asyncconfigs/mine", {}),
        ("PUT", "/v1/functions/mine", {"json": body_fn}),
        ("PUT", "/v1/asyncconfigs/mine", {"json": body_cfg}),
        ("GET", "/v1/tasks", {}),
        ("GET", "/v1/functions", {}),
        ("GET", "/v1/asyncconfigs", {}),
        ("POST", "/v1/tasks", {"json": {"function": "mine"}}),
    ]
    for method, path, kw in attempts:
        for params in ({}, acct):
            resp = await other.http.request(method, path, params=params, **kw)
            if params or method in ("POST", "PUT", "DELETE") or "/t1" in path or "/mine" in path:
                assert resp.status_code == 404, (method, path, params, resp.text)
                _check_error_body(resp)
            else:  # lists of its own account: none of the owner's objects
                assert resp.status_code == 200, resp.text
                assert owner.account not in resp.text
    after = await owner.get("t1")
    assert after["status"] == before["status"]
    assert (await owner.call("GET", "/v1/functions/mine", 200))["spec"]["command"] == [
        "sleep",
        "30",
    ]
    await owner.call("POST", "/v1/tasks/t1/stop", 200)


async def test_metrics_show_an_account_only_its_own_series(
    make_api: Callable[..., Awaitable[Api]],
) -> None:
    """The gateway's /metrics was open to all and labelled by account and function: any tenant
    (or anyone who could reach the gateway) read every other tenant's names and volumes."""
    one, two, admin = await make_api(), await make_api(), await make_api(admin=True)
    for api in (one, two):
        await api.function("counted", command=["true"])
        await api.wait((await api.submit("counted"))["metadata"]["name"])
    mine = await one.http.get("/metrics")
    assert mine.status_code == 200
    assert f'kubetask_tasks_submitted_total{{account="{one.account}",function="counted"}}' in (
        mine.text
    )
    assert two.account not in mine.text
    assert "process_cpu_seconds_total" in mine.text  # the platform's series stay
    async with httpx.AsyncClient(base_url=one.http.base_url) as nobody:
        anonymous = await nobody.get("/metrics")
    assert anonymous.status_code == 200 and 'account="' not in anonymous.text
    assert "# TYPE kubetask_tasks_submitted_total counter" in anonymous.text
    forged = await one.http.get("/metrics", headers={"Authorization": "Bearer kt_forged"})
    assert forged.status_code == 401
    _check_error_body(forged)
    everything = (await admin.http.get("/metrics")).text
    assert f'account="{one.account}"' in everything and f'account="{two.account}"' in everything
    only = await admin.http.get("/metrics", params={"name[]": "kubetask_tasks_submitted_total"})
    assert f'account="{one.account}"' in only.text and "process_cpu" not in only.text
    scraped = await one.http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert f'account="{one.account}"' in scraped.text and f'account="{two.account}"' in scraped.text


async def test_a_deleted_functions_series_go_with_it(api: Api) -> None:
    """Series were never dropped: registering and deleting functions under new names grew
    every process's memory and every scrape without bound, from one account."""

    async def series() -> list[str]:
        page = (await api.http.get("/metrics")).text
        return [line for line in page.splitlines() if f'account="{api.account}"' in line]

    for i in range(20):
        await api.function(f"churn-{i}", command=["true"])
        await api.wait((await api.submit(f"churn-{i}"))["metadata"]["name"])
    assert any('function="churn-19"' in line for line in await series())
    for i in range(20):
        await api.call("DELETE", f"/v1/functions/churn-{i}", 204)
    for _ in range(100):  # every process hears of the deletions from the registry's bucket
        left = [line for line in await series() if 'function="churn-' in line]
        if not left:
            break
        await asyncio.sleep(0.1)
    assert left == []


async def test_a_dispatchers_metrics_need_the_metrics_token(api: Api) -> None:
    """A dispatcher's metrics port is reachable from tenants' code (a process beside it, a pod
    in the cluster): without the metrics token it shows only the platform's series."""
    await api.function("scraped", command=["true"])
    await api.wait((await api.submit("scraped"))["metadata"]["name"])
    port = free_port()
    server = metrics.serve(port, "127.0.0.1", METRICS_TOKEN)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            series = f'kubetask_tasks_succeeded_total{{account="{api.account}",function="scraped"}}'
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": api.token}):
                page = await http.get("/metrics", headers=headers)
                assert page.status_code == 200 and 'account="' not in page.text, headers
                assert "# TYPE kubetask_tasks_succeeded_total counter" in page.text
            scraper = {"Authorization": f"Bearer {METRICS_TOKEN}"}
            full = await http.get("/metrics", headers=scraper)
            assert series in full.text
            only = await http.get(
                "/metrics", headers=scraper, params={"name[]": "kubetask_tasks_succeeded_total"}
            )
            assert series in only.text and "process_cpu_seconds_total" not in only.text
    finally:
        server.shutdown()
        server.server_close()


async def test_a_dispatchers_metrics_port_holds_a_bounded_share_of_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each connection to a dispatcher's metrics port is a thread, and one that sent nothing
    was kept for good: tenants' code (which can reach the port) could have run the
    dispatcher out of threads. Past its share an address's new connection is closed at once,
    another address is served meanwhile, and idle ones are closed after a while."""
    monkeypatch.setattr(metrics._Quiet, "timeout", 3.0)
    port = free_port()
    server = metrics.serve(port, "0.0.0.0", METRICS_TOKEN)

    def scrape(source: str) -> Awaitable[bytes]:
        return from_address(source, port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")

    try:
        held = [
            await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.3", 0))
            for _ in range(metrics.METRICS_PER_PEER)
        ]
        for _ in range(100):  # the server's thread takes them in (its listen backlog is 5)
            if server.shares.held["127.0.0.3"] == metrics.METRICS_PER_PEER:
                break
            await asyncio.sleep(0.05)
        assert await scrape("127.0.0.3") == b""  # closed, nothing said
        assert b"process_cpu_seconds_total" in await scrape("127.0.0.4")
        for reader, _ in held:  # sent nothing for three seconds: each is closed
            assert await asyncio.wait_for(reader.read(), 5) == b""
        assert b"process_cpu_seconds_total" in await scrape("127.0.0.3")
        for _, writer in held:
            writer.close()
    finally:
        server.shutdown()
        server.server_close()


async def test_one_account_cannot_hold_every_log_stream(
    make_api: Callable[..., Awaitable[Api]],
) -> None:
    """Each log read holds a subscription on the gateway's connection (a followed one as long
    as its task runs): one account's reads are capped (429), its neighbour's go on, and a
    closed read frees its place."""
    greedy, neighbour = await make_api(), await make_api()
    for api in (greedy, neighbour):
        await api.function("long", command=["sleep", "30"])
        await api.submit("long", task_id="t")
        await api.wait("t", {"Running"})
    for _ in range(2 * LOG_STREAMS):  # a read that ends gives its place back
        assert (await greedy.http.get("/v1/tasks/t/logs")).status_code == 200
    async with contextlib.AsyncExitStack() as streams:
        for _ in range(LOG_STREAMS):
            resp = await streams.enter_async_context(
                greedy.http.stream("GET", "/v1/tasks/t/logs", params={"follow": "true"})
            )
            assert resp.status_code == 200
        refused = await greedy.http.get("/v1/tasks/t/logs")
        assert refused.status_code == 429 and refused.headers["Retry-After"], refused.text
        _check_error_body(refused)
        assert (await neighbour.http.get("/v1/tasks/t/logs")).status_code == 200
        limits = (await greedy.http.get("/v1/limits")).json()
        assert (limits["logStreams"], limits["maxLogStreams"]) == (LOG_STREAMS, LOG_STREAMS)
        assert (await neighbour.http.get("/v1/limits")).json()["logStreams"] == 0
    for _ in range(50):  # the gateway sees the streams close
        if (await greedy.http.get("/v1/tasks/t/logs")).status_code == 200:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("closed log streams were never given back")
    assert (await greedy.http.get("/v1/limits")).json()["logStreams"] == 0
    for api in (greedy, neighbour):
        await api.call("POST", "/v1/tasks/t/stop", 200)


async def test_reading_trails_and_logs_fast_leaves_their_streams_readable(
    make_api: Callable[..., Awaitable[Api]], plane: DataPlane
) -> None:
    """Each read of a trail or a log was a consumer on the stream every account shares, and
    nats-server kept each for seconds after its read; a stream takes at most 1,000: one account
    reading a few hundred a second filled it, and every account's reads were a 500. Reads now
    take no consumer at all (`direct_reads.py`)."""
    consumers = {
        stream: (await plane.js.stream_info(stream)).state.consumer_count
        for stream in (names.EVENTS_STREAM, names.LOGS_STREAM)
    }
    reader, neighbour = await make_api(), await make_api()
    for api in (reader, neighbour):
        await api.function("chatty", command=["sh", "-c", "echo one >&2; echo two >&2"])
        await api.wait((await api.submit("chatty", task_id="t"))["metadata"]["name"])
    statuses: dict[int, int] = {}

    async def read(path: str, times: int) -> None:
        for _ in range(times):
            resp = await reader.http.get(path)
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1

    await asyncio.gather(
        *(read("/v1/tasks/t/events", 100) for _ in range(12)),
        *(read("/v1/tasks/t/logs", 100) for _ in range(LOG_STREAMS)),
    )
    assert statuses == {200: 1200 + 100 * LOG_STREAMS}, statuses
    assert len(await neighbour.call("GET", "/v1/tasks/t/events", 200)) == 3
    logs = (await neighbour.http.get("/v1/tasks/t/logs")).text
    assert "one" in logs and "two" in logs, logs
    for _ in range(20):  # a HEAD ends its answer before the log is read
        assert (await reader.http.head("/v1/tasks/t/logs")).status_code == 200
    for stream, count in consumers.items():  # none was made, none left behind
        assert (await plane.js.stream_info(stream)).state.consumer_count == count, stream


async def test_trails_and_logs_are_read_when_their_streams_hold_every_consumer_they_may(
    api: Api, plane: DataPlane
) -> None:
    """Filled for real (nats-server allows a stream 1,000 consumers): reads were refused
    (a 503) until there was room, whoever had taken it. They no longer need any."""
    await api.function("chatty", command=["sh", "-c", "echo one >&2"])
    await api.wait((await api.submit("chatty", task_id="t"))["metadata"]["name"])
    held: list[tuple[str, Any]] = []
    try:
        for stream, subject in (
            (names.EVENTS_STREAM, names.event_subject(api.account, "t")),
            (names.LOGS_STREAM, names.log_subject(api.account, "t")),
        ):
            with contextlib.suppress(BadRequestError):
                while True:
                    held.append((stream, await plane.js.subscribe(subject, stream=stream)))
            with pytest.raises(BadRequestError):  # full
                await plane.js.subscribe(subject, stream=stream)
        trail = await api.call("GET", "/v1/tasks/t/events", 200)
        assert [e["phase"] for e in trail] == ["Queued", "Running", "Succeeded"], trail
        log = await api.http.get("/v1/tasks/t/logs")
        assert log.status_code == 200 and '"line": "one"' in log.text, log.text
        followed = await api.http.get("/v1/tasks/t/logs", params={"follow": "true"})
        assert followed.status_code == 200 and '"final": true' in followed.text, followed.text
    finally:
        for stream, sub in held:
            consumer = sub._consumer
            await sub.unsubscribe()
            await plane.js.delete_consumer(stream, consumer)


async def test_head_is_the_get_without_its_body_and_ends_a_stream_at_once(api: Api) -> None:
    """HTTP asks every GET to answer HEAD too. A HEAD of a followed log (a task that prints
    nothing) must not wait for the stream to end, nor keep one of the account's log reads."""
    await api.function("quiet", command=["sleep", "30"])
    await api.submit("quiet", task_id="q")
    await api.wait("q", {"Running"})
    for path in ("/healthz", "/v1/tasks", "/v1/tasks/q", "/v1/functions", "/v1/tasks/nope"):
        got, head = await api.http.get(path), await api.http.head(path)
        assert head.status_code == got.status_code and head.content == b"", (path, head)
        assert head.headers["content-type"] == got.headers["content-type"], path
    got, head = await api.http.get("/v1/tasks/q"), await api.http.head("/v1/tasks/q")
    assert head.headers["content-length"] == got.headers["content-length"]
    for _ in range(3 * LOG_STREAMS):
        head = await asyncio.wait_for(
            api.http.head("/v1/tasks/q/logs", params={"follow": "true"}), 5
        )
        if head.status_code == 429:  # the read a HEAD held is given back a moment later
            await asyncio.sleep(0.2)
            continue
        assert head.status_code == 200 and head.content == b"", head
    async with contextlib.AsyncExitStack() as streams:
        for _ in range(LOG_STREAMS):  # every read is free again
            resp = await streams.enter_async_context(
                api.http.stream("GET", "/v1/tasks/q/logs", params={"follow": "true"})
            )
            assert resp.status_code == 200
    refused = await api.http.delete("/v1/functions")
    assert refused.status_code == 405 and "HEAD" in refused.headers["allow"], refused.headers
    await api.call("POST", "/v1/tasks/q/stop", 200)


async def test_subject_destinations_stay_in_the_accounts_namespace(
    make_api: Callable[..., Awaitable[Api]], plane: DataPlane
) -> None:
    api, victim = await make_api(), await make_api()
    await api.function("f", command=["true"])
    refused = [
        f"kt.ctl.stop.{victim.account}.x",
        f"kt.q.{victim.account}.f",
        f"kt.qf.{victim.account}.f",
        f"kt.logs.{victim.account}.x",
        f"$KV.kt_tasks.{victim.account}.x",
        "$JS.API.STREAM.DELETE.KT_LOGS",
        "$SYS.REQ.SERVER.PING",
        "_INBOX.x",
        f"out.{victim.account}.stolen",
        f"out.{api.account}",
        f"out.{api.account}.*",
        f"out.{api.account}.>",
        f"out.{api.account}..x",
        f"out.{api.account}.a b",
        "orders",
        "x" * 300,
    ]
    for target in refused:
        for when in ("onSuccess", "onFailure"):
            resp = await _put_destination(api, when, "subject", target)
            assert resp.status_code == 422, (target, resp.text)
            _check_error_body(resp)
    # Its own namespace is accepted, and delivered to.
    got: list[bytes] = []

    async def collect(msg: Any) -> None:
        got.append(msg.data)

    sub = await plane.nc.subscribe(f"out.{api.account}.>", cb=collect)
    await api.async_config(
        "c",
        function="f",
        destinationConfig={"onSuccess": {"kind": "subject", "target": f"out.{api.account}.done"}},
    )
    await api.wait((await api.submit("f"))["metadata"]["name"])
    for _ in range(100):
        if got:
            break
        await asyncio.sleep(0.05)
    await sub.unsubscribe()
    assert got and json.loads(got[0])["requestContext"]["condition"] == "Success"


PROBE = """
import asyncio, json, os, sys
import nats

async def main():
    url = json.load(sys.stdin)["url"]
    seen = dict(os.environ)
    try:  # what the dispatcher that started us was given, where /proc lets us read it
        with open(f"/proc/{os.getppid()}/environ", "rb") as f:
            for i, item in enumerate(f.read().split(b"\\0")):
                seen[f"parent-{i}"] = item.decode(errors="replace").partition("=")[2]
    except OSError:
        pass
    guesses = [{}] + [
        {"user": user, "password": value}
        for user in ("admin", "gateway", "dispatcher", "destinations", "operator")
        for value in seen.values()
    ]
    connected = []
    for auth in guesses:
        try:
            nc = await nats.connect(url, allow_reconnect=False, connect_timeout=2, **auth)
        except Exception:
            continue
        connected.append(auth.get("user", "anonymous"))
        await nc.close()
    print(json.dumps({"tried": len(guesses), "connected": connected,
                      "nats_env": sorted(k for k in os.environ if "NATS" in k)}))

asyncio.run(main())
"""


async def test_a_function_process_cannot_connect_to_nats(api: Api, nats_url: str) -> None:
    await api.function("probe", command=api.script("probe", PROBE))
    task = await api.wait((await api.submit("probe", {"url": nats_url}))["metadata"]["name"])
    assert task["status"]["phase"] == "Succeeded", task["status"]["error"]
    result = task["status"]["result"]
    assert result["connected"] == [] and result["nats_env"] == [], result
    assert result["tried"] >= 1


async def test_requests_the_http_parser_refuses_get_the_error_body(gateway_url: str) -> None:
    host, port = gateway_url.removeprefix("http://").split(":")
    for raw in (
        b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
        b"GARBAGE\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(raw)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), answer
        assert b"content-type: application/json" in head.lower(), answer
        assert "malformed HTTP request" in json.loads(body)["error"]


async def _exchange(gateway_url: str, raw: bytes) -> tuple[bytes, Any]:
    """One request written as it is, byte for byte; its answer's head and JSON body."""
    host, port = gateway_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(raw)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(head.lower().partition(b"content-length: ")[2].partition(b"\r\n")[0])
    answer = json.loads(await asyncio.wait_for(reader.readexactly(length), 5))
    writer.close()
    return head, answer


async def test_framing_the_parser_lets_through_is_held_to_the_body_rules(
    gateway_url: str, api: Api
) -> None:
    """The HTTP parser takes `Transfer-Encoding: gzip, chunked` as chunked and hands over the
    gzip bytes; it stops at the headers of an upgrade, so a body sent with one vanished and the
    answer blamed the JSON; a WebSocket upgrade got a bare 403 with no error body; and a
    Content-Length with spaces around it, which HTTP allows, was called not a number."""
    await api.function("f", command=["true"])
    auth = f"Authorization: Bearer {api.token}\r\n".encode()
    body = b'{"function": "f"}'
    post = b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + auth
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    cases = [
        (post + b"Transfer-Encoding: gzip, chunked\r\n\r\n" + chunked, 415, "transfer coding"),
        (
            post
            + b"Connection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body,
            400,
            "cannot carry a body",
        ),
        (
            b"GET /v1/tasks?limit=1 HTTP/1.1\r\nHost: x\r\n" + auth + b"Connection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            200,
            None,
        ),
        (post + b"Content-Length:  %d \r\n\r\n" % len(body) + body, 202, None),
        (post + b"Transfer-Encoding: Chunked\r\n\r\n" + chunked, 202, None),
    ]
    for raw, status, error in cases:
        head, answer = await _exchange(gateway_url, raw)
        assert head.startswith(b"HTTP/1.1 %d" % status), (raw[:60], head, answer)
        if error is not None:
            assert error in answer["error"], answer
        assert b"content-type: application/json" in head.lower(), head


async def test_a_request_that_could_mean_two_things_is_refused(gateway_url: str, api: Api) -> None:
    """A key given twice in a JSON object, or a one-valued header given twice, was settled by
    whichever the parser took (the last key, the first header): a proxy or policy in front
    reading the other would see another request than the one served. Each is a 400 that says
    what was doubled, and nothing is created."""
    await api.function("f", command=["true"])
    await api.function("g", command=["true"])
    json_type = {"content-type": "application/json"}
    for raw, key in (
        (b'{"function": "f", "function": "g", "id": "two-1"}', "function"),
        (b'{"function": "f", "id": "two-2", "payload": {"a": [{"b": 1, "b": 1}]}}', "b"),
        (b'{"function": "f", "id": "two-3", "id": "two-4"}', "id"),
    ):
        resp = await api.http.post("/v1/tasks", content=raw, headers=json_type)
        assert resp.status_code == 400, resp.text
        assert f'duplicate key "{key}"' in resp.json()["error"], resp.text
        _check_error_body(resp)
    for n in range(1, 5):
        assert (await api.http.get(f"/v1/tasks/two-{n}")).status_code == 404
    for path, raw in (
        ("/v1/functions/h", b'{"metadata": {"name": "h"}, "spec": {"command": ["true"], '
         b'"command": ["sh"]}}'),
        ("/v1/asyncconfigs/f", b'{"metadata": {"name": "f"}, "spec": {"function": "f", '
         b'"maxAsyncRetryAttempts": 1, "maxAsyncRetryAttempts": 9}}'),
    ):  # fmt: skip
        resp = await api.http.put(path, content=raw, headers=json_type)
        assert resp.status_code == 400 and "duplicate key" in resp.json()["error"], resp.text
        _check_error_body(resp)
        assert (await api.http.get(path)).status_code == 404, path
    # The same documents without the doubled key are taken: the refusal is the key's alone.
    resp = await api.http.post("/v1/tasks", content=b'{"function": "g", "id": "two-1"}',
                               headers=json_type)  # fmt: skip
    assert resp.status_code == 202, resp.text
    raw = b'{"metadata": {"name": "h"}, "spec": {"command": ["true"]}}'
    assert (await api.http.put("/v1/functions/h", content=raw, headers=json_type)).is_success

    auth = f"Authorization: Bearer {api.token}\r\n".encode()
    body = b'{"function": "f"}'
    post = b"POST /v1/tasks HTTP/1.1\r\nContent-Length: %d\r\n" % len(body)
    once = {
        b"Host": b"Host: x\r\n",
        b"Authorization": auth,
        b"Content-Type": b"Content-Type: application/json\r\n",
        b"Content-Encoding": b"Content-Encoding: identity\r\n",
    }
    for doubled, line in once.items():
        headers = b"".join(v for k, v in once.items() if k != doubled)
        for second in (line, line.replace(b"x", b"y").replace(b"json", b"x-json")):
            head, answer = await _exchange(
                gateway_url, post + headers + line + second + b"\r\n" + body
            )
            assert head.startswith(b"HTTP/1.1 400"), (doubled, second, head, answer)
            assert answer["error"].startswith(f"header {doubled.decode()} is given more than once")
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    te = b"Transfer-Encoding: chunked\r\n"
    head, answer = await _exchange(
        gateway_url, post.split(b"Content-Length")[0] + b"".join(once.values()) + te + te
        + b"\r\n" + chunked
    )  # fmt: skip
    assert head.startswith(b"HTTP/1.1 400"), answer  # the parser's own refusal, or the guard's
    get = b"GET /v1/tasks?limit=1 HTTP/1.1\r\nHost: x\r\n" + auth
    head, answer = await _exchange(gateway_url, get + auth + b"\r\n")
    assert head.startswith(b"HTTP/1.1 400") and "Authorization" in answer["error"], answer
    head, answer = await _exchange(gateway_url, get + b"\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer
    head, answer = await _exchange(gateway_url, post + b"".join(once.values()) + b"\r\n" + body)
    assert head.startswith(b"HTTP/1.1 202"), answer


async def test_a_request_that_never_arrives_whole_is_answered_408(
    gateway_url: str, api: Api
) -> None:
    """A slow client holds a connection for at most the request timeout, however it trickles
    (slowloris): headers never finished, a body shorter than its length, a byte at a time."""
    host, port = gateway_url.removeprefix("http://").split(":")
    auth = f"Authorization: Bearer {api.token}\r\n".encode()
    head = b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\n" + auth

    async def answer(parts: list[bytes], pause: float = 0.0) -> tuple[bytes, float]:
        reader, writer = await asyncio.open_connection(host, int(port))
        started = asyncio.get_running_loop().time()
        reading = asyncio.create_task(reader.read())
        for part in parts:
            if reading.done():  # the gateway gave up on this request
                break
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(pause)
        data = await asyncio.wait_for(reading, REQUEST_TIMEOUT + 5)
        writer.close()
        return data, asyncio.get_running_loop().time() - started

    body = b'{"function": "echo", "payload": 1}'
    slow = await asyncio.gather(
        answer([head]),
        answer([head + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"]),
        answer([bytes([c]) for c in head], pause=0.3),
        # Within the limit, a body sent in two halves is taken as usual.
        answer(
            [
                head + b"Content-Type: application/json\r\nConnection: close\r\n",
                b"Content-Length: %d\r\n\r\n" % len(body) + body[:10],
                body[10:],
            ],
            pause=REQUEST_TIMEOUT / 4,
        ),
        answer([]),
        # Time counts from a request's first byte, not from the connection's opening: quiet
        # for most of the limit, then a request that takes half of it, past the opening's.
        answer(
            [
                b"",
                head + b"Content-Type: application/json\r\nConnection: close\r\n",
                b"Content-Length: %d\r\n\r\n" % len(body) + body,
            ],
            pause=REQUEST_TIMEOUT * 0.6,
        ),
    )
    for data, took in slow[:3]:
        status, _, rest = data.partition(b"\r\n")
        assert status == b"HTTP/1.1 408 Request Timeout", data
        assert "did not arrive whole" in json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
        assert REQUEST_TIMEOUT - 0.5 < took < REQUEST_TIMEOUT + 3, took
    for taken, _ in (slow[3], slow[5]):
        assert taken.startswith(b"HTTP/1.1 404"), taken  # `echo` is not registered: it was read
    idle, took = slow[4]
    assert idle == b"" and took < REQUEST_TIMEOUT + 3, (idle, took)
    assert (await api.http.get("/healthz")).status_code == 200


async def test_a_request_head_past_its_limit_is_431_and_bodies_do_not_count(
    gateway_url: str, api: Api
) -> None:
    """The HTTP parser gathered a header whole in memory, so one header sent endlessly grew the
    gateway by hundreds of megabytes until the request timeout. A head past 64 KiB is refused
    as it arrives; bodies, even several large ones in one read, are not counted as heads."""
    host, port = gateway_url.removeprefix("http://").split(":")
    await api.function("f", command=["true"])
    auth = f"Authorization: Bearer {api.token}\r\n".encode()

    async def exchange(first: bytes, more: bytes = b"", times: int = 0) -> bytes:
        reader, writer = await asyncio.open_connection(host, int(port))
        reading = asyncio.create_task(reader.read())
        with contextlib.suppress(ConnectionError):
            writer.write(first)
            for _ in range(times):
                if reading.done():
                    break
                writer.write(more)
                await writer.drain()
        data = await asyncio.wait_for(reading, REQUEST_TIMEOUT / 2)
        writer.close()
        return data

    get = b"GET /v1/tasks HTTP/1.1\r\nHost: x\r\n" + auth
    refused = await asyncio.gather(
        exchange(get + b"X-Endless: ", b"a" * 65536, times=400),
        exchange(get, b"X-Small: b\r\n" * 1000, times=100),
        exchange(b"GET /v1/tasks?idPrefix=", b"a" * 65536, times=400),
    )
    for data in refused:
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431"), data[:200]
        assert json.loads(body)["error"] == "the request line and headers exceed 65536 bytes"
    payload = json.dumps({"function": "f", "payload": "x" * 60_000}).encode()
    post = b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\n" + auth
    post += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(payload)
    near = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 50) for i in range(1000))  # 59,890 bytes
    last = post + near + b"Connection: close\r\n\r\n" + payload
    pipelined = await exchange((post + b"\r\n" + payload) * 3 + last)
    assert pipelined.count(b"HTTP/1.1 202 Accepted") == 4, pipelined.count(b"HTTP/1.1 ")
    assert (await api.http.get("/healthz")).status_code == 200


async def test_connections_past_the_limit_are_refused_with_the_error_body(
    api: Api, settings: Settings, tokens_file: Path, nats_passwords: dict[str, str]
) -> None:
    """Past its connection limit, every connection busy (a request on each, arriving), a
    gateway answers 503 at once rather than run out of file descriptors for NATS and its
    index; a connection that closes makes room again."""
    limited = dataclasses.replace(as_user(settings, "gateway", nats_passwords), max_connections=5)
    async with gateway(limited, tokens_file) as url:
        host, port = url.removeprefix("http://").split(":")
        held = [await asyncio.open_connection(host, int(port)) for _ in range(5)]
        for _, held_writer in held:
            held_writer.write(b"GET /healthz HTTP/1.1\r\n")  # begun, not finished
            await held_writer.drain()
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection(host, int(port))
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), answer
        assert b"retry-after: 1" in head.lower(), answer
        refused = json.loads(body)
        assert "connections open" in refused["error"] and refused["retryAfter"] == 1, refused
        for _, held_writer in held[1:]:
            held_writer.close()
        await asyncio.sleep(0.2)
        async with httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {api.token}"}
        ) as http:
            assert (await http.get("/v1/tasks")).status_code == 200
        held[0][1].close()


async def test_one_holder_of_every_connection_gives_an_idle_one_to_a_newcomer(
    make_api: Callable[..., Awaitable[Api]],
    settings: Settings,
    tokens_file: Path,
    nats_passwords: dict[str, str],
) -> None:
    """One account keeping the gateway's connections open (a request on each, then kept
    alive) made every other account's connection a 503. At the limit, the holder of the most
    now gives up an idle one; a connection busy with a request is never the one closed."""
    hog, neighbour = await make_api(), await make_api()
    limited = dataclasses.replace(as_user(settings, "gateway", nats_passwords), max_connections=6)
    async with gateway(limited, tokens_file) as url:
        host, port = url.removeprefix("http://").split(":")
        request = (
            f"GET /v1/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {hog.token}\r\n\r\n"
        ).encode()
        hogged = []
        for _ in range(5):  # idle after one request each
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split()[0]))
            hogged.append((reader, writer))
        busy_reader, busy = await asyncio.open_connection(host, int(port))
        busy.write(request[:20])  # a request arriving: not idle
        await busy.drain()
        await asyncio.sleep(0.1)
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(2):  # each newcomer, kept, takes the place of one of the hog's
                http = await stack.enter_async_context(
                    httpx.AsyncClient(
                        base_url=url, headers={"Authorization": f"Bearer {neighbour.token}"}
                    )
                )
                assert (await http.get("/v1/tasks")).status_code == 200
            busy.write(request[20:])
            assert (await busy_reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            await asyncio.sleep(0.2)
            # Closed at once, well before the 5 s keep-alive would close them too.
            closed = [reader for reader, _ in hogged if reader.at_eof()]
            assert len(closed) == 2, len(closed)
        for _, writer in hogged:
            writer.close()
        busy.close()


async def test_a_body_without_length_is_limited_as_it_arrives(api: Api) -> None:
    async def endless() -> Any:
        for _ in range(400):
            yield b"x" * 1024

    for method, path in (("POST", "/v1/tasks"), ("PUT", "/v1/functions/big")):
        resp = await api.http.request(
            method, path, content=endless(), headers={"content-type": "application/json"}
        )
        assert resp.status_code == 413, resp.text
        _check_error_body(resp)
    assert (await api.http.get("/healthz")).status_code == 200


async def test_a_hand_edited_token_outside_the_grammar_authenticates_nobody(
    api: Api, tokens_file: Any
) -> None:
    from kubetask.auth import hash_token

    data = json.loads(tokens_file.read_text())
    data["tokens"].append(
        {"name": "typo", "account": "Bad.Account 1!", "admin": False, "sha256": hash_token("kt_x")}
    )
    data["tokens"].append({"name": "wide", "account": None, "sha256": hash_token("kt_y")})
    tokens_file.write_text(json.dumps(data))
    for token in ("kt_x", "kt_y"):
        resp = await api.http.get("/v1/tasks", headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 401, resp.text
    assert (await api.http.get("/v1/tasks")).status_code == 200  # the file still works
