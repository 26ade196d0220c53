"""The runtime sidecar and its entry (`runtime-sidecar/`, the real static binary) against the
dispatcher's runtime endpoint (`executors/runtime_server.py`), as processes on this machine
sharing a directory the way a Job's pod shares its volume. What Kubernetes adds (the Job, the
pod, the node) is `e2e/test_node.py`'s."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import from_address
from kubetask.dispatch.log_pacing import LogPacing
from kubetask.executors.base import Invocation
from kubetask.executors.frames import (
    ANSWER,
    CODE,
    HEAD,
    MAX_FRAME,
    STDOUT,
    BadFrames,
    FrameReader,
)
from kubetask.executors.http1 import Http1Pool
from kubetask.executors.runtime_server import RuntimeAttempt, RuntimeServer
from kubetask.executors.warm_pods import WarmExecution, WarmPod, WarmPool
from kubetask.models import TaskFunction

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kt_runtime() -> str:
    built = subprocess.run(
        ["bash", str(ROOT / "runtime-sidecar" / "build.sh")],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return built.stdout.strip().splitlines()[-1]


@pytest.fixture
async def server() -> AsyncIterator[RuntimeServer]:
    s = RuntimeServer("127.0.0.1", 0)
    await s.start()
    yield s
    await s.close()


def invocation(
    lines: list[tuple[str, str]], payload: Any = None, limit: int = 1 << 20
) -> Invocation:
    fn = TaskFunction.model_validate(
        {"metadata": {"name": "f", "namespace": "team-a"}, "spec": {"command": ["true"]}}
    )
    return Invocation(
        account="team-a", task_id="t1", attempt=1, function=fn, payload=payload,
        timeout=30, max_result_bytes=limit, log=lambda stream, text: lines.append((stream, text)),
    )  # fmt: skip


class Pod:
    """The pod's containers, started as the kubelet starts them: the sidecar and its postStart
    hook (the install) to its end, then the function's container (not waiting for the sidecar
    to listen)."""

    def __init__(self, binary: str, workdir: Path, url: str, token: str) -> None:
        self.binary = binary
        self.dir = workdir
        self.env = {
            "PATH": os.environ["PATH"],
            "KUBETASK_RUNTIME_DIR": str(workdir),
            "KUBETASK_RUNTIME_URL": url,
            "KUBETASK_RUNTIME_TOKEN": token,
            "KUBETASK_POD_NAME": "f-abc-1-xyz",
            "KUBETASK_POD_NAMESPACE": "team-a",
            "KUBETASK_NODE_NAME": "node-1",
        }

    async def start(
        self, *command: str
    ) -> tuple[asyncio.subprocess.Process, asyncio.subprocess.Process]:
        sidecar = await asyncio.create_subprocess_exec(
            self.binary, "sidecar", env=self.env, stderr=asyncio.subprocess.PIPE
        )
        install = await asyncio.create_subprocess_exec(self.binary, "install", env=self.env)
        assert await install.wait() == 0
        entry_bin = self.dir / "bin" / "kt-runtime"
        # The function's container sees neither the runtime's URL nor its token.
        env = {"PATH": os.environ["PATH"], "KUBETASK_RUNTIME_DIR": str(self.dir)}
        entry = await asyncio.create_subprocess_exec(
            str(entry_bin), "entry", "--", *command, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        return sidecar, entry


async def run_pod(
    binary: str, server: RuntimeServer, attempt: RuntimeAttempt, workdir: Path, *command: str
) -> tuple[int, bytes, int]:
    pod = Pod(binary, workdir, f"http://127.0.0.1:{server.port}", attempt.token)
    sidecar, entry = await pod.start(*command)
    out, _ = await asyncio.wait_for(entry.communicate(), 30)
    assert await asyncio.wait_for(sidecar.wait(), 10) == 0
    assert entry.returncode is not None
    return entry.returncode, out, await asyncio.wait_for(attempt.exited, 1)


async def test_a_command_gets_its_payload_and_its_output_and_exit_reach_the_dispatcher(
    kt_runtime: str, server: RuntimeServer, tmp_path: Path
) -> None:
    lines: list[tuple[str, str]] = []
    attempt = server.open(invocation(lines, payload={"n": 41}))
    script = (
        "import json, sys; n = json.load(sys.stdin)['n']; "
        "print('working on', n, file=sys.stderr); print('no newline at the end', end='', file=sys.stderr); "
        "print(json.dumps({'answer': n + 1}))"
    )
    code, out, reported = await run_pod(
        kt_runtime, server, attempt, tmp_path, sys.executable, "-c", script
    )
    assert code == reported == 0
    assert json.loads(out) == {"answer": 42}  # also on the container's own stdout (kubectl logs)
    assert json.loads(bytes(attempt.stdout)) == {"answer": 42}
    assert lines == [("stderr", "working on 41"), ("stderr", "no newline at the end")]
    placed = attempt.placed.result()
    assert (placed.pod, placed.namespace, placed.node) == ("f-abc-1-xyz", "team-a", "node-1")
    assert attempt.running.done() and not attempt.terminated


@pytest.mark.parametrize(
    ("command", "code", "said"),
    [
        (["sh", "-c", "echo failing >&2; exit 3"], 3, "failing"),
        (["no-such-command-here"], 127, "cannot run"),
        (["sh", "-c", "kill -KILL $$"], 128 + 9, None),
    ],
    ids=["exit-3", "not-found", "killed"],
)
async def test_a_failing_command_reports_its_code_and_what_it_said(
    kt_runtime: str,
    server: RuntimeServer,
    tmp_path: Path,
    command: list[str],
    code: int,
    said: str | None,
) -> None:
    lines: list[tuple[str, str]] = []
    attempt = server.open(invocation(lines))
    got, _, reported = await run_pod(kt_runtime, server, attempt, tmp_path, *command)
    assert got == reported == code
    if said is not None:
        assert any(said in text for _, text in lines), lines


async def test_a_stopped_container_stops_its_whole_process_group_and_says_so(
    kt_runtime: str, server: RuntimeServer, tmp_path: Path
) -> None:
    """What the kubelet does when the pod is deleted: SIGTERM to the container's process."""
    lines: list[tuple[str, str]] = []
    attempt = server.open(invocation(lines))
    pod = Pod(kt_runtime, tmp_path, f"http://127.0.0.1:{server.port}", attempt.token)
    child = tmp_path / "child.pid"
    sidecar, entry = await pod.start("sh", "-c", f"sleep 300 & echo $! > {child}; wait")
    await asyncio.wait_for(attempt.running, 10)
    while not child.exists() or not child.read_text().strip():
        await asyncio.sleep(0.02)
    entry.send_signal(signal.SIGTERM)
    await asyncio.wait_for(entry.wait(), 10)
    assert await asyncio.wait_for(attempt.exited, 5) == 128 + signal.SIGTERM
    assert attempt.terminated
    assert await asyncio.wait_for(sidecar.wait(), 10) == 0
    with pytest.raises(ProcessLookupError):  # the grandchild went with it
        for _ in range(100):
            os.kill(int(child.read_text()), 0)
            await asyncio.sleep(0.02)


