"""End-to-end throughput and latency of no-op tasks, against baselines measured in the same run.

kubetask: HTTP submit -> gateway -> JetStream -> dispatcher -> warm `server` executor ->
Succeeded recorded (counted from the audit events). Baselines: Celery and Dramatiq on Redis, two
worker processes each, results stored. Ceiling: raw nats-py JetStream publish+fetch+ack on the
same nats-server. Then an open-loop load at 30% of kubetask's peak for submit->start latency.

Prints figures; asserts nothing. Run through bench/run.sh.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import nats
from devrun import children
from figures import pct
from kubetask import nats_auth, sched_batch
from kubetask.auth import create_token
from kubetask.embedded import free_port, start_nats, wait_for_port
from kubetask.executors.http1 import Http1Pool
from nats.js.api import ConsumerConfig, RetentionPolicy, StreamConfig

HERE = Path(__file__).resolve().parent
SLOTS = 256  # the no-op function's maxConcurrency
PY = sys.executable


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its threads so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Kubetask:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.nats_port = free_port()
        self.nats_url = f"nats://127.0.0.1:{self.nats_port}"
        self.procs: list[subprocess.Popen[bytes]] = []

    async def start(self) -> None:
        # NATS with the platform's users and permissions, as `kubetask dev` and the chart run
        # it, and under `kubetask dev`'s scheduling policy (KUBETASK_DEV_NATS_BATCH=off: not).
        self.passwords = nats_auth.load_or_create(self.work / "secrets" / "nats-users.json")
        conf = nats_auth.write_server_config(self.work / "secrets" / "nats.conf", self.passwords)
        batch = sched_batch.wanted()
        self.procs.append(start_nats(self.work / "js", self.nats_port, config=conf, batch=batch))
        assert not batch or sched_batch.holds(self.procs[0].pid), "SCHED_BATCH refused"
        tokens = self.work / "tokens.json"
        self.token = create_token(tokens, "bench", "bench")
        # The dispatcher shows its per-function counters to the holder of this token only.
        self.metrics_token = secrets.token_urlsafe(16)
        env = dict(
            os.environ, KUBETASK_NATS_URL=self.nats_url, KUBETASK_METRICS_TOKEN=self.metrics_token
        )
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        log = open(self.work / "kubetask.log", "ab")
        self.metrics_port = free_port()
        for args in (
            ["gateway", "--port", str(port), "--tokens", str(tokens)],
            ["dispatcher", "--metrics-port", str(self.metrics_port)],
        ):
            self.procs.append(
                subprocess.Popen(
                    [PY, "-m", "kubetask", *args],
                    env={
                        **env,
                        **nats_auth.env_for(args[0], self.passwords, self.work / "secrets"),
                    },
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        wait_for_port(port, proc=self.procs[1])
        # An async no-op instance takes hundreds of requests at once. Each task holds its slot
        # through four NATS round trips and the call, which on a loaded machine take ~40 ms
        # together: with 64 slots the dispatcher was bound by that, not by CPU.
        fn = {
            "apiVersion": "kubetask.io/v1alpha1",
            "kind": "TaskFunction",
            "metadata": {"name": "noop", "namespace": "bench"},
            "spec": {
                "server": {
                    "command": [PY, str(HERE / "noop_server.py")],
                    "concurrency": SLOTS,
                    "maxInstances": 1,
                },
                "maxConcurrency": SLOTS,
                "timeoutSeconds": 10,
            },
        }
        # Submissions go over kubetask's own keep-alive HTTP/1.1 client (the dispatcher's, for
        # warm instances): on two shared cores the load generator's CPU is taken from the system
        # it measures, and aiohttp's client spent about twice as much per request.
        self.headers = {
            "Authorization": f"Bearer {self.token}",
            "Content-Type": "application/json",
        }
        self.http = Http1Pool(port)
        self.session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {self.token}"},
            connector=aiohttp.TCPConnector(limit=128),
        )
        async with self.session.put(f"{self.url}/v1/functions/noop", json=fn) as resp:
            assert resp.status == 200, await resp.text()

    async def succeeded(self) -> int:
        """Tasks recorded Succeeded so far, read from the dispatcher's own counter: it is counted
        once the Succeeded record is written. Cheaper for the client than following every phase
        change in the audit stream, which would steal CPU from the system under test."""
        async with self.session.get(
            f"http://127.0.0.1:{self.metrics_port}/metrics",
            headers={"Authorization": f"Bearer {self.metrics_token}"},
        ) as resp:
            text = await resp.text()
        for line in text.splitlines():
            if line.startswith("kubetask_tasks_succeeded_total{"):
                return int(float(line.rsplit(" ", 1)[1]))
        return 0

    async def wait_succeeded(self, target: int, timeout: float = 300) -> None:
        deadline = time.perf_counter() + timeout
        while await self.succeeded() < target:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"only {await self.succeeded()} of {target} tasks succeeded")
            await asyncio.sleep(0.05)

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far by each component of the run, the client included."""
        nats_server, gateway, dispatcher = (p.pid for p in self.procs[:3])
        return {
            "gateway": cpu_seconds(gateway),
            "dispatcher": cpu_seconds(dispatcher),
            "nats-server": cpu_seconds(nats_server),
            "instance": sum(cpu_seconds(c) for c in children(dispatcher)),
            "bench client": cpu_seconds(os.getpid()),
        }

    async def submit(self, task_id: str | None = None) -> float:
        body: dict[str, object] = {"function": "noop", "payload": {"n": 1}}
        if task_id:
            body["id"] = task_id
        request = self.http.encode(b"POST", "/v1/tasks", self.headers, json.dumps(body).encode())
        t0 = time.perf_counter()
        conn = await self.http.connection()
        status, answer = await conn.send(request, 1 << 20)
        assert status == 202, (status, answer)
        return time.perf_counter() - t0

    async def closed_loop(self, n: int, concurrency: int) -> tuple[float, list[float]]:
        """Submit n tasks with `concurrency` in flight; tasks/s until all are Succeeded."""
        target = await self.succeeded() + n
        latencies: list[float] = []
        queue = iter(range(n))

        async def client() -> None:
            for _ in queue:
                latencies.append(await self.submit())

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        await self.wait_succeeded(target)
        return n / (time.perf_counter() - t0), latencies

    async def open_loop(self, rate: float, seconds: float) -> list[float]:
        """Submit at a fixed rate regardless of responses; returns submit->start latencies."""
        n = int(rate * seconds)
        target = await self.succeeded() + n
        prefix = f"open{int(time.time())}-"
        # The client must not pause either: a collector pause here would send a burst, which is
        # not the open loop being measured. Finished submissions are let go for the same reason.
        gc.collect()
        gc.freeze()
        start = time.perf_counter()
        pending: set[asyncio.Task[float]] = set()
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self.submit(f"{prefix}{i:06d}"))
            pending.add(task)
            task.add_done_callback(pending.discard)
        while pending:
            await asyncio.gather(*pending)
        await self.wait_succeeded(target)
        lat: list[float] = []
        self.stages: dict[str, list[float]] = {"queued": [], "claimed": []}
        cursor = None
        while True:
            params = {"idPrefix": prefix, "limit": "1000", **({"cursor": cursor} if cursor else {})}
            async with self.session.get(f"{self.url}/v1/tasks", params=params) as resp:
                page = await resp.json()
            for t in page["items"]:
                ts = t["status"]["timestamps"]
                lat.append(datetime_of(ts["started"]) - datetime_of(ts["submitted"]))
                for stage, a, b in (
                    ("queued", "submitted", "dispatched"),
                    ("claimed", "dispatched", "started"),
                ):
                    self.stages[stage].append(datetime_of(ts[b]) - datetime_of(ts[a]))
            cursor = page["cursor"]
            if not cursor:
                return lat

    async def stop(self) -> None:
        self.http.close()
        await self.session.close()
        for p in reversed(self.procs):
            p.terminate()
            p.wait(30)


