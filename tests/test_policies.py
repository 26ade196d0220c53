"""Retries, destinations, max event age and de-duplication, against a real JetStream."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from harness import (
    DENIED_WEBHOOK_HOST,
    Api,
    as_user,
    echo_script,
    gateway,
    kt,
    read_lines,
    web_server,
)
from kubetask.dispatch import destination_chains
from kubetask.dispatch.destination_chains import DEPTH
from kubetask.dispatch.webhooks import (
    DELIVERIES_PER_ACCOUNT,
    WebhookFailed,
    WebhookRefused,
    Webhooks,
)
from kubetask.models import Task, TaskMeta, TaskSpec
from kubetask.networks import parse_networks
from kubetask.plane import DataPlane
from kubetask.settings import Settings
from prometheus_client import REGISTRY


async def _collect(plane: DataPlane, subject: str) -> tuple[list[dict[str, Any]], Any]:
    got: list[dict[str, Any]] = []

    async def cb(msg: Any) -> None:
        got.append(json.loads(msg.data))

    sub = await plane.nc.subscribe(subject, cb=cb)
    return got, sub


async def _eventually(check: Any, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_failure_is_retried_exactly_n_times_then_on_failure_gets_the_record(
    api: Api, plane: DataPlane
) -> None:
    runs = api.workdir / "runs.log"
    argv = api.script(
        "flaky",
        f"""
        import os, sys
        with open({str(runs)!r}, "a") as f:
            f.write(os.environ["KUBETASK_ATTEMPT"] + "\\n")
        print("partial output")
        print("boom", file=sys.stderr)
        sys.exit(3)
    """,
    )
    subject = f"out.{api.account}.dlq"
    got, sub = await _collect(plane, subject)
    await api.function("flaky", command=argv)
    await api.async_config(
        "flaky-cfg",
        function="flaky",
        maxAsyncRetryAttempts=2,
        retryBackoff={"initialSeconds": 0.2, "multiplier": 2},
        destinationConfig={"onFailure": {"kind": "subject", "target": subject}},
    )
    task = await api.submit("flaky", {"order": 42}, task_id="order-42")
    done = await api.wait("order-42")
    assert done["status"]["phase"] == "Failed"
    assert done["status"]["attempts"] == 3
    error = done["status"]["error"]
    assert error.startswith("exited with code 3\n"), error
    assert "boom" in error and "partial output" in error, error
    assert done["status"]["exitCode"] == 3
    assert done["status"]["stderrTail"] == "boom\n"
    assert done["status"]["stdoutTail"] == "partial output\n"
    assert read_lines(runs) == ["1", "2", "3"]
    await _eventually(lambda: len(got) == 1)
    record = got[0]
    assert record["requestContext"] == {
        "requestId": task["metadata"]["name"],
        "functionArn": f"kt:{api.account}:function:flaky",
        "condition": "RetriesExhausted",
        "approximateInvokeCount": 3,
    }
    assert record["requestPayload"] == {"order": 42}
    assert record["responseContext"] == {"statusCode": 200, "functionError": "Unhandled"}
    assert record["responsePayload"] == {
        "errorMessage": "exited with code 3",
        "errorType": "ExitCode",
        "exitCode": 3,
        "stdoutTail": "partial output\n",
        "stderrTail": "boom\n",
    }
    await sub.unsubscribe()


async def test_zero_retries_means_one_attempt(api: Api) -> None:
    await api.function("once", command=["false"])
    await api.async_config("once", function="once", maxAsyncRetryAttempts=0)
    task = await api.submit("once")
    assert (await api.wait(task["metadata"]["name"]))["status"]["attempts"] == 1


async def test_retry_backoff_is_waited_out(api: Api) -> None:
    await api.function("slowretry", command=["false"])
    await api.async_config(
        "slowretry",
        function="slowretry",
        maxAsyncRetryAttempts=1,
        retryBackoff={"initialSeconds": 1.5},
    )
    task = await api.submit("slowretry")
    retrying = await api.wait(task["metadata"]["name"], {"Retrying", "Failed"})
    assert retrying["status"]["phase"] == "Retrying"
    assert retrying["status"]["nextAttemptAt"] is not None
    await asyncio.sleep(0.8)
    assert (await api.get(task["metadata"]["name"]))["status"]["phase"] == "Retrying"
    done = await api.wait(task["metadata"]["name"])
    assert done["status"]["attempts"] == 2


async def test_a_paused_retry_shows_no_next_attempt_and_resumes_at_once(api: Api) -> None:
    """A task paused while it waited out its backoff kept its `nextAttemptAt`, so `get` showed
    a next attempt that pausing had cancelled; resuming queues it at once."""
    await api.function("pausedretry", command=["false"])
    await api.async_config(
        "pausedretry", function="pausedretry", maxAsyncRetryAttempts=1,
        retryBackoff={"initialSeconds": 600},
    )  # fmt: skip
    task_id = (await api.submit("pausedretry"))["metadata"]["name"]
    retrying = await api.wait(task_id, {"Retrying", "Failed"})
    assert retrying["status"]["nextAttemptAt"] is not None, retrying["status"]
    paused = await api.call("POST", f"/v1/tasks/{task_id}/pause", 200)
    assert paused["status"]["nextAttemptAt"] is None, paused["status"]
    status = (await api.get(task_id))["status"]
    assert status["nextAttemptAt"] is None and status["waiting"]["reason"].startswith("paused")
    await api.call("POST", f"/v1/tasks/{task_id}/resume", 200)
    done = await api.wait(task_id, timeout=15)
    assert done["status"]["phase"] == "Failed" and done["status"]["attempts"] == 2


async def test_on_success_chains_into_a_second_function_with_the_result(api: Api) -> None:
    await api.function("second", command=echo_script(api))
    await api.function("first", command=["sh", "-c", "echo '{\"value\": 99}'"])
    await api.async_config(
        "first",
        function="first",
        destinationConfig={"onSuccess": {"kind": "function", "target": "second"}},
    )
    await api.submit("first", {"in": 1}, task_id="chain-1")
    assert (await api.wait("chain-1"))["status"]["phase"] == "Succeeded"
    chained = await api.wait("chain-1-on-success")
    record = chained["status"]["result"]["echo"]
    assert chained["spec"]["function"] == "second"
    assert record["responsePayload"] == {"value": 99}
    assert record["requestPayload"] == {"in": 1}
    assert record["requestContext"]["condition"] == "Success"
    assert record["requestContext"]["approximateInvokeCount"] == 1


async def _final_line(api: Api, task_id: str, timeout: float = 30) -> str:
    """The last line of a finished task's log, once the dispatcher has written it."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        logs = await api.http.get(f"/v1/tasks/{task_id}/logs")
        lines = [json.loads(line) for line in logs.text.splitlines()] if logs.is_success else []
        if lines and lines[-1].get("final"):
            return str(lines[-1]["line"])
        assert asyncio.get_running_loop().time() < deadline, logs.text
        await asyncio.sleep(0.1)


