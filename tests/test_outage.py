"""NATS dies under load in `kubetask dev` (a real SIGKILL): it is restarted by the supervisor,
every submission gets either 202 or a 503 with Retry-After — never a 500, never a hang — every
accepted task completes, and Ctrl-C then stops the whole platform in under three seconds."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from harness import exited, parent_of, pids_running, running_dev
from kubetask.auth import issue_token
from kubetask.embedded import free_port, nats_server_binary, start_nats, wait_for_port

pytestmark = pytest.mark.slow

FUNCTIONS = """
apiVersion: kubetask.io/v1alpha1
kind: TaskFunction
metadata: {name: quick}
spec: {command: ["true"], maxConcurrency: 8}
"""


def _nats_pid(store: Path) -> int | None:
    pids = [p for p in pids_running(str(store).encode()) if p in pids_running(b"nats-server")]
    return pids[0] if pids else None


async def test_nats_killed_under_load_comes_back_and_nothing_is_lost(tmp_path: Path) -> None:
    async with running_dev(tmp_path, FUNCTIONS) as d:
        data, port, token, dev = d.data, d.port, d.token, d.proc
        first_nats = _nats_pid(data / "jetstream")
        assert first_nats is not None
        accepted: list[str] = []
        refused = 0
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=5,  # a hang fails the test
        ) as http:
            started = time.monotonic()
            killed = False
            while time.monotonic() - started < 6:
                if not killed and time.monotonic() - started > 1:
                    os.kill(first_nats, signal.SIGKILL)
                    killed = True
                resp = await http.post("/v1/tasks", json={"function": "quick"})
                if resp.status_code == 202:
                    accepted.append(resp.json()["metadata"]["name"])
                else:
                    assert resp.status_code == 503, resp.text
                    body = resp.json()
                    assert body["retryAfter"] >= 1 and resp.headers["retry-after"], body
                    refused += 1
                await asyncio.sleep(0.01)
            assert refused > 0, "the outage was not noticed"
            second_nats = _nats_pid(data / "jetstream")
            assert second_nats not in (None, first_nats), "nats-server was not restarted"
            assert "nats-server restarted" in (tmp_path / "dev.log").read_text()
            assert len(accepted) > 50
            deadline = time.monotonic() + 60
            pending = set(accepted)
            while pending:
                assert time.monotonic() < deadline, f"{len(pending)} accepted tasks never finished"
                for task_id in list(pending)[:50]:
                    resp = await http.get(f"/v1/tasks/{task_id}")
                    assert resp.status_code == 200, resp.text
                    phase = resp.json()["status"]["phase"]
                    assert phase not in ("Failed", "Expired", "Stopped"), resp.text
                    if phase == "Succeeded":
                        pending.discard(task_id)
                await asyncio.sleep(0.2)
        stop = time.monotonic()
        dev.send_signal(signal.SIGINT)
        await asyncio.wait_for(dev.wait(), 10)
        assert time.monotonic() - stop < 3.0, "Ctrl-C took too long"
        with pytest.raises(OSError):
            wait_for_port(port, timeout=0.2)


async def test_attempts_that_end_while_nats_restarts_are_recorded_once(tmp_path: Path) -> None:
    """Each attempt notes its run, waits for a go-ahead, then ends; nats-server is killed just
    before the go-ahead, so every attempt ends while it is away. Each outcome is recorded when
    NATS is back: one attempt a task, one run. (Before: every task ran twice, its first,
    finished attempt taken for lost.)"""
    runs = tmp_path / "runs"
    runs.mkdir()
    functions = f"""
