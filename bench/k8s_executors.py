"""Executors on a real node (issue 10): the e2e tier's control plane and kubelet (`e2e/node.py`),
the chart installed with the kubernetes executor, then again with the local one.

- warm pods: no-op tasks to a `server` function whose pods are up, tasks/s; the same function
  with the local executor (its instances are processes in the dispatcher's pod); the ratio.
- scale from zero: submit -> start of a first task while the function has no pod (start is
  read by the function itself, the moment its server takes the invocation).
- Job per task: submit -> start (the command's first instruction) p50/p99, and tasks/s, with at
  most 20 Jobs at once.

Prints figures; asserts nothing. Needs what `./scripts/test` installs (root: containerd, the CNI
plugins). Run: .venv/bin/python bench/k8s_executors.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "e2e"))

from controlplane import ControlPlane, binaries  # noqa: E402
from figures import pct  # noqa: E402
from kubetask.auth import hash_token  # noqa: E402
from node import CHART_VALUES, Node, host_ip, images  # noqa: E402

CHART = str(ROOT / "charts" / "kubetask")
TOKEN = "kt_bench-k8s-executors"
ACCOUNT = "bench"
SERVER = """
import http.server, json, os, time
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def do_POST(self):
        start = time.time()
        self.rfile.read(int(self.headers["Content-Length"]))
        out = json.dumps({"start": start}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(out))); self.end_headers()
        self.wfile.write(out)
    def log_message(self, *args): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""


def server_fn(name: str, concurrency: int, instances: int, idle: float) -> dict[str, Any]:
    return {
        "apiVersion": "kubetask.io/v1alpha1",
        "kind": "TaskFunction",
        "metadata": {"name": name, "namespace": ACCOUNT},
        "spec": {
            "server": {
                "command": ["python3", "-c", SERVER],
                "concurrency": concurrency,
                "maxInstances": instances,
                "idleSeconds": idle,
            },
            "maxConcurrency": concurrency * instances,
            "timeoutSeconds": 60,
        },
    }


class Bench:
    def __init__(self, cluster: ControlPlane, release: str) -> None:
        self.cluster = cluster
        self.release = release
        self.ns = f"kt-{release}"

    def install(self, executor: str) -> str:
        entry = {"name": "bench", "account": ACCOUNT, "admin": False, "sha256": hash_token(TOKEN)}
        self.cluster.run(
            "helm", "install", self.release, CHART, "--namespace", self.ns, "--create-namespace",
            *CHART_VALUES, "--set", f"dispatcher.executor={executor}",
            "--set-json", f"auth.tokens={json.dumps([entry])}", "--wait", "--timeout", "240s",
        )  # fmt: skip
        gw = json.loads(
            self.cluster.kubectl(
                "get", "service", f"{self.release}-kubetask-gateway", "-n", self.ns, "-o", "json"
            ).stdout
        )["spec"]
        url = f"http://{gw['clusterIP']}:{gw['ports'][0]['port']}"
        for _ in range(120):  # the operator makes the gateway after the chart is up
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
            time.sleep(1)
        raise RuntimeError("the gateway never answered")

    def uninstall(self) -> None:
        self.cluster.run("helm", "uninstall", self.release, "--namespace", self.ns, "--wait")

    def pods(self, function: str) -> int:
        out = self.cluster.kubectl(
            "get", "pods", "-n", ACCOUNT, "-l", f"kubetask.io/function={function}", "-o", "name"
        ).stdout
        return len(out.split())


async def submit_all(api: httpx.AsyncClient, function: str, ids: list[str], payload: Any) -> None:
    queue = iter(ids)

    async def one() -> None:
        for task_id in queue:
            sent = await api.post(
                "/v1/tasks", json={"function": function, "id": task_id, "payload": payload}
            )
            sent.raise_for_status()

    await asyncio.gather(*(one() for _ in range(32)))


async def finished(
    api: httpx.AsyncClient, prefix: str, n: int, timeout: float = 600
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done: list[dict[str, Any]] = []
        cursor = None
        while True:
            params = {"idPrefix": prefix, "status": "Succeeded,Failed", "limit": "1000"}
            if cursor:
                params["cursor"] = cursor
            page = (await api.get("/v1/tasks", params=params)).json()
            done += page["items"]
            cursor = page["cursor"]
            if not cursor:
                break
        if len(done) >= n:
            failed = [t for t in done if t["status"]["phase"] != "Succeeded"]
            if failed:
                raise RuntimeError(f"{len(failed)} failed, e.g. {failed[0]['status'].get('error')}")
            return done
        await asyncio.sleep(0.5)
    raise TimeoutError(f"{prefix}: not all {n} finished")


def ts(task: dict[str, Any], stage: str) -> float:
    return datetime.fromisoformat(task["status"]["timestamps"][stage]).timestamp()


def throughput(done: list[dict[str, Any]]) -> float:
    return len(done) / (
        max(ts(t, "finished") for t in done) - min(ts(t, "submitted") for t in done)
    )


def starts(done: list[dict[str, Any]]) -> list[float]:
    """Submit -> the moment the function's own code began (its result says when)."""
    out = []
    for t in done:
        result = t["status"]["result"]
        start = float(result["start"] if isinstance(result, dict) else result)
        out.append(start - ts(t, "submitted"))
    return out


async def warm_throughput(url: str, tasks: int, tag: str) -> float:
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
    ) as api:
        (await api.put("/v1/functions/noop", json=server_fn("noop", 16, 2, 600))).raise_for_status()
        warm = [f"{tag}-warm-{i:05d}" for i in range(300)]
        await submit_all(api, "noop", warm, None)
        await finished(api, f"{tag}-warm-", len(warm))
        ids = [f"{tag}-run-{i:05d}" for i in range(tasks)]
        await submit_all(api, "noop", ids, None)
        return throughput(await finished(api, f"{tag}-run-", tasks))