async def test_a_loop_of_destinations_ends_after_sixteen_and_says_so(api: Api) -> None:
    """A function whose failure goes to itself made a task of each failure until the derived
    id, cut to 128 characters, happened to come back to itself (13 tasks from `l1`),
    and nothing said why it stopped."""
    await api.function("selfloop", command=["false"])
    await api.async_config(
        "selfloop", function="selfloop", maxAsyncRetryAttempts=0,
        destinationConfig={"onFailure": {"kind": "function", "target": "selfloop"}},
    )  # fmt: skip
    await api.submit("selfloop", {"n": 0}, task_id="loop")
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        page = await api.call("GET", "/v1/tasks", params={"function": "selfloop", "limit": 100})
        ended = [t for t in page["items"] if t["status"]["phase"] == "Failed"]
        if len(ended) == len(page["items"]) == 17:
            break
        assert asyncio.get_running_loop().time() < deadline, [t["metadata"] for t in ended]
        await asyncio.sleep(0.2)
    depths = sorted(int(t["metadata"]["annotations"].get(DEPTH, 0)) for t in ended)
    assert depths == list(range(17)), depths
    last = next(t for t in ended if t["metadata"]["annotations"].get(DEPTH) == "16")
    said = await _final_line(api, last["metadata"]["name"])
    assert said.endswith(
        "its record was not sent to function selfloop: the task is the last of 16 destinations"
        " in a row (a loop?); task Failed"
    ), said
    await asyncio.sleep(1)
    page = await api.call("GET", "/v1/tasks", params={"function": "selfloop", "limit": 100})
    assert len(page["items"]) == 17