def datetime_of(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp).timestamp()


async def raw_jetstream(nats_url: str, n: int, admin_password: str) -> float:
    """Publish (acked) + fetch + ack of n small messages through one stream: the ceiling."""
    nc = await nats.connect(nats_url, user="admin", password=admin_password)
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(name="RAW", subjects=["raw.>"], retention=RetentionPolicy.WORK_QUEUE)
    )
    sub = await js.pull_subscribe(
        "raw.x", durable="raw", stream="RAW", config=ConsumerConfig(max_ack_pending=1024)
    )
    data = b'{"a":"bench","id":"0123456789abcdef","t":"0123456789abcdef"}'
    t0 = time.perf_counter()

    async def produce() -> None:
        sem = asyncio.Semaphore(64)

        async def one() -> None:
            async with sem:
                await js.publish("raw.x", data)

        await asyncio.gather(*(one() for _ in range(n)))

    async def consume() -> None:
        got = 0
        while got < n:
            try:
                msgs = await sub.fetch(256, timeout=1)
            except TimeoutError:
                continue
            for m in msgs:
                await m.ack()
            got += len(msgs)

    await asyncio.gather(produce(), consume())
    rate = n / (time.perf_counter() - t0)
    await js.delete_stream("RAW")
    await nc.close()
    return rate