apiVersion: kubetask.io/v1alpha1
kind: TaskFunction
metadata: {{name: gated}}
spec:
  command: ["sh", "-c", "cat >/dev/null; echo run >> {runs}/$KUBETASK_TASK_ID;
    while [ ! -e {runs}/go ]; do sleep 0.01; done; echo done"]
  maxConcurrency: 8
"""
    tasks = [f"gated-{i}" for i in range(6)]
    async with running_dev(tmp_path, functions) as d:
        async with d.http(timeout=5) as http:
            for task_id in tasks:
                resp = await http.post("/v1/tasks", json={"function": "gated", "id": task_id})
                assert resp.status_code == 202, resp.text
            deadline = time.monotonic() + 30
            while not all((runs / t).exists() for t in tasks):
                assert time.monotonic() < deadline, list(runs.iterdir())
                await asyncio.sleep(0.05)
            nats = _nats_pid(d.data / "jetstream")
            assert nats is not None
            os.kill(nats, signal.SIGKILL)
            (runs / "go").touch()
            deadline = time.monotonic() + 60
            ended: dict[str, dict[str, object]] = {}
            while len(ended) < len(tasks):
                assert time.monotonic() < deadline, ended
                await asyncio.sleep(0.2)
                for task_id in tasks:
                    try:
                        resp = await http.get(f"/v1/tasks/{task_id}")
                    except httpx.HTTPError:
                        break  # NATS or the gateway on its way back
                    status = resp.json().get("status", {}) if resp.status_code == 200 else {}
                    if status.get("phase") in ("Succeeded", "Failed", "Stopped", "Expired"):
                        ended[task_id] = status
        assert "nats-server restarted" in d.log.read_text()
        assert {t: (s["phase"], s["attempts"]) for t, s in ended.items()} == {
            t: ("Succeeded", 1) for t in tasks
        }
        assert {t: (runs / t).read_text().count("run") for t in tasks} == {t: 1 for t in tasks}


def _taken(port: int) -> bool:
    """Whether binding `port` on loopback fails because something holds it."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as err:
            assert err.errno == errno.EADDRINUSE, err
            return True
        return False


async def test_ports_stay_held_while_the_gateway_and_a_dispatcher_restart(
    tmp_path: Path,
) -> None:
    """`kubetask dev` holds the API port and each dispatcher's metrics port across their
    servers' restarts: nothing else (a tenant's function included) can take them in between,
    and a request sent while the gateway is down is answered by the next one rather than
    refused. (Before: the ports were free until the restarted process listened again, and the
    request was refused.)"""
    async with running_dev(tmp_path, FUNCTIONS) as d:
        said = d.log.read_text()
        found = re.search(r"http://127\.0\.0\.1:(\d+)/metrics \(dispatchers\)", said)
        assert found is not None, said
        metrics_port = int(found.group(1))
        async with d.http(timeout=30) as http:
            for what, port in (("gateway", d.port), ("dispatcher", metrics_port)):
                mark = f"\0{what}\0".encode()
                [pid] = [p for p in pids_running(mark) if parent_of(p) == d.proc.pid]
                os.kill(pid, signal.SIGKILL)
                while not exited(pid):
                    await asyncio.sleep(0.01)
                assert _taken(port), f"{what}'s port {port} was free while it restarted"
                if what == "gateway":
                    resp = await http.post("/v1/tasks", json={"function": "quick"})
                    assert resp.status_code == 202, resp.text
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    resp = await http.get(f"http://127.0.0.1:{metrics_port}/metrics")
                    if resp.status_code == 200:
                        break
                assert time.monotonic() < deadline, "the dispatcher's metrics never came back"
                await asyncio.sleep(0.1)
        assert d.log.read_text().count("restarted") >= 2


def test_components_started_before_jetstream_wait_for_it(tmp_path: Path) -> None:
    """A gateway and a dispatcher started while their NATS server has no JetStream (as while a
    server restores its streams or a cluster elects its leader) wait, saying so, and serve once
    JetStream answers on the same address: a task submitted then runs. (Before: both exited
    with a traceback, and Kubernetes would have restarted them with a growing back-off.)"""
    port, api_port = free_port(), free_port()
    bare = subprocess.Popen(
        [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL
    )
    wait_for_port(port, proc=bare)
    tokens = tmp_path / "tokens.json"
    admin, _ = issue_token(tokens, "admin", None, admin=True)
    env = {**os.environ, "KUBETASK_NATS_URL": f"nats://127.0.0.1:{port}"}
    for name in ("KUBETASK_NATS_USER", "KUBETASK_NATS_PASSWORD"):
        env.pop(name, None)
    commands = {
        "gateway": ["gateway", "--port", str(api_port), "--tokens", str(tokens)],
        "dispatcher": ["dispatcher"],
    }
    logs = {what: tmp_path / f"{what}.log" for what in commands}
    procs = {
        what: subprocess.Popen(
            [sys.executable, "-m", "kubetask", *argv],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=logs[what].open("wb"),
        )
        for what, argv in commands.items()
    }
    nats = None
    try:
        deadline = time.monotonic() + 30
        while not all("is not available" in log.read_text() for log in logs.values()):
            assert time.monotonic() < deadline, {w: f.read_text() for w, f in logs.items()}
            time.sleep(0.1)
        time.sleep(1)  # long enough for one that gives up to have done so
        assert all(p.poll() is None for p in procs.values()), {
            w: f.read_text() for w, f in logs.items()
        }
        bare.kill()
        bare.wait()
        nats = start_nats(tmp_path / "jetstream", port)
        headers = {"Authorization": f"Bearer {admin}"}
        url = f"http://127.0.0.1:{api_port}"
        with httpx.Client(base_url=url, headers=headers, timeout=10) as http:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if http.get("/healthz").status_code == 200:
                        break
                assert time.monotonic() < deadline, logs["gateway"].read_text()
                time.sleep(0.1)
            fn = {"metadata": {"name": "quick"}, "spec": {"command": ["true"]}}
            resp = http.put("/v1/functions/quick", json=fn)
            assert resp.status_code == 200, resp.text
            resp = http.post("/v1/tasks", json={"function": "quick"})
            assert resp.status_code == 202, resp.text
            task_id = resp.json()["metadata"]["name"]
            deadline = time.monotonic() + 30
            while http.get(f"/v1/tasks/{task_id}").json()["status"]["phase"] != "Succeeded":
                assert time.monotonic() < deadline, logs["dispatcher"].read_text()
                time.sleep(0.1)
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(10)
        for server in (bare, nats):
            if server is not None and server.poll() is None:
                server.kill()
                server.wait()