def test_a_depth_annotation_that_is_not_a_count_counts_as_none() -> None:
    """A Task applied with kubectl carries whatever annotations its author wrote; `²` passed
    `isdigit` and then failed `int`, in the dispatcher's terminal step."""
    for raw, expected in (("²", 0), ("١٢", 0), ("-1", 0), ("abc", 0), ("", 0), ("007", 7)):
        task = Task(
            metadata=TaskMeta(name="t", annotations={DEPTH: raw}), spec=TaskSpec(function="f")
        )
        assert destination_chains.depth(task) == expected, raw


async def test_a_pipeline_of_destinations_carries_a_long_id_to_its_end(
    api: Api, gateway_url: str
) -> None:
    """Once a derived id had been cut to 128 characters the next was the same id, so the third
    function of a pipeline never got a task for an id of 117 characters or more."""
    await api.function("stage3", command=echo_script(api))
    for name, then in (("stage2", "stage3"), ("stage1", "stage2")):
        await api.function(name, command=echo_script(api))
        await api.async_config(
            name, function=name,
            destinationConfig={"onSuccess": {"kind": "function", "target": then}},
        )  # fmt: skip
    first = "t" * 120
    await api.submit("stage1", {"in": 1}, task_id=first)
    deadline = asyncio.get_running_loop().time() + 30
    while not (page := await api.call("GET", "/v1/tasks", params={"function": "stage3"}))["items"]:
        assert asyncio.get_running_loop().time() < deadline, "stage3 got no task"
        await asyncio.sleep(0.1)
    last = await api.wait(page["items"][0]["metadata"]["name"])
    record = last["status"]["result"]["echo"]
    assert record["requestPayload"]["requestPayload"] == {"in": 1}, record
    ids = [first, record["requestContext"]["requestId"], last["metadata"]["name"]]
    assert len(set(ids)) == 3 and all(len(i) <= 128 for i in ids), ids
    shown = (await kt(api, gateway_url, "get", ids[2])).stdout
    assert f"record of: task {ids[1]}, delivered to this function (destination 2 of" in shown


async def test_a_destination_task_id_taken_by_another_task_is_said(api: Api) -> None:
    await api.function("taker", command=["true"])
    await api.function("giver", command=["true"])
    await api.async_config(
        "giver", function="giver",
        destinationConfig={"onSuccess": {"kind": "function", "target": "taker"}},
    )  # fmt: skip
    await api.submit("taker", task_id="mine-on-success")  # the client's own
    await api.submit("giver", task_id="mine")
    said = await _final_line(api, "mine")
    assert said.endswith(
        "its record was not sent to function taker: task id mine-on-success is another task's;"
        " task Succeeded"
    ), said
    # A delivery that made its task is not said to be taken.
    await api.submit("giver", task_id="again")
    assert (await _final_line(api, "again")).endswith("task Succeeded")
    assert (await api.wait("again-on-success"))["spec"]["function"] == "taker"


async def test_webhook_destination_is_retried_until_delivered(api: Api) -> None:
    calls: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        calls.append(await request.json())
        return web.Response(status=503 if len(calls) < 3 else 200)

    async with web_server(hook) as url:
        await api.function("hooked", command=["sh", "-c", "echo 5"])
        await api.async_config(
            "hooked",
            function="hooked",
            destinationConfig={"onSuccess": {"kind": "webhook", "target": f"{url}/hook"}},
        )
        task = await api.submit("hooked")
        await api.wait(task["metadata"]["name"])
        await _eventually(lambda: len(calls) == 3)
        assert all(c["responsePayload"] == 5 for c in calls)
        await asyncio.sleep(0.5)
        assert len(calls) == 3  # delivered once it succeeded, not again