async def test_an_abandoned_attempt_runs_to_its_end_without_reporting(
    kt_runtime: str, server: RuntimeServer, tmp_path: Path
) -> None:
    """The dispatcher forgot the attempt (stopped, timed out, restarted): the sidecar is told
    404 and stops reporting, and the entry still ends with its command's code."""
    lines: list[tuple[str, str]] = []
    attempt = server.open(invocation(lines))
    pod = Pod(kt_runtime, tmp_path, f"http://127.0.0.1:{server.port}", attempt.token)
    sidecar, entry = await pod.start("sh", "-c", "sleep 0.5; echo late >&2; exit 4")
    await asyncio.wait_for(attempt.running, 10)
    server.forget(attempt)
    assert await asyncio.wait_for(entry.wait(), 10) == 4
    assert await asyncio.wait_for(sidecar.wait(), 10) == 0
    assert not attempt.exited.done() and ("stderr", "late") not in lines


async def test_a_token_reaches_its_own_attempt_only_and_bad_frames_are_refused(
    server: RuntimeServer,
) -> None:
    mine = server.open(invocation([], payload={"secret": "mine"}))
    theirs = server.open(invocation([], payload={"secret": "theirs"}))
    where = {"pod": "p", "namespace": "team-a"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
        got = await http.post(
            "/v1/run/start", json=where, headers={"Authorization": f"Bearer {mine.token}"}
        )
        assert got.status_code == 200 and got.json() == {"secret": "mine"}
        for header in (
            {"Authorization": "Bearer x"},
            {"Authorization": f"Bearer {theirs.token[:-1]}"},
            {"Authorization": f"Basic {mine.token}"},
            {},
        ):
            refused = await http.post("/v1/run/start", json=where, headers=header)
            assert refused.status_code == 404, header
        bad = await http.post(
            "/v1/run/frames", content=b"O\x00\x00\x00\x10short",
            headers={"Authorization": f"Bearer {mine.token}"},
        )  # fmt: skip
        assert bad.status_code == 400
        # A request sent again after a lost answer (same sequence number) counts once.
        frame = b"O\x00\x00\x00\x02hi"
        for _ in range(2):
            sent = await http.post(
                "/v1/run/frames", content=frame,
                headers={"Authorization": f"Bearer {mine.token}", "X-Kubetask-Seq": "s-2"},
            )  # fmt: skip
            assert sent.status_code == 204
    assert bytes(mine.stdout) == b"hi" and not theirs.placed.done()


async def test_one_address_holds_a_bounded_share_of_the_endpoints_connections() -> None:
    """A tenant's pod can reach the runtime endpoint, which kept a connection that sent nothing
    for as long as it stayed open: connections without end would have spent the dispatcher's
    memory and descriptors. Past its share an address's new connection is closed at once;
    another address is served meanwhile, and a connection given up makes room again."""
    server = RuntimeServer("0.0.0.0", 0, per_peer=4)
    await server.start()
    attempt = server.open(invocation([], payload={"for": "the neighbour"}))
    where = b'{"pod": "p", "namespace": "team-a"}'
    start = (
        b"POST /v1/run/start HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
    ) % (attempt.token.encode(), len(where), where)

    def ask(source: str) -> Awaitable[bytes]:
        return from_address(source, server.port, start)

    try:
        held = [
            await asyncio.open_connection("127.0.0.1", server.port, local_addr=("127.0.0.3", 0))
            for _ in range(4)
        ]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, local_addr=("127.0.0.3", 0)
        )
        assert await asyncio.wait_for(reader.read(), 2) == b""  # closed, nothing said
        writer.close()
        assert b'{"for":"the neighbour"}' in await ask("127.0.0.4")
        held[0][1].close()
        for _ in range(50):  # until the endpoint has seen it go
            answer = await ask("127.0.0.3")
            if answer:
                break
            await asyncio.sleep(0.05)
        assert b'{"for":"the neighbour"}' in answer
        for _, w in held[1:]:
            w.close()
    finally:
        await server.close()


