"""Crash safety with real kills: SIGKILL a dispatcher, then a whole `kubetask dev`, mid-flight.

Every accepted task must reach a terminal state, none may be lost, none may ever run twice at the
same time (each run takes an exclusive flock on a per-task file; the kernel drops it when the
process dies), and each is recorded Succeeded exactly once in the audit stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from harness import parent_of, pids_running
from kubetask.auth import create_token
from kubetask.embedded import free_port, start_nats, wait_for_port

pytestmark = pytest.mark.slow

TASKS = 200
WORKER = """
    import fcntl, json, os, random, sys, time
    tid = os.environ["KUBETASK_TASK_ID"]
    fd = os.open(os.path.join({locks!r}, tid), os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        with open({overlaps!r}, "a") as f:
            f.write(tid + "\\n")
    with open({journal!r}, "a") as f:
        f.write(f"start {{tid}}\\n")
    time.sleep(random.uniform(0.3, 2.5))
    print(json.dumps(tid))
"""


class Lab:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.locks = root / "locks"
        self.locks.mkdir()
        self.overlaps = root / "overlaps"
        self.journal = root / "journal"
        script = root / "worker.py"
        script.write_text(
            textwrap.dedent(
                WORKER.format(
                    locks=str(self.locks), overlaps=str(self.overlaps), journal=str(self.journal)
                )
            )
        )
        self.script = script
        self.procs: list[subprocess.Popen[bytes]] = []

    def function_yaml(self, partitions: int = 1) -> str:
        return textwrap.dedent(f"""
            apiVersion: kubetask.io/v1alpha1
            kind: TaskFunction
            metadata: {{name: work}}
            spec:
              command: [{json.dumps(sys.executable)}, {json.dumps(str(self.script))}]
              maxConcurrency: 24
              partitions: {partitions}
            ---
            apiVersion: kubetask.io/v1alpha1
            kind: AsyncConfig
            metadata: {{name: work}}
            spec: {{function: work, maxAsyncRetryAttempts: 5, retryBackoff: {{initialSeconds: 0.1}}}}
        """)

    def spawn(self, *args: str, env: dict[str, str], log: str) -> subprocess.Popen[bytes]:
        out = open(self.root / log, "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "kubetask", *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )
        self.procs.append(proc)
        return proc

    def start_nats_and_gateway(self, account: str, **env: str) -> tuple[str, str, dict[str, str]]:
        """A nats-server and a gateway of the lab's own; returns (API URL, token, env)."""
        nats_port = free_port()
        self.procs.append(start_nats(self.root / "js", nats_port, tie_to_parent=True))
        full_env = dict(os.environ, KUBETASK_NATS_URL=f"nats://127.0.0.1:{nats_port}", **env)
        tokens = self.root / "tokens.json"
        token = create_token(tokens, account, account)
        port = free_port()
        gateway = self.spawn(
            "gateway", "--port", str(port), "--tokens", str(tokens), env=full_env, log="gw.log"
        )
        wait_for_port(port, proc=gateway)
        return f"http://127.0.0.1:{port}", token, full_env

    def started(self) -> int:
        return (
            sum(1 for line in self.journal.read_text().splitlines()) if self.journal.exists() else 0
        )

    def worker_pids(self) -> list[int]:
        return pids_running(str(self.script).encode())

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    yield lab
    lab.stop_all()


async def _submit_all(url: str, token: str) -> list[str]:
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as http:
        sem = asyncio.Semaphore(20)

        async def one(i: int) -> str:
            async with sem:
                resp = await http.post("/v1/tasks", json={"function": "work", "id": f"job-{i:03d}"})
                assert resp.status_code == 202, resp.text
                return str(resp.json()["metadata"]["name"])

        return await asyncio.gather(*(one(i) for i in range(TASKS)))


async def _wait_all_terminal(url: str, token: str, timeout: float = 150) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as http:
        while True:
            try:
                items = (await http.get("/v1/tasks", params={"limit": 1000})).json()["items"]
            except httpx.TransportError:
                items = []
            phases = Counter(t["status"]["phase"] for t in items)
            if (
                len(items) == TASKS
                and sum(phases[p] for p in ("Succeeded", "Failed", "Expired", "Stopped")) == TASKS
            ):
                return list(items)
            assert time.monotonic() < deadline, f"not all terminal: {dict(phases)} of {len(items)}"
            await asyncio.sleep(0.5)


async def _succeeded_events(nats_url: str, account: str, **auth: str) -> Counter[str]:
    nc = await nats.connect(nats_url, **auth)  # type: ignore[arg-type]
    js = nc.jetstream()
    sub = await js.subscribe(f"kt.events.{account}.>", stream="KT_EVENTS", ordered_consumer=True)
    seen: Counter[str] = Counter()
    try:
        while True:
            msg = await sub.next_msg(timeout=2)
            if not msg.data:
                continue  # a deletion
            task = json.loads(msg.data)["task"]
            if task["status"]["phase"] == "Succeeded":
                seen[task["metadata"]["name"]] += 1
    except (TimeoutError, nats.errors.TimeoutError):
        pass
    await nc.close()
    return seen


async def _wait_started(lab: Lab, at_least: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while lab.started() < at_least:
        assert time.monotonic() < deadline, "tasks did not start"
        await asyncio.sleep(0.05)


def _assert_all_done_once(lab: Lab, tasks: list[dict[str, Any]], events: Counter[str]) -> None:
    assert Counter(t["status"]["phase"] for t in tasks) == {"Succeeded": TASKS}
    assert not lab.overlaps.exists() or lab.overlaps.read_text() == "", "a task ran twice at once"
    ids = {t["metadata"]["name"] for t in tasks}
    assert ids == {f"job-{i:03d}" for i in range(TASKS)}
    assert all(t["status"]["result"] == t["metadata"]["name"] for t in tasks)
    assert set(events) == ids and set(events.values()) == {1}, "Succeeded recorded once each"


def _apply(lab: Lab, url: str, token: str, manifests: str) -> None:
    """`kubetask functions apply` of the manifests, as a user would."""
    fn_file = lab.root / "fns.yaml"
    fn_file.write_text(manifests)
    cli = [sys.executable, "-m", "kubetask", "functions", "apply", "-f", str(fn_file)]
    apply = subprocess.run([*cli, "--url", url, "--token", token], capture_output=True, text=True)
    assert apply.returncode == 0, apply.stderr


async def test_kill_9_dispatcher_mid_flight_loses_nothing(lab: Lab) -> None:
    url, token, env = lab.start_nats_and_gateway(
        "crash", KUBETASK_ACK_WAIT="2", KUBETASK_SWEEP_GRACE="2"
    )
    nats_url = env["KUBETASK_NATS_URL"]
    _apply(lab, url, token, lab.function_yaml())
    first = lab.spawn("dispatcher", env=env, log="d1.log")
    await _submit_all(url, token)
    await _wait_started(lab, 40)
    running_before = lab.worker_pids()
    assert running_before, "expected attempts in flight when the dispatcher dies"
    first.send_signal(signal.SIGKILL)
    first.wait()
    await asyncio.sleep(0.5)
    assert not [p for p in lab.worker_pids() if p in running_before], "attempts outlived dispatcher"
    lab.spawn("dispatcher", env=env, log="d2.log")
    tasks = await _wait_all_terminal(url, token)
    events = await _succeeded_events(nats_url, "crash")
    _assert_all_done_once(lab, tasks, events)
    assert any(t["status"]["attempts"] > 1 for t in tasks), "no attempt was taken over"


async def _waiting_pulls(nats_url: str, stream: str, consumer: str) -> int:
    nc = await nats.connect(nats_url)
    try:
        return int((await nc.jetstream().consumer_info(stream, consumer)).num_waiting or 0)
    finally:
        await nc.close()


async def _until_waiting_pulls(nats_url: str, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while await _waiting_pulls(nats_url, "KT_Q_crash", "fn_hold") != count:
        assert time.monotonic() < deadline, f"never {count} pull requests waiting"
        await asyncio.sleep(0.1)


async def test_kill_9_a_dispatcher_while_the_other_dozes_its_task_is_taken_over(lab: Lab) -> None:
    """The survivor's pull dozes: no request open, the queue subject watched. The killed
    dispatcher's message comes back after ack_wait with no publish to announce it (and the
    sweeper leaves Running tasks alone), so the backlog gauge is what wakes the survivor."""
    url, token, env = lab.start_nats_and_gateway(
        "crash", KUBETASK_ACK_WAIT="2", KUBETASK_SWEEP_GRACE="2"
    )
    nats_url = env["KUBETASK_NATS_URL"]
    hold = lab.root / "hold.py"
    hold.write_text(
        'import os, time\nif os.environ["KUBETASK_ATTEMPT"] == "1":\n    time.sleep(600)\n'
    )
    _apply(
        lab,
        url,
        token,
        textwrap.dedent(f"""
            apiVersion: kubetask.io/v1alpha1
            kind: TaskFunction
            metadata: {{name: hold}}
            spec:
              command: [{json.dumps(sys.executable)}, {json.dumps(str(hold))}]
              maxConcurrency: 4
            ---
            apiVersion: kubetask.io/v1alpha1
            kind: AsyncConfig
            metadata: {{name: hold}}
            spec: {{function: hold, maxAsyncRetryAttempts: 2}}
        """),
    )
    first = lab.spawn("dispatcher", env=env, log="d1.log")
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as http:

        async def phase() -> tuple[str, int]:
            status = (await http.get("/v1/tasks/held")).json()["status"]
            return status["phase"], status["attempts"]

        resp = await http.post("/v1/tasks", json={"function": "hold", "id": "held"})
        assert resp.status_code == 202, resp.text
        deadline = time.monotonic() + 30
        while (await phase())[0] != "Running":
            assert time.monotonic() < deadline, await phase()
            await asyncio.sleep(0.1)
        await _until_waiting_pulls(nats_url, 1)  # the first dispatcher's, for its free slots
        lab.spawn("dispatcher", env=dict(env, KUBETASK_PULL_IDLE_EXPIRES="1"), log="d2.log")
        await _until_waiting_pulls(nats_url, 2)  # the second one pulls, finds nothing ...
        await _until_waiting_pulls(nats_url, 1)  # ... and dozes after its first 5 s request
        first.send_signal(signal.SIGKILL)
        first.wait()
        deadline = time.monotonic() + 40
        while (await phase()) != ("Succeeded", 2):
            assert time.monotonic() < deadline, await phase()
            await asyncio.sleep(0.2)


async def _leases(nats_url: str) -> dict[str, str]:
    """Partition -> the dispatcher holding its lease, read from the bucket."""
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value("kt_leases")
        held = {}
        with contextlib.suppress(nats.js.errors.NoKeysError):
            for key in await kv.keys():
                if key.startswith("p."):
                    with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                        held[key] = (await kv.get(key)).value.decode()
        return held
    finally:
        await nc.close()


async def _wait_leases(nats_url: str, holders: int, timeout: float) -> dict[str, str]:
    """Until the 4 partitions are held by exactly `holders` dispatchers."""
    deadline = time.monotonic() + timeout
    while True:
        held = await _leases(nats_url)
        if len(held) == 4 and len(set(held.values())) == holders:
            return held
        assert time.monotonic() < deadline, held
        await asyncio.sleep(0.2)


async def test_kill_9_one_of_two_dispatchers_its_partitions_are_taken_over(lab: Lab) -> None:
    url, token, env = lab.start_nats_and_gateway(
        "crash", KUBETASK_ACK_WAIT="2", KUBETASK_SWEEP_GRACE="2", KUBETASK_LEASE_TTL="2"
    )
    nats_url = env["KUBETASK_NATS_URL"]
    _apply(lab, url, token, lab.function_yaml(partitions=4))
    first = lab.spawn("dispatcher", env=env, log="d1.log")
    second = lab.spawn("dispatcher", env=env, log="d2.log")
    held = await _wait_leases(nats_url, holders=2, timeout=20)  # the partitions are spread
    await _submit_all(url, token)
    await _wait_started(lab, 40)
    victim = first if any(str(first.pid) in who for who in held.values()) else second
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = time.monotonic()
    survivor = await _wait_leases(nats_url, holders=1, timeout=15)
    took_over = time.monotonic() - killed_at
    assert str(victim.pid) not in next(iter(survivor.values()))
    # Within the lease TTL (2 s) plus a renewal round of the survivor (TTL / 3).
    assert took_over < 2 + 2 / 3 + 1.5, took_over
    tasks = await _wait_all_terminal(url, token)
    events = await _succeeded_events(nats_url, "crash")
    _assert_all_done_once(lab, tasks, events)


async def _client_config(
    lab: Lab, dev: subprocess.Popen[bytes], data: Path, log: str, timeout: float = 30
) -> Path:
    """`kubetask dev`'s client.json, once it names the API (written last, when all is up)."""
    cfg_file = data / "client.json"
    deadline = time.monotonic() + timeout
    while not (cfg_file.exists() and "url" in cfg_file.read_text()):
        assert time.monotonic() < deadline and dev.poll() is None, (lab.root / log).read_text()
        await asyncio.sleep(0.1)
    return cfg_file


async def test_kill_9_whole_dev_then_restart_loses_nothing(lab: Lab) -> None:
    data = lab.root / "data"
    fn_file = lab.root / "fns.yaml"
    fn_file.write_text(lab.function_yaml())
    port, nats_port = free_port(), free_port()
    args = [
        "dev",
        "--data-dir",
        str(data),
        "--port",
        str(port),
        "--nats-port",
        str(nats_port),
        "--ack-wait",
        "2",
        "-f",
        str(fn_file),
    ]
    env = dict(os.environ, KUBETASK_SWEEP_GRACE="2")
    dev = lab.spawn(*args, env=env, log="dev1.log")
    cfg_file = await _client_config(lab, dev, data, "dev1.log")
    wait_for_port(port, proc=dev)
    token = json.loads(cfg_file.read_text())["token"]
    url = f"http://127.0.0.1:{port}"
    await _submit_all(url, token)
    await _wait_started(lab, 40)
    dev.send_signal(signal.SIGKILL)
    dev.wait()
    await asyncio.sleep(1.0)
    assert lab.worker_pids() == [], "attempts outlived kubetask dev"
    for p in (port, nats_port):  # gateway and nats-server went down with it
        with pytest.raises(OSError):
            wait_for_port(p, timeout=0.2)
    lab.spawn(*args, env=env, log="dev2.log")
    wait_for_port(port, timeout=30)
    tasks = await _wait_all_terminal(url, token)
    admin = json.loads((data / "secrets" / "nats-users.json").read_text())["admin"]
    events = await _succeeded_events(
        f"nats://127.0.0.1:{nats_port}", "default", user="admin", password=admin
    )
    _assert_all_done_once(lab, tasks, events)


async def test_a_second_dev_on_the_same_data_directory_is_refused(lab: Lab) -> None:
    """It used to start a second nats-server on the same JetStream store and point the CLI's
    client.json at itself. The same command twice (the same ports too) is told about the
    directory, not about a port in use. (That the lock goes with a killed dev is the restart
    above.)"""
    data = lab.root / "data"
    args = ["dev", "--data-dir", str(data), "--nats-port", str(free_port())]
    args += ["--port", str(free_port())]
    first = lab.spawn(*args, env=dict(os.environ), log="dev1.log")
    cfg_file = await _client_config(lab, first, data, "dev1.log")
    written = cfg_file.read_text()

    async def refused(argv: list[str]) -> subprocess.CompletedProcess[str]:
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "kubetask", *argv],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert out.returncode == 2, out.stdout + out.stderr
        return out

    second = await refused(args)
    assert f"{data} is in use by another kubetask dev (pid {first.pid})" in second.stderr
    assert cfg_file.read_text() == written
    assert len(pids_running(str(data / "jetstream").encode())) == 1  # the first's nats-server
    third = await refused([str(lab.root / "other") if a == str(data) else a for a in args])
    assert f"port {args[4]} for the NATS is in use" in third.stderr
    first.send_signal(signal.SIGINT)
    assert first.wait(10) == 0


async def test_nats_server_gets_the_go_runtimes_variables_and_nothing_else(lab: Lab) -> None:
    """GOGC and GOMEMLIMIT are how an operator trades nats-server's memory for its CPU (a
    million records' heap, collected less often); it was started with PATH alone. What else
    the shell holds (a token, a password) still stays out of its environment."""
    data = lab.root / "data"
    env = dict(os.environ, GOGC="150", GOMEMLIMIT="3GiB", KUBETASK_CANARY="not-for-nats")
    args = ["dev", "--data-dir", str(data), "--nats-port", "0", "--port", str(free_port())]
    dev = lab.spawn(*args, env=env, log="dev.log")
    await _client_config(lab, dev, data, "dev.log")
    [nats_pid] = pids_running(str(data / "jetstream").encode())
    environ = await asyncio.to_thread(Path(f"/proc/{nats_pid}/environ").read_bytes)
    seen = dict(entry.split(b"=", 1) for entry in environ.split(b"\0") if entry)
    assert seen.get(b"GOGC") == b"150" and seen.get(b"GOMEMLIMIT") == b"3GiB", seen
    assert set(seen) <= {b"PATH", b"GOGC", b"GOMEMLIMIT", b"GOMAXPROCS", b"GODEBUG"}, seen
    dev.send_signal(signal.SIGINT)
    assert dev.wait(10) == 0


def _policies(pid: int) -> set[int]:
    """The scheduling policies of all of `pid`'s threads (one that ends meanwhile is left out)."""
    found = set()
    for thread in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            found.add(os.sched_getscheduler(int(thread.name)))
    return found


@pytest.mark.parametrize("switch", ["", "off"])
async def test_nats_server_alone_runs_under_sched_batch(lab: Lab, switch: str) -> None:
    """Under SCHED_BATCH a woken nats-server no longer preempts the gateway or a dispatcher in
    the middle of a task (`sched_batch.py`); they, and the functions they start, keep the
    default policy so that they still preempt a tenant's CPU-bound code. Set before the exec,
    so every one of Go's threads has it; `KUBETASK_DEV_NATS_BATCH=off` leaves it out."""
    data = lab.root / "data"
    env = dict(os.environ, KUBETASK_DEV_NATS_BATCH=switch)
    fn_file = lab.root / "fns.yaml"
    policy = [sys.executable, "-c", "import os; print(os.sched_getscheduler(0))"]
    function = {"kind": "TaskFunction", "metadata": {"name": "policy"}, "spec": {"command": policy}}
    fn_file.write_text(json.dumps({"apiVersion": "kubetask.io/v1alpha1", **function}))
    port = free_port()
    args = ["dev", "--data-dir", str(data), "--nats-port", "0", "--port", str(port)]
    dev = lab.spawn(*args, "-f", str(fn_file), env=env, log="dev.log")
    cfg = json.loads((await _client_config(lab, dev, data, "dev.log")).read_text())
    [nats_pid] = pids_running(str(data / "jetstream").encode())
    children_file = Path(f"/proc/{dev.pid}/task/{dev.pid}/children")
    children = (await asyncio.to_thread(children_file.read_text)).split()
    others = [int(pid) for pid in children if int(pid) != nats_pid]
    assert len(others) == 2, children  # the gateway and one dispatcher
    expected = os.SCHED_OTHER if switch == "off" else os.SCHED_BATCH
    assert _policies(nats_pid) == {expected}
    for pid in others:
        assert _policies(pid) == {os.SCHED_OTHER}, pid
    auth = {"Authorization": f"Bearer {cfg['token']}"}
    async with httpx.AsyncClient(base_url=cfg["url"], headers=auth, timeout=30) as http:
        resp = await http.post("/v1/tasks", json={"function": "policy", "id": "p"})
        assert resp.status_code == 202, resp.text
        deadline = time.monotonic() + 30
        while (task := (await http.get("/v1/tasks/p")).json())["status"]["phase"] != "Succeeded":
            assert time.monotonic() < deadline, task
            await asyncio.sleep(0.1)
    assert task["status"]["result"] == os.SCHED_OTHER, "a function runs under the default"
    assert "SCHED_BATCH refused" not in (lab.root / "dev.log").read_text()
    dev.send_signal(signal.SIGINT)
    assert dev.wait(10) == 0


@pytest.mark.parametrize("batch", [True, False])
def test_start_nats_runs_it_under_sched_batch_when_asked(tmp_path: Path, batch: bool) -> None:
    """`start_nats(batch=True)` is how the throughput benchmark runs nats-server as `kubetask
    dev` does; without it, the default policy."""
    server = start_nats(tmp_path / "js", free_port(), batch=batch)
    try:
        assert _policies(server.pid) == {os.SCHED_BATCH if batch else os.SCHED_OTHER}
    finally:
        server.terminate()
        server.wait(10)


def test_a_bad_sched_batch_switch_is_named_before_anything_starts(tmp_path: Path) -> None:
    args = ["dev", "--data-dir", str(tmp_path / "data"), "--port", str(free_port())]
    out = subprocess.run(
        [sys.executable, "-m", "kubetask", *args, "--nats-port", "0"],
        env=dict(os.environ, KUBETASK_DEV_NATS_BATCH="sometimes"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith("error: KUBETASK_DEV_NATS_BATCH='sometimes': expected on or off")
    assert not (tmp_path / "data").exists()


def test_a_memory_limit_nats_server_would_die_of_is_named_before_anything_starts(
    tmp_path: Path,
) -> None:
    """Go stops a program at once on a malformed GOMEMLIMIT; once passed through, `kubetask dev`
    ended in a traceback ("process exited with code 2 before listening")."""
    for value in ("3GB", "-1", "lots"):
        args = ["dev", "--data-dir", str(tmp_path / "data"), "--port", str(free_port())]
        out = subprocess.run(
            [sys.executable, "-m", "kubetask", *args, "--nats-port", "0"],
            env=dict(os.environ, GOMEMLIMIT=value), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 2, out.stdout + out.stderr
        assert out.stderr.startswith(f"error: GOMEMLIMIT={value!r}: expected"), out.stderr
        assert not (tmp_path / "data").exists()


def test_a_setting_out_of_range_or_unparsable_is_named_before_anything_starts(
    tmp_path: Path,
) -> None:
    """It used to end in "process exited with code 1 before listening", with the reason in a
    log file ("invalid literal for int()", no variable named); a 0 or a negative number was
    taken as it was (no task would ever run with no node slot), and a setting read only by the
    dispatcher had it restarted over and over."""
    for name, value, why in (
        ("KUBETASK_ACCOUNT_MAX_BACKLOG", "lots", "expected a whole number"),
        ("KUBETASK_NODE_SLOTS", "0", "must be at least 1"),
        ("KUBETASK_CONSUMER_IDLE", "-5", "must be at least 0"),
        ("KUBETASK_AIMD_DECREASE", "1.5", "must be at most 0.99"),
        ("KUBETASK_ACK_WAIT", "nan", "expected a finite number"),
        ("KUBETASK_DEDICATE_BACKLOG", "0", "must be at least 1"),
        ("KUBETASK_WEBHOOK_DENIED_NETWORKS", "10.0.0.0/33", "is not a network"),
    ):
        env = dict(os.environ, **{name: value})
        args = ["dev", "--data-dir", str(tmp_path / "data"), "--port", str(free_port())]
        out = subprocess.run(
            [sys.executable, "-m", "kubetask", *args, "--nats-port", "0"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 2, (name, out.stdout + out.stderr)
        assert out.stderr.startswith(f"error: {name}"), out.stderr
        assert why in out.stderr, out.stderr
        assert not (tmp_path / "data").exists()  # nothing was started
        dispatcher = subprocess.run(
            [sys.executable, "-m", "kubetask", "dispatcher"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert dispatcher.returncode == 1 and why in dispatcher.stderr, dispatcher.stderr


def test_a_component_that_cannot_start_has_its_last_words_shown(tmp_path: Path) -> None:
    """The reason a component stopped is in its log; dev prints the end of it."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "index").write_text("a file where the gateway keeps a directory")
    args = ["dev", "--data-dir", str(data), "--port", str(free_port())]
    out = subprocess.run(
        [sys.executable, "-m", "kubetask", *args, "--nats-port", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert "kubetask dev failed to start" in out.stderr
    assert "gateway (" in out.stderr and "index" in out.stderr.split("gateway (", 1)[1]


async def test_a_dispatcher_killed_while_dev_starts_is_restarted(lab: Lab) -> None:
    """Killed while dev still waits for the gateway, before its supervisor sleeps on SIGCHLD:
    dev used to sleep on without it, and every task stayed queued."""
    data = lab.root / "data"
    port = free_port()
    dev = lab.spawn(
        "dev", "--data-dir", str(data), "--port", str(port), "--nats-port", "0",
        env=dict(os.environ), log="dev.log",
    )  # fmt: skip
    needle = b"\0dispatcher\0"
    deadline = time.monotonic() + 30
    while not (mine := [p for p in pids_running(needle) if parent_of(p) == dev.pid]):
        assert time.monotonic() < deadline and dev.poll() is None, (
            lab.root / "dev.log"
        ).read_text()
        await asyncio.sleep(0.01)
    os.kill(mine[0], signal.SIGKILL)
    written = (data / "client.json").read_text() if (data / "client.json").exists() else ""
    assert "url" not in written, "dev was up already: nothing tested"
    cfg = json.loads((await _client_config(lab, dev, data, "dev.log")).read_text())
    spec = {"command": [sys.executable, "-c", "print(1)"]}
    async with httpx.AsyncClient(
        base_url=cfg["url"], headers={"Authorization": f"Bearer {cfg['adminToken']}"}, timeout=10
    ) as http:
        r = await http.put("/v1/functions/one", json={"metadata": {"name": "one"}, "spec": spec})
        assert r.status_code == 200, r.text
        r = await http.post("/v1/tasks", json={"function": "one"})
        assert r.status_code == 202, r.text
        task = r.json()["metadata"]["name"]
        deadline = time.monotonic() + 30
        while (phase := (await http.get(f"/v1/tasks/{task}")).json()["status"]["phase"]) != (
            "Succeeded"
        ):
            assert time.monotonic() < deadline, (phase, (lab.root / "dev.log").read_text())
            await asyncio.sleep(0.1)
    assert "dispatcher-0 exited with code -9" in (lab.root / "dev.log").read_text()


async def test_full_queue_refuses_new_tasks_and_keeps_the_accepted_ones(lab: Lab) -> None:
    url, token, env = lab.start_nats_and_gateway("full", KUBETASK_QUEUE_MAX_MSGS="20")
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {token}"}
    ) as http:
        fn = {
            "apiVersion": "kubetask.io/v1alpha1",
            "kind": "TaskFunction",
            "metadata": {"name": "work", "namespace": "full"},
            "spec": {"command": ["true"]},
        }
        assert (await http.put("/v1/functions/work", json=fn)).status_code == 200
        codes = [
            (await http.post("/v1/tasks", json={"function": "work", "id": f"q-{i}"})).status_code
            for i in range(30)
        ]
        assert codes == [202] * 20 + [429] * 10
        refused = await http.post("/v1/tasks", json={"function": "work"})
        assert "is full" in refused.json()["error"]
        metrics = (await http.get("/metrics")).text
        series = 'kubetask_submissions_throttled_total{account="full",function="work",'
        assert series + 'reason="queue-full"} 11.0' in metrics, metrics
        lab.spawn("dispatcher", env=env, log="d.log")
        deadline = time.monotonic() + 30
        while True:
            items = (await http.get("/v1/tasks", params={"limit": 100})).json()["items"]
            if all(t["status"]["phase"] == "Succeeded" for t in items) and len(items) == 20:
                break
            assert time.monotonic() < deadline, [t["status"]["phase"] for t in items]
            await asyncio.sleep(0.2)
        assert {t["metadata"]["name"] for t in items} == {f"q-{i}" for i in range(20)}


@pytest.mark.parametrize("user", [None, 16777216 + 4242], ids=["as-itself", "as-another-user"])
def test_an_attempt_dies_with_the_process_that_started_it(tmp_path: Path, user: int | None) -> None:
    """The dispatcher's way (`spawn_argv`): a process that started a command is killed with
    SIGKILL, and the command goes with it, also when it runs as another user (the kernel
    disarms the death signal when a process changes users: setpriv must arm it after)."""
    if user is not None and os.geteuid() != 0:
        pytest.skip("only root can switch users")
    script = textwrap.dedent(
        f"""
        import os, subprocess, sys
        from kubetask.executors.function_users import RunAs
        from kubetask.executors.parent_death import spawn_argv
        env = {{"PATH": os.environ["PATH"]}}
        user = {user}
        argv, preexec, env, *_ = spawn_argv(["sleep", "60"], env, None, user and RunAs(user, 64))
        assert preexec is None, "setpriv is part of util-linux: expected here"
        child = subprocess.Popen(argv, env=env, start_new_session=True)
        print(child.pid, flush=True)
        sys.stdin.read()
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    time.sleep(0.3)
    assert _alive(child) and b"sleep" in Path(f"/proc/{child}/cmdline").read_bytes()
    uid = user if user is not None else os.geteuid()
    assert f"\nUid:\t{uid}\t" in Path(f"/proc/{child}/status").read_text()
    parent.kill()
    parent.wait()
    _gone_soon(child)


def test_without_setpriv_the_fallback_becomes_the_user_too() -> None:
    """`die_with_parent(user)`, for a machine without util-linux's setpriv."""
    if os.geteuid() != 0:
        pytest.skip("only root can switch users")
    from kubetask.executors.account_namespaces import AccountNamespaces
    from kubetask.executors.function_users import RunAs
    from kubetask.executors.parent_death import die_with_parent

    user = 16777216 + 4243
    out = subprocess.run(
        ["sh", "-c", "id -u; id -G; umask; grep NoNewPrivs /proc/self/status; { ulimit -u || ulimit -p; } 2>/dev/null; ulimit -Sn; ulimit -Hn"],
        preexec_fn=die_with_parent(RunAs(user, 64, max_open_files=100)), capture_output=True,
        text=True, timeout=10,
    )  # fmt: skip
    want = [str(user), str(user), "0077", "NoNewPrivs:", "1", "64", "100", "100"]
    assert out.stdout.split() == want, out
    # In its account's namespaces (`account_namespaces.py`): entered, the working directory
    # kept, /proc showing its own processes only, /tmp its own, and none of the host's IPC
    # objects (the host holds one meanwhile).
    namespaces = AccountNamespaces(True, 1 << 20)
    assert namespaces.why_not_hidden() is None and namespaces.why_not_scratch() is None
    script = (
        "pwd; cat /proc/[0-9]*/status | awk '/^Uid:/ {print $2}' | sort -u; stat -c %u /tmp; "
        "tail -n +2 /proc/sysvipc/shm | wc -l"
    )
    host = subprocess.run(["ipcmk", "-M", "4096"], capture_output=True, text=True, check=True)
    try:
        out = subprocess.run(
            ["sh", "-c", script],
            preexec_fn=die_with_parent(RunAs(user, 64), namespace=namespaces.get_now(user)),
            cwd="/usr", capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    finally:
        namespaces.close()
        subprocess.run(["ipcrm", "-m", host.stdout.split()[-1]], check=True)
    assert out.stdout.split() == ["/usr", str(user), str(user), "0"], out


def test_a_guarded_command_whose_parent_is_gone_never_runs(tmp_path: Path) -> None:
    """The guard's own check, for a parent killed before the death signal was set: run as if
    started by a process that no longer is its parent, the command must not run at all."""
    from kubetask.executors.parent_death import spawn_argv

    marker = tmp_path / "ran"
    env = {"PATH": os.environ["PATH"]}
    argv, _, env, *_ = spawn_argv(["touch", str(marker)], env, None)
    argv[argv.index(str(os.getpid()))] = "1"  # "started by" a process that is not its parent
    assert subprocess.run(argv, env=env, timeout=10).returncode == -signal.SIGKILL
    assert not marker.exists()
    argv, _, env, *_ = spawn_argv(["touch", str(marker)], env, None)
    assert subprocess.run(argv, env=env, timeout=10).returncode == 0 and marker.exists()


def test_a_command_that_cannot_run_fails_to_start_as_exec_would(tmp_path: Path) -> None:
    from kubetask.executors.parent_death import spawn_argv

    env = {"PATH": "/usr/bin:/bin"}
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    for command, error in (
        (["no-such-program-anywhere"], FileNotFoundError),
        (["/nonexistent/binary"], FileNotFoundError),
        (["./missing.sh"], FileNotFoundError),
        ([str(script)], PermissionError),
        (["./not-executable.sh"], PermissionError),
    ):
        with pytest.raises(error):
            spawn_argv(command, env, str(tmp_path))
    script.chmod(0o755)
    argv, _, env, *_ = spawn_argv(["./not-executable.sh"], env, str(tmp_path))
    out = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=10)
    assert out.stdout == "hi\n"


def test_child_whose_parent_dies_before_it_is_armed_dies_too(tmp_path: Path) -> None:
    """The window a `kill -9` can hit: the parent forks an attempt and dies before the child
    has set its death signal. The child must not run on unwatched."""
    script = textwrap.dedent(
        """
        import os, sys, time
        from kubetask.executors.parent_death import die_with_parent
        arm = die_with_parent()
        parent = os.getpid()
        child = os.fork()
        if child == 0:
            while os.getppid() == parent:
                time.sleep(0.01)
            arm()
            time.sleep(60)
            os._exit(0)
        print(child, flush=True)
        os._exit(0)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=30
    )
    _gone_soon(int(out.stdout.strip()))


def _gone_soon(pid: int) -> None:
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} ran on after its parent died"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