async def test_a_webhook_in_a_denied_network_is_refused_or_never_called(
    api: Api, settings: Settings, tokens_file: Path, nats_passwords: dict[str, str]
) -> None:
    """The tests' gateway and dispatcher deny DENIED_WEBHOOK_HOST, as real ones deny the
    clouds' metadata addresses. Written as an address, in any form the resolver reads as
    one, the webhook is refused when it is registered (it would never be called). One
    registered before its network was denied (here: through a gateway that denies none) is
    refused at each delivery: the task still ends as it ran, and its log names the refusal."""
    calls: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        calls.append(request.path)
        return web.Response(status=200)

    host = ipaddress.IPv4Address(DENIED_WEBHOOK_HOST)
    async with web_server(hook, DENIED_WEBHOOK_HOST) as url:
        await api.function("guarded", command=["true"])
        port = url.rsplit(":", 1)[1]
        for written in (str(host), str(int(host)), hex(int(host)), f"[::ffff:{host}]"):
            target = f"http://{written}:{port}/hook"
            hook_spec = {"onSuccess": {"kind": "webhook", "target": target}}
            refused = await api.async_config(
                "guarded", expect=422, function="guarded", destinationConfig=hook_spec
            )
            assert "denied network" in refused["error"], refused
        open_to_all = dataclasses.replace(
            as_user(settings, "gateway", nats_passwords), webhook_denied_networks=()
        )
        async with (
            gateway(open_to_all, tokens_file) as other,
            httpx.AsyncClient(
                base_url=other, headers={"Authorization": f"Bearer {api.token}"}
            ) as http,
        ):
            body = {
                "metadata": {"name": "guarded"},
                "spec": {
                    "function": "guarded",
                    "destinationConfig": {
                        "onSuccess": {"kind": "webhook", "target": f"{url}/hook"}
                    },
                },
            }
            resp = await http.put("/v1/asyncconfigs/guarded", json=body)
            assert resp.status_code == 200, resp.text
        tid = (await api.submit("guarded"))["metadata"]["name"]
        assert (await api.wait(tid))["status"]["phase"] == "Succeeded"
        log = ""
        for _ in range(100):
            log = (await api.http.get(f"/v1/tasks/{tid}/logs")).text
            if "task Succeeded" in log:
                break
            await asyncio.sleep(0.05)
        assert "webhook was not called" in log and "denied network" in log, log
        assert calls == []


async def test_a_webhook_redirect_is_not_followed(api: Api) -> None:
    """A redirect could send the record anywhere after the address was checked."""
    elsewhere: list[str] = []
    asked: list[str] = []

    async def other(request: web.Request) -> web.Response:
        elsewhere.append(request.path)
        return web.Response(status=200)

    async with web_server(other) as other_url:

        async def hook(request: web.Request) -> web.Response:
            asked.append(request.path)
            raise web.HTTPTemporaryRedirect(f"{other_url}/stolen")

        async with web_server(hook) as url:
            await api.function("redirected", command=["true"])
            await api.async_config(
                "redirected",
                function="redirected",
                destinationConfig={"onSuccess": {"kind": "webhook", "target": f"{url}/hook"}},
            )
            await api.wait((await api.submit("redirected"))["metadata"]["name"])
            await _eventually(lambda: len(asked) >= 2)
    assert elsewhere == []


async def test_a_name_that_resolves_only_into_denied_networks_is_refused() -> None:
    """The check is on the addresses a name resolves to, not on how the URL spells the host."""
    calls: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        calls.append(request.path)
        return web.Response(status=204)

    async with web_server(hook) as url:
        port = url.rsplit(":", 1)[1]
        guarded = Webhooks(parse_networks("", "127.0.0.0/8,::1/128"))
        open_ = Webhooks(())
        try:
            with pytest.raises(WebhookRefused):
                await guarded.post("team-a", f"http://localhost:{port}/a", {}, {})
            assert calls == []
            assert await open_.post("team-a", f"http://localhost:{port}/b", {}, {}) == 204
            assert calls == ["/b"]
        finally:
            await guarded.close()
            await open_.close()


@contextlib.asynccontextmanager
async def _silent_server() -> AsyncIterator[tuple[str, list[socket.socket]]]:
    """A real server that takes connections and never answers: a tenant's webhook that hangs."""
    taken: list[socket.socket] = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    listener.setblocking(False)
    loop = asyncio.get_running_loop()

    async def take() -> None:
        while True:
            conn, _ = await loop.sock_accept(listener)
            taken.append(conn)

    accepting = asyncio.create_task(take())
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", taken
    finally:
        accepting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await accepting
        for conn in [*taken, listener]:
            conn.close()