class Redis:
    def __init__(self, work: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(work),
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def celery_run(redis_url: str, n: int, work: Path) -> float:
    env = dict(os.environ, BENCH_REDIS_URL=redis_url, PYTHONPATH=str(HERE.parent))
    worker = subprocess.Popen(
        [
            PY,
            "-m",
            "celery",
            "-A",
            "bench.baselines:celery_app",
            "worker",
            "--concurrency",
            "2",
            "--pool",
            "prefork",
            "--loglevel",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        env=env,
        stdout=open(work / "celery.log", "ab"),
        stderr=subprocess.STDOUT,
    )
    try:
        os.environ["BENCH_REDIS_URL"] = redis_url
        sys.path.insert(0, str(HERE.parent))
        from bench import baselines

        baselines.celery_app.conf.broker_url = redis_url
        baselines.celery_app.conf.result_backend = redis_url
        warm = [baselines.celery_noop.delay(i) for i in range(200)]
        for r in warm:
            r.get(timeout=60)
        t0 = time.perf_counter()
        results = [baselines.celery_noop.delay(i) for i in range(n)]
        for r in results:
            r.get(timeout=300)
        return n / (time.perf_counter() - t0)
    finally:
        worker.terminate()
        worker.wait(30)


def dramatiq_run(redis_url: str, n: int, work: Path) -> float:
    env = dict(os.environ, BENCH_REDIS_URL=redis_url, PYTHONPATH=str(HERE.parent))
    worker = subprocess.Popen(
        [PY, "-m", "dramatiq", "bench.baselines", "--processes", "2", "--threads", "8"],
        env=env,
        stdout=open(work / "dramatiq.log", "ab"),
        stderr=subprocess.STDOUT,
    )
    try:
        from bench import baselines

        warm = [baselines.dramatiq_noop.send(i) for i in range(200)]
        for m in warm:
            m.get_result(block=True, timeout=60_000)
        t0 = time.perf_counter()
        msgs = [baselines.dramatiq_noop.send(i) for i in range(n)]
        for m in msgs:
            m.get_result(block=True, timeout=300_000)
        return n / (time.perf_counter() - t0)
    finally:
        worker.terminate()
        worker.wait(30)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--open-seconds", type=float, default=10)
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="kubetask, Celery and Dramatiq measured one after the other this many times; "
        "ratios are taken within a round and their median reported",
    )
    ap.add_argument("--skip-baselines", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kubetask-bench-"))
    print(
        f"2-core machine: {os.cpu_count()} cpus; {args.tasks} no-op tasks per system and round, "
        f"{args.rounds} rounds; work in {work}; nats-server under "
        f"{'SCHED_BATCH' if sched_batch.wanted() else 'the default policy'}"
    )

    kt = Kubetask(work)
    await kt.start()
    redis = None if args.skip_baselines else Redis(work)
    kt_rates: list[float] = []
    vs_celery: list[float] = []
    vs_dramatiq: list[float] = []
    try:
        await kt.closed_loop(300, args.concurrency)  # warm-up: instance started, JIT-free paths hot
        for n in range(1, args.rounds + 1):
            before = kt.cpu()
            kt_rate, submit_lat = await kt.closed_loop(args.tasks, args.concurrency)
            used = {k: (v - before[k]) / args.tasks * 1000 for k, v in kt.cpu().items()}
            kt_rates.append(kt_rate)
            print(
                f"round {n}: kubetask end-to-end {kt_rate:6.0f} tasks/s   submit latency "
                f"p50 {pct(submit_lat, 0.5) * 1000:.1f} ms  p99 {pct(submit_lat, 0.99) * 1000:.1f}"
                f" ms (with {args.concurrency} in flight)"
            )
            print(
                f"  CPU ms per task: {sum(used.values()):.2f} = "
                + ", ".join(f"{k} {v:.2f}" for k, v in used.items())
            )
            if redis is not None:
                celery_rate = celery_run(redis.url, args.tasks, work)
                dramatiq_rate = dramatiq_run(redis.url, args.tasks, work)
                vs_celery.append(kt_rate / celery_rate)
                vs_dramatiq.append(kt_rate / dramatiq_rate)
                print(
                    f"  celery (redis, 2 procs) {celery_rate:6.0f} tasks/s, dramatiq (redis, "
                    f"2 procs) {dramatiq_rate:6.0f} tasks/s: kubetask = {vs_celery[-1]:.2f}x "
                    f"celery, {vs_dramatiq[-1]:.2f}x dramatiq"
                )
        peak = statistics.median(kt_rates)
        rate = 0.3 * peak
        lat = await kt.open_loop(rate, args.open_seconds)
        print(
            f"open loop at {rate:.0f}/s (30% of the median peak), {len(lat)} tasks: submit->start "
            f"p50 {pct(lat, 0.5) * 1000:.1f} ms  p99 {pct(lat, 0.99) * 1000:.1f} ms  "
            f"mean {statistics.mean(lat) * 1000:.1f} ms"
        )
        for stage, values in kt.stages.items():
            print(
                f"  {stage}: p50 {pct(values, 0.5) * 1000:.1f} ms  p99 {pct(values, 0.99) * 1000:.1f} ms"
            )
        ceiling = await raw_jetstream(kt.nats_url, args.tasks * 4, kt.passwords["admin"])
        print(
            f"raw JetStream publish+fetch+ack: {ceiling:8.0f} msgs/s  "
            f"(kubetask's median = {peak / ceiling:.1%} of it)"
        )
    finally:
        await kt.stop()
        if redis is not None:
            redis.stop()
    print(f"kubetask, median of {args.rounds} rounds: {peak:.0f} tasks/s")
    if vs_celery:
        print(
            f"kubetask / celery   = {statistics.median(vs_celery):.2f}x   (median; issue 2: >= 3x, issue 9: >= 4x)"
        )
        print(
            f"kubetask / dramatiq = {statistics.median(vs_dramatiq):.2f}x   (median; issue 2: >= 1x, issue 9: >= 1.3x)"
        )


if __name__ == "__main__":
    asyncio.run(main())