async def test_a_pod_printing_past_its_pace_is_made_to_wait_and_loses_nothing(
    kt_runtime: str, server: RuntimeServer, tmp_path: Path
) -> None:
    """The dispatcher reads a pod's output at its account's pace by holding the answers to its
    sidecar. The sidecar went on reading meanwhile and sent all it had gathered at once: past
    4 MiB the dispatcher refused it, and the attempt was lost. Now the function's own writes
    wait. Here 8 MiB of stderr, paced at 4 MiB/s, 1 MiB at once."""
    lines: list[tuple[str, str]] = []
    pacing = LogPacing(rate=4 << 20, burst=1 << 20)
    inv = dataclasses.replace(invocation(lines), pace=functools.partial(pacing.delay, "team-a"))
    attempt = server.open(inv)
    script = (
        "import sys, time; t = time.monotonic(); "
        "[sys.stderr.write('x' * 1023 + '\\n') for _ in range(8192)]; sys.stderr.flush(); "
        "print(time.monotonic() - t)"
    )
    code, _, reported = await run_pod(
        kt_runtime, server, attempt, tmp_path, sys.executable, "-c", script
    )
    assert code == reported == 0
    assert lines == [("stderr", "x" * 1023)] * 8192
    # 9.2 MB as counted (a line costs 100 more), less the burst and what the sidecar, the
    # entry and the pipes and socket between them hold, is at least 1.5 s at the pace.
    assert float(bytes(attempt.stdout)) > 1.0