async def scale_from_zero(bench: Bench, url: str, rounds: int) -> list[float]:
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
    ) as api:
        (await api.put("/v1/functions/cold", json=server_fn("cold", 4, 1, 2))).raise_for_status()
        found = []
        for i in range(rounds):
            for _ in range(240):  # back at zero (idle 2 s, then the operator scales down)
                if not bench.pods("cold"):
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(1)
            await submit_all(api, "cold", [f"cold-{i:03d}"], None)
            found += starts(await finished(api, f"cold-{i:03d}", 1))
        return found


def pod_starts(done: list[dict[str, Any]]) -> list[float]:
    """Dispatched -> the command's first instruction: the Job's pod starting, without the time
    a task waited for one of the 20 slots."""
    return [
        s + ts(t, "submitted") - ts(t, "dispatched")
        for s, t in zip(starts(done), done, strict=True)
    ]


async def jobs(url: str, tasks: int) -> tuple[list[float], list[float], float]:
    fn = {
        "apiVersion": "kubetask.io/v1alpha1",
        "kind": "TaskFunction",
        "metadata": {"name": "job", "namespace": ACCOUNT},
        "spec": {"command": ["date", "+%s.%N"], "maxConcurrency": 20, "timeoutSeconds": 120},
    }
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
    ) as api:
        (await api.put("/v1/functions/job", json=fn)).raise_for_status()
        await submit_all(api, "job", [f"job-{i:04d}" for i in range(tasks)], None)
        done = await finished(api, "job-", tasks)
        return starts(done), pod_starts(done), throughput(done)


def report_jobs(url: str, tasks: int) -> None:
    job_starts, job_pods, job_rate = asyncio.run(jobs(url, tasks))
    print(
        f"  Job per task ({tasks} tasks, at most 20 at once): submit -> start"
        f" p50 {pct(job_starts, 0.5) * 1e3:.0f} ms, p99 {pct(job_starts, 0.99) * 1e3:.0f} ms"
        f" (of which the pod: dispatched -> start p50 {pct(job_pods, 0.5) * 1e3:.0f} ms,"
        f" p99 {pct(job_pods, 0.99) * 1e3:.0f} ms); {job_rate:.2f} tasks/s"
    )


def main(args: argparse.Namespace) -> None:
    archive = images()
    root = Path(tempfile.mkdtemp(prefix="kt-bench-k8s-"))
    cluster = ControlPlane(root / "k8s", binaries())
    node = Node(cluster, root / "node", host_ip())
    try:
        cluster.start(controllers=True, advertise=host_ip())
        node.start(archive)
        cluster.kubectl("create", "namespace", ACCOUNT)
        bench = Bench(cluster, "bench")
        url = bench.install("kubernetes")
        if args.only_jobs:
            report_jobs(url, args.jobs)
            return
        print(f"node: {args.tasks} no-op tasks per run, 32 submitters over HTTP from the host")
        warm = asyncio.run(warm_throughput(url, args.tasks, "k8s"))
        print(f"  warm pods (2 pods x 16 concurrency, behind the proxy): {warm:.0f} tasks/s")
        cold = asyncio.run(scale_from_zero(bench, url, args.cold_rounds))
        print(
            f"  scale from zero, submit -> start ({len(cold)} rounds): p50 {pct(cold, 0.5) * 1e3:.0f} ms,"
            f" max {max(cold) * 1e3:.0f} ms (target p50 < 2000 ms)"
        )
        report_jobs(url, args.jobs)
        bench.uninstall()
        cluster.kubectl("delete", "namespace", ACCOUNT, "--wait=true")
        cluster.kubectl("create", "namespace", ACCOUNT)
        url = Bench(cluster, "local").install("local")
        local = asyncio.run(warm_throughput(url, args.tasks, "local"))
        print(f"  local executor (2 instances x 16, in the dispatcher's pod): {local:.0f} tasks/s")
        print(f"  warm pods / local: {warm / local:.2f} (target >= 0.7)")
    finally:
        node.stop()
        cluster.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=3000)
    ap.add_argument("--cold-rounds", type=int, default=7)
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--only-jobs", action="store_true", help="the Job-per-task figures alone")
    main(ap.parse_args())