async def test_a_failed_webhook_says_why_without_quoting_what_the_far_end_sent() -> None:
    """A webhook's error reaches its task's log. aiohttp's quoted an answer that was not HTTP,
    so a webhook pointed at a port inside the platform read back the greeting of whatever
    listened there (nats-server's INFO line, with its version, id and key). Real servers: one
    that greets in another protocol, one that closes at once, a closed port, a silent one."""
    greeting = b'INFO {"server_id":"SECRET-ID","version":"2.10"}\r\n'

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        await writer.drain()
        await reader.read(1)
        writer.close()

    async def hang_up(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    greeter = await asyncio.start_server(greet, "127.0.0.1", 0)
    closer = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    webhooks = Webhooks((), timeout=1)
    said = {}
    try:
        async with _silent_server() as (silent, _):
            targets = {
                "greeting": f"http://127.0.0.1:{greeter.sockets[0].getsockname()[1]}/",
                "hang-up": f"http://127.0.0.1:{closer.sockets[0].getsockname()[1]}/",
                "closed": f"http://127.0.0.1:{closed.getsockname()[1]}/",
                "silent": f"{silent}/",
            }
            for what, url in targets.items():
                with pytest.raises(WebhookFailed) as failed:
                    await webhooks.post("acct", url, {}, {})
                said[what] = str(failed.value)
    finally:
        await webhooks.close()
        for server in (greeter, closer):
            server.close()
        closed.close()
    assert not any("SECRET" in s or "INFO" in s for s in said.values()), said
    hung_up = said.pop("hang-up")  # uvloop says a reset, asyncio's loop a closed connection
    assert hung_up.startswith("the connection was closed before an answer"), hung_up
    assert said == {
        "greeting": "the answer was not well-formed HTTP",
        "closed": "cannot connect: Connection refused",
        "silent": "no answer within 1 s",
    }, said


async def test_webhooks_that_never_answer_hold_only_their_own_accounts_deliveries() -> None:
    """The connection pool held 100 connections for every account together: one account's
    webhooks that never answer took them all, and every other account's deliveries waited
    for one until they timed out. Real servers both."""
    answered: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        answered.append(request.path)
        return web.Response(status=204)

    webhooks = Webhooks((), timeout=8)
    try:
        async with _silent_server() as (silent, taken), web_server(hook) as url:
            hanging = [
                asyncio.create_task(webhooks.post("hoarder", f"{silent}/{i}", {}, {}))
                for i in range(150)
            ]
            for _ in range(100):  # as many as it may have in flight are connected
                if len(taken) >= DELIVERIES_PER_ACCOUNT:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            started = asyncio.get_running_loop().time()
            for i in range(5):
                assert await webhooks.post("neighbour", f"{url}/{i}", {}, {}) == 204
            assert asyncio.get_running_loop().time() - started < 4, "waited on the hoarder"
            assert answered == [f"/{i}" for i in range(5)]
            assert len(taken) == DELIVERIES_PER_ACCOUNT, len(taken)  # the hoarder's, at most
            for task in hanging:
                task.cancel()
            await asyncio.gather(*hanging, return_exceptions=True)
    finally:
        await webhooks.close()


async def test_a_webhook_name_that_takes_long_to_resolve_holds_only_its_own_account(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Webhook hosts were resolved on threads every lookup in the process shares: one
    account's webhooks behind a slow name server (a name each, since lookups of one name are
    shared) held every account's deliveries. A name server that slow cannot be set up here
    without changing the machine's resolver, so those lookups are faked: each blocks its
    thread for 6 s, as `getaddrinfo` does waiting on such a server."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if str(host).endswith(".slow-dns.test"):
            time.sleep(6)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    answered: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        answered.append(request.path)
        return web.Response(status=204)

    webhooks = Webhooks((), timeout=10)
    loop = asyncio.get_running_loop()
    try:
        async with web_server(hook) as url:
            port = url.rsplit(":", 1)[1]
            stuck = [
                asyncio.create_task(webhooks.post("slow", f"http://h{i}.slow-dns.test/", {}, {}))
                for i in range(40)
            ]
            await asyncio.sleep(0.3)
            started = loop.time()
            assert await webhooks.post("neighbour", f"http://localhost:{port}/n", {}, {}) == 204
            assert loop.time() - started < 3, "waited on the slow account's lookups"
            assert answered == ["/n"]
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
    finally:
        await webhooks.close()


def _expired(account: str, function: str) -> float:
    value = REGISTRY.get_sample_value(
        "AsyncEventExpiredDropped_total", {"account": account, "function": function}
    )
    return value or 0.0


async def test_tasks_older_than_max_age_are_dropped_unrun_and_counted(
    api: Api, plane: DataPlane
) -> None:
    ran = api.workdir / "ran.log"
    argv = api.script(
        "blocker",
        f"""
        import json, sys, time
        p = json.load(sys.stdin)
        open({str(ran)!r}, "a").write(str(p) + "\\n")
        time.sleep(2.5 if p == 0 else 0)
    """,
    )
    subject = f"out.{api.account}.expired"
    got, sub = await _collect(plane, subject)
    await api.function("aged", command=argv, maxConcurrency=1)
    await api.async_config(
        "aged",
        function="aged",
        maxAsyncEventAgeInSeconds=1,
        destinationConfig={"onFailure": {"kind": "subject", "target": subject}},
    )
    first = await api.submit("aged", 0)
    await api.wait(first["metadata"]["name"], {"Running"})
    later = [(await api.submit("aged", i))["metadata"]["name"] for i in range(1, 6)]
    results = [await api.wait(t) for t in later]
    assert {r["status"]["phase"] for r in results} == {"Expired"}
    assert all(r["status"]["attempts"] == 0 for r in results)
    assert "over the 1s limit" in results[0]["status"]["error"]
    assert (await api.wait(first["metadata"]["name"]))["status"]["phase"] == "Succeeded"
    assert read_lines(ran) == ["0"]  # none of the expired ones ran
    assert _expired(api.account, "aged") == 5
    await _eventually(lambda: len(got) == 5)
    assert {g["requestContext"]["condition"] for g in got} == {"EventAgeExceeded"}
    await sub.unsubscribe()


async def test_same_task_id_runs_once_even_after_the_dedup_window(api: Api) -> None:
    ran = api.workdir / "dedup.log"
    argv = api.script(
        "count",
        f"""
        open({str(ran)!r}, "a").write("run\\n")
    """,
    )
    await api.function("count", command=argv)
    first = await api.submit("count", {"v": 1}, task_id="trace-abc")
    resp = await api.http.post(
        "/v1/tasks", json={"function": "count", "id": "trace-abc", "payload": {"v": 2}}
    )
    assert resp.status_code == 409
    body = resp.json()
    assert "already exists" in body["error"]
    assert body["task"]["spec"]["payload"] == {"v": 1}
    await api.wait("trace-abc")
    await asyncio.sleep(1.5)  # the test platform's JetStream dedup window is 1 s
    again = await api.http.post("/v1/tasks", json={"function": "count", "id": "trace-abc"})
    assert again.status_code == 409
    await asyncio.sleep(0.5)
    assert read_lines(ran) == ["run"]
    assert first["metadata"]["name"] == "trace-abc"


async def test_async_config_changes_apply_without_restart(api: Api) -> None:
    await api.function("cfgd", command=["false"])
    await api.async_config("cfgd", function="cfgd", maxAsyncRetryAttempts=0)
    t1 = await api.submit("cfgd")
    assert (await api.wait(t1["metadata"]["name"]))["status"]["attempts"] == 1
    await api.async_config(
        "cfgd", function="cfgd", maxAsyncRetryAttempts=1, retryBackoff={"initialSeconds": 0}
    )
    t2 = await api.submit("cfgd")
    assert (await api.wait(t2["metadata"]["name"]))["status"]["attempts"] == 2


async def test_every_state_change_is_in_the_audit_stream(api: Api, plane: DataPlane) -> None:
    await api.function("audited", command=["false"])
    await api.async_config(
        "audited", function="audited", maxAsyncRetryAttempts=1, retryBackoff={"initialSeconds": 0}
    )
    tid = (await api.submit("audited", task_id="audit-1"))["metadata"]["name"]
    await api.wait(tid)
    sub = await plane.js.subscribe(
        f"kt.events.{api.account}.{tid}", stream="KT_EVENTS", ordered_consumer=True
    )
    phases: list[str] = []
    while True:
        try:
            msg = await sub.next_msg(timeout=1)
        except TimeoutError:
            break
        phases.append(json.loads(msg.data)["task"]["status"]["phase"])
    await sub.unsubscribe()
    assert phases == ["Queued", "Running", "Retrying", "Running", "Failed"]