async def test_output_beyond_the_result_limit_is_kept_as_a_tail_only(
    kt_runtime: str, server: RuntimeServer, tmp_path: Path
) -> None:
    attempt = server.open(invocation([], limit=1000))
    code, _, _ = await run_pod(
        kt_runtime, server, attempt, tmp_path, sys.executable, "-c", "print('x' * 5000 + 'END')"
    )
    assert code == 0 and attempt.too_big and len(attempt.stdout) <= 1000
    assert attempt.overflowed.done()  # the attempt's pod is ended at once (`kubernetes_jobs`)
    tail = attempt.stdout_tail.text()
    assert tail is not None and tail.rstrip().endswith("END")


APP = """
import http.server, json, os, sys, time
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 200 if os.path.exists(sys.argv[1]) else 503
        self.send_response(code); self.send_header("Content-Length", "0"); self.end_headers()
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        print("working on", self.headers["X-Kubetask-Task-Id"], flush=True)
        for i in range(body.get("lines", 0)):
            print("line", i, "x" * 990)
        sys.stdout.flush()
        time.sleep(body["sleep"])
        out = json.dumps({"task": self.headers["X-Kubetask-Task-Id"]}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(out))); self.end_headers()
        self.wfile.write(out)
    def log_message(self, *args): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""


def test_a_frame_reader_refuses_an_oversized_frame_before_its_bytes_arrive() -> None:
    """A reader holds at most MAX_FRAME for a frame: the length in a head is checked first."""
    reader = FrameReader()
    assert reader.feed(HEAD.pack(STDOUT, MAX_FRAME) + b"x") == []  # the largest: waits for more
    with pytest.raises(BadFrames):
        FrameReader().feed(HEAD.pack(STDOUT, MAX_FRAME + 1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def warm_pod(kt_runtime: str, tmp_path: Path) -> AsyncIterator[tuple[str, Path, str]]:
    """A warm server's pod: its server under `kt-runtime serve`, the proxy in front of it with
    a concurrency of 2. Yields (proxy URL, the file whose presence makes the server ready, the
    runtime binary installed in the pod's volume)."""
    app_port, proxy_port = free_port(), free_port()
    flag = tmp_path / "ready"
    env = {
        "PATH": os.environ["PATH"],
        "KUBETASK_RUNTIME_DIR": str(tmp_path),
        "KUBETASK_PROXY_TOKEN": "secret-token",
        "KUBETASK_CONCURRENCY": "2",
        "KUBETASK_APP_PORT": str(app_port),
        "KUBETASK_PROXY_PORT": str(proxy_port),
        "KUBETASK_INVOKE_PATH": "/run",
        "KUBETASK_READINESS_PATH": "/up",
    }
    proxy = await asyncio.create_subprocess_exec(kt_runtime, "proxy", env=env)
    install = await asyncio.create_subprocess_exec(kt_runtime, "install", env=env)  # postStart
    assert await install.wait() == 0
    installed = str(tmp_path / "bin" / "kt-runtime")
    app = await asyncio.create_subprocess_exec(
        installed, "serve", "--", sys.executable, "-c", APP, str(flag),
        env={**env, "PORT": str(app_port)}, stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(200):  # the server listens (ready or not)
        with contextlib.suppress(OSError):
            _, w = await asyncio.open_connection("127.0.0.1", app_port)
            w.close()
            break
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{proxy_port}", flag, installed
    finally:
        # `serve` passes a stop on to the server's process group and exits after it; killed
        # outright, it left the server running (three of them outlived a test run).
        for p in (proxy, app):
            if p.returncode is None:
                p.terminate()
                try:
                    await asyncio.wait_for(p.wait(), 10)
                except TimeoutError:
                    p.kill()
                    await p.wait()


async def test_the_proxy_holds_the_function_to_its_concurrency_and_its_dispatchers(
    warm_pod: tuple[str, Path, str],
) -> None:
    url, flag, _ = warm_pod
    auth = {"Authorization": "Bearer secret-token", "X-Kubetask-Task-Id": "t"}
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        for _ in range(200):  # the proxy is starting
            with contextlib.suppress(httpx.TransportError):
                await http.get("/ready")
                break
            await asyncio.sleep(0.05)
        assert (await http.get("/ready")).status_code == 503  # its server is not ready yet
        flag.touch()
        assert (await http.get("/ready")).status_code == 200
        stranger = await http.post(
            "/invoke", json={"sleep": 0}, headers={"Authorization": "Bearer guess"}
        )
        assert stranger.status_code == 401
        answers = await asyncio.gather(
            *(http.post("/invoke", json={"sleep": 0.5}, headers=auth) for _ in range(5))
        )
        codes = sorted(a.status_code for a in answers)
        assert codes == [200, 200, 429, 429, 429], codes  # 429 is "busy" to a dispatcher
        # Accepted, it answers in frames: what the server printed meanwhile, then its answer.
        reader = FrameReader()
        frames = reader.feed(next(a for a in answers if a.status_code == 200).content)
        reader.finish()
        assert (frames[-1][0], frames[-1][1][4:]) == (ANSWER, b'{"task": "t"}')
        assert CODE.unpack_from(frames[-1][1])[0] == 200
        # Every line printed meanwhile reaches every invocation in flight; `serve` may send
        # two lines that came together as one frame.
        said = b"".join(d for k, d in frames[:-1] if k == STDOUT)
        assert b"working on t\n" in said, frames
        # What the server printed before it answered is in the answer, however fast it was
        # (the answer, on its own connection, used to overtake the line).
        for i in range(30):
            got = await http.post(
                "/invoke", json={"sleep": 0}, headers={**auth, "X-Kubetask-Task-Id": f"q{i}"}
            )
            said = b"".join(d for k, d in FrameReader().feed(got.content) if k == STDOUT)
            assert said == f"working on q{i}\n".encode(), (i, said)
        # A payload of 200 KB reaches the server whole (the proxy reads it before answering).
        big = await http.post("/invoke", json={"sleep": 0, "pad": "x" * 200_000}, headers=auth)
        (*_, (kind, answer)) = FrameReader().feed(big.content)
        assert kind == ANSWER and CODE.unpack_from(answer)[0] == 200, answer[:200]


async def test_a_warm_pods_output_is_read_at_its_accounts_pace(
    warm_pod: tuple[str, Path, str],
) -> None:
    """A warm pod's output comes in its answer, and was read as fast as it came: a server
    printing without end kept its dispatcher's core busy, as processes did before they were
    paced. Past its account's pace the answer is not read for a while. Here 2.2 MB as counted,
    at 1 MiB/s past a burst of 256 KiB; what the proxy could not hold meanwhile it drops and
    says so."""
    url, flag, _ = warm_pod
    flag.touch()
    fn = TaskFunction.model_validate(
        {"metadata": {"name": "f", "namespace": "team-a"}, "spec": {"server": {"command": ["x"]}}}
    )
    pod = WarmPod("f-pod", "127.0.0.1", None, "secret-token", ready=True, kubelet_ready=True)
    pod.http = Http1Pool(int(url.rsplit(":", 1)[1]))
    pod.inflight = 1
    lines: list[tuple[str, str]] = []
    pacing = LogPacing(rate=1 << 20, burst=256 << 10)
    inv = dataclasses.replace(
        invocation(lines, payload={"sleep": 0, "lines": 2000}),
        function=fn, pace=functools.partial(pacing.delay, "team-a"),
    )  # fmt: skip
    for _ in range(200):  # the proxy is starting
        with contextlib.suppress(httpx.TransportError):
            async with httpx.AsyncClient(base_url=url) as http:
                if (await http.get("/ready")).status_code == 200:
                    break
        await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    outcome = await WarmExecution(WarmPool(fn), pod, inv).wait()
    took = loop.time() - started
    assert outcome.ok and outcome.result == {"task": "t1"}, outcome
    said = [text for _, text in lines if text.startswith("line ")]
    assert len(said) == 2000 or any("not kept" in text for _, text in lines), lines[-1:]
    # Each chunk read waits for its cost; the last one's wait may be after the answer, and the
    # loop's timers end a pause to the millisecond, a little early at times (seen: 1.594 s
    # against 1.599), so 10% is allowed. Read as fast as it came, it took 0.02 s.
    read = sum(LogPacing.cost(text.encode() + b"\n") for _, text in lines)
    assert took >= 0.9 * (read - (256 << 10) * 2) / (1 << 20), (took, read)
    assert read > 1 << 20  # enough read for the bound to mean something


async def test_an_answer_in_frames_that_cannot_be_read_fails_the_attempt_saying_why() -> None:
    """What in a warm pod's answer could not be read is named in the attempt's error: the
    parser's own message only said "`on_body` callback error" (seen once in CI, its cause lost)."""

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = HEAD.pack(STDOUT, MAX_FRAME + 1)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()

    served = await asyncio.start_server(proxy, "127.0.0.1", 0)
    fn = TaskFunction.model_validate(
        {"metadata": {"name": "f", "namespace": "team-a"}, "spec": {"server": {"command": ["x"]}}}
    )
    pod = WarmPod("f-pod", "127.0.0.1", None, "secret-token", ready=True, kubelet_ready=True)
    pod.http = Http1Pool(served.sockets[0].getsockname()[1])
    pod.inflight = 1
    inv = dataclasses.replace(invocation([], payload={}), function=fn)
    async with served:
        outcome = await WarmExecution(WarmPool(fn), pod, inv).wait()
    assert not outcome.ok and outcome.error is not None
    assert f"a frame of {MAX_FRAME + 1} bytes" in outcome.error, outcome.error


async def test_a_pause_of_no_time_then_a_longer_one_both_hold() -> None:
    """Reading a paced answer pauses its connection again and again, some pauses already over
    when asked for: on uvloop (as in production) such a one's handle had no `when()`, and the
    next pause failed the whole attempt (seen in CI, 2 runs in 60 under load)."""
    got: asyncio.Queue[bytes] = asyncio.Queue()
    paused = asyncio.Event()

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await got.put(await reader.readuntil(b"\n"))
        await paused.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    served = await asyncio.start_server(peer, "127.0.0.1", 0)
    async with served:
        conn = await Http1Pool(served.sockets[0].getsockname()[1]).connection()
        answer = conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 100)
        await got.get()
        loop = asyncio.get_running_loop()
        started = loop.time()
        conn.pause(0)
        conn.pause(0.3)
        conn.pause(0.1)  # shorter than the pause under way: no change
        paused.set()
        assert await asyncio.wait_for(answer, 5) == (200, b"ok")
        assert loop.time() - started >= 0.25


async def test_a_warm_pods_proxy_holds_a_bounded_share_of_connections_per_address(
    warm_pod: tuple[str, Path, str],
) -> None:
    """Any pod of the cluster can reach a warm pod's proxy port, and Go's server kept whatever
    connections it was given: another tenant's pod could have held the proxy's memory until
    the function was unreachable. One address holds at most its concurrency (2) + 16; past
    that a new connection is closed at once, and another address is still served."""
    url, flag, _ = warm_pod
    flag.touch()
    port = int(url.rsplit(":", 1)[1])

    def ready(source: str) -> Awaitable[bytes]:
        request = b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        return from_address(source, port, request)

    for _ in range(200):  # the proxy is starting
        with contextlib.suppress(OSError):
            if (await ready("127.0.0.4")).startswith(b"HTTP/1.1 200"):
                break
        await asyncio.sleep(0.05)
    held = [
        await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.3", 0))
        for _ in range(2 + 16)
    ]
    try:
        held[0][1].write(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")  # one of them in use
        assert (await asyncio.wait_for(held[0][0].readline(), 5)).startswith(b"HTTP/1.1 200")
        assert await ready("127.0.0.3") == b""  # closed, nothing said
        assert (await ready("127.0.0.4")).startswith(b"HTTP/1.1 200")
        held.pop()[1].close()
        for _ in range(50):  # until the proxy has seen it go
            answer = await ready("127.0.0.3")
            if answer:
                break
            await asyncio.sleep(0.05)
        assert answer.startswith(b"HTTP/1.1 200")
    finally:
        for _, writer in held:
            writer.close()


async def test_a_draining_pod_finishes_what_it_serves_and_takes_nothing_new(
    warm_pod: tuple[str, Path, str],
) -> None:
    """What the preStop hook does before the kubelet stops the server: `kt-runtime drain`
    returns once the invocation in flight has ended; meanwhile new ones are answered 503 (busy,
    no attempt spent) and readiness fails."""
    url, flag, installed = warm_pod
    flag.touch()
    auth = {"Authorization": "Bearer secret-token", "X-Kubetask-Task-Id": "t"}
    port = url.rsplit(":", 1)[1]
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        for _ in range(200):
            with contextlib.suppress(httpx.TransportError):
                if (await http.get("/ready")).status_code == 200:
                    break
            await asyncio.sleep(0.05)
        running = asyncio.create_task(http.post("/invoke", json={"sleep": 1.5}, headers=auth))
        await asyncio.sleep(0.3)
        drain = await asyncio.create_subprocess_exec(
            installed, "drain", env={"KUBETASK_PROXY_PORT": port}
        )
        await asyncio.sleep(0.3)
        assert (await http.post("/invoke", json={"sleep": 0}, headers=auth)).status_code == 503
        assert (await http.get("/ready")).status_code == 503
        assert drain.returncode is None  # still waiting for the invocation in flight
        assert (await running).status_code == 200
        assert await asyncio.wait_for(drain.wait(), 5) == 0
    # /drain is for the pod itself: asked from another address (this host's own, off the
    # loopback), it is refused.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("198.51.100.1", 9))  # no packet is sent: this only picks the route
        outside = probe.getsockname()[0]
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.post(f"http://{outside}:{port}/drain")).status_code == 403


async def test_serve_passes_a_stop_to_a_server_that_would_ignore_it_as_pid_1(
    kt_runtime: str, tmp_path: Path
) -> None:
    """The kernel drops default-action signals to a container's PID 1; under `serve` the
    server is its child, in its own process group, and the stop reaches it."""
    env = {"PATH": os.environ["PATH"], "KUBETASK_RUNTIME_DIR": str(tmp_path)}
    serve = await asyncio.create_subprocess_exec(
        kt_runtime, "serve", "--", "sleep", "300", env=env, stderr=asyncio.subprocess.DEVNULL
    )
    await asyncio.sleep(0.3)
    serve.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(serve.wait(), 10) == 128 + signal.SIGTERM


async def test_a_sidecar_can_place_its_attempt_only_in_its_own_jobs_pod(
    server: RuntimeServer,
) -> None:
    """Where a sidecar says it runs is recorded on the task and `kubetask login` execs into it:
    another account's namespace, a pod its Job could not have made, or a node name outside the
    grammar are refused, and nothing is recorded."""
    attempt = server.open(invocation([]), job="f-0123456789ab-1")
    auth = {"Authorization": f"Bearer {attempt.token}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
        for where in (
            {"pod": "f-0123456789ab-1-x7k2p", "namespace": "kubetask"},
            {"pod": "kubetask-dispatcher-5d9f-x7k2p", "namespace": "team-a"},
            {"pod": "f-0123456789ab-1-x7k2p-more", "namespace": "team-a"},
            {"pod": "f-0123456789ab-1-x7k2p", "namespace": "team-a", "node": "a node"},
        ):
            refused = await http.post("/v1/run/start", json=where, headers=auth)
            assert refused.status_code == 400, where
        assert not attempt.placed.done()
        where = {"pod": "f-0123456789ab-1-x7k2p", "namespace": "team-a", "node": "node-1"}
        assert (await http.post("/v1/run/start", json=where, headers=auth)).status_code == 200
    assert attempt.placed.result().pod == "f-0123456789ab-1-x7k2p"


async def test_the_servers_container_cannot_forge_an_answer_through_the_output_socket(
    warm_pod: tuple[str, Path, str], tmp_path: Path
) -> None:
    """The output socket is open to the server's container (any user): what it sends there
    reaches the invocations in flight as output, never as their answer."""
    url, flag, _ = warm_pod
    flag.touch()
    auth = {"Authorization": "Bearer secret-token", "X-Kubetask-Task-Id": "real"}
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        for _ in range(200):  # the proxy is starting
            with contextlib.suppress(httpx.TransportError):
                if (await http.get("/ready")).status_code == 200:
                    break
            await asyncio.sleep(0.05)
        invoking = asyncio.create_task(http.post("/invoke", json={"sleep": 1}, headers=auth))
        await asyncio.sleep(0.3)  # in flight
        _, writer = await asyncio.open_unix_connection(str(tmp_path / "proxy.sock"))
        forged = b'{"task": "forged"}'
        said = b"forged line\n"
        writer.write(HEAD.pack(ANSWER, CODE.size + len(forged)) + CODE.pack(200) + forged)
        writer.write(HEAD.pack(STDOUT, len(said)) + said)
        await writer.drain()
        frames = FrameReader().feed((await invoking).content)
        writer.close()
    answers = [data for kind, data in frames if kind == ANSWER]
    assert [a[CODE.size :] for a in answers] == [b'{"task": "real"}'], frames
    assert (STDOUT, said) in frames  # the forger's connection was read: its output came through
