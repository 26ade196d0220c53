"""Noisy neighbour across accounts (issue 9, benchmark 1): account A floods no-op tasks as fast as
it can while account B submits one every 10 ms; B's submit->start p99 with A flooding is divided
by B's p99 alone, measured in the same run, with fairness on and then off. `--functions 1024
--accounts 16` repeats it with that many more functions registered (spread over that many
accounts), to show the many-subjects layout does not slow JetStream down.

Prints figures; asserts nothing. Run: .venv/bin/python bench/noisy.py
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

import httpx
from devrun import Dev, running_dev
from figures import pct
from kubetask.auth import create_token
from kubetask.executors.http1 import Http1Pool

HERE = Path(__file__).resolve().parent
PY = sys.executable


def server_function(name: str, account: str, slots: int) -> dict[str, object]:
    return {
        "apiVersion": "kubetask.io/v1alpha1",
        "kind": "TaskFunction",
        "metadata": {"name": name, "namespace": account},
        "spec": {
            "server": {
                "command": [PY, str(HERE / "noop_server.py")],
                "concurrency": slots,
                "maxInstances": 1,
            },
            "maxConcurrency": slots,
            "timeoutSeconds": 10,
        },
    }


def idle_function(name: str, account: str) -> dict[str, object]:
    return {
        "apiVersion": "kubetask.io/v1alpha1",
        "kind": "TaskFunction",
        "metadata": {"name": name, "namespace": account},
        "spec": {"command": ["true"], "maxConcurrency": 4},
    }


class Sender:
    """Submits over kubetask's keep-alive HTTP/1.1 client, which costs the shared cores least."""

    def __init__(self, dev: Dev, token: str, function: str) -> None:
        self.port = int(dev.url.rsplit(":", 1)[1])
        self.pool = Http1Pool(self.port)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.function = function
        self.answered: list[float] = []  # seconds from sending a submission to its answer

    async def submit(self, task_id: str) -> int:
        body = json.dumps({"function": self.function, "id": task_id}).encode()
        request = self.pool.encode(b"POST", "/v1/tasks", self.headers, body)
        t0 = time.perf_counter()
        conn = await self.pool.connection()
        status, _ = await conn.send(request, 1 << 20)
        self.answered.append(time.perf_counter() - t0)
        return status


async def steady(sender: Sender, prefix: str, until: float, every: float) -> int:
    """One submission every `every` seconds (open loop) until `until`; returns how many."""
    start = time.monotonic()
    pending: set[asyncio.Task[int]] = set()
    i = 0
    while time.monotonic() < until:
        delay = start + i * every - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(sender.submit(f"{prefix}{i:06d}"))
        pending.add(task)
        task.add_done_callback(pending.discard)
        i += 1
    while pending:
        await asyncio.gather(*pending)
    return i


async def flood(sender: Sender, prefix: str, n: int, concurrency: int) -> dict[int, int]:
    seen: dict[int, int] = {}
    ids = iter(range(n))

    async def one() -> None:
        for i in ids:
            status = await sender.submit(f"{prefix}{i:06d}")
            seen[status] = seen.get(status, 0) + 1

    await asyncio.gather(*(one() for _ in range(concurrency)))
    return seen


STAGES = (("submitted", "dispatched"), ("dispatched", "started"))


async def starts(
    http: httpx.AsyncClient, prefix: str, n: int, stages: dict[str, list[float]] | None = None
) -> list[float]:
    """Submit->start of every task under `prefix`, once all n have started; with `stages`, the
    time from each stage to the next too."""
    for _ in range(600):
        lat: list[float] = []
        if stages is not None:
            stages.clear()
        cursor = None
        while True:
            params = {"idPrefix": prefix, "limit": "1000", **({"cursor": cursor} if cursor else {})}
            page = (await http.get("/v1/tasks", params=params)).json()
            for t in page["items"]:
                ts = t["status"]["timestamps"]
                if ts.get("started"):
                    submitted = datetime.fromisoformat(ts["submitted"])
                    lat.append((datetime.fromisoformat(ts["started"]) - submitted).total_seconds())
                    for a, b in STAGES if stages is not None else ():
                        if not (ts.get(a) and ts.get(b)):  # a stage not reached yet
                            continue
                        gap = datetime.fromisoformat(ts[b]) - datetime.fromisoformat(ts[a])
                        stages.setdefault(f"{a}->{b}", []).append(gap.total_seconds())
            cursor = page["cursor"]
            if not cursor:
                break
        if len(lat) >= n:
            return lat
        await asyncio.sleep(1)
    raise TimeoutError(f"only {len(lat)} of {n} tasks under {prefix} started")


async def waiting(http: httpx.AsyncClient, account: str) -> bool:
    params = {"account": account, "status": "Pending,Queued", "limit": "1"}
    return bool((await http.get("/v1/tasks", params=params)).json()["items"])


async def one_run(args: argparse.Namespace, fairness: bool) -> tuple[float, float, float, float]:
    work = Path(tempfile.mkdtemp(prefix="kt-noisy-"))
    env = {
        "KUBETASK_FAIRNESS": "on" if fairness else "off",
        "KUBETASK_GATEWAY_FAIR_SLOTS": str(args.gateway_slots),
        "KUBETASK_DISPATCH_FAIR_SLOTS": str(args.dispatch_slots),
    }
    async with running_dev(work, **env) as dev:
        tokens = {a: create_token(work / "tokens.json", a, a) for a in ("flood", "calm")}
        admin = {"Authorization": f"Bearer {dev.admin_token}"}
        async with httpx.AsyncClient(base_url=dev.url, headers=admin, timeout=60) as h:
            for body in (
                server_function("bulk", "flood", 256),
                server_function("quick", "calm", 16),
            ):
                meta = body["metadata"]
                assert isinstance(meta, dict)
                (await h.put(f"/v1/functions/{meta['name']}", json=body)).raise_for_status()
            for i in range(args.functions):
                account = f"idle{i % args.accounts:02d}"
                body = idle_function(f"f{i:04d}", account)
                (await h.put(f"/v1/functions/f{i:04d}", json=body)).raise_for_status()
            a, b = Sender(dev, tokens["flood"], "bulk"), Sender(dev, tokens["calm"], "quick")
            for i in range(50):  # warm both instances
                await a.submit(f"warm{i}")
                await b.submit(f"warm{i}")
            await asyncio.sleep(2)
            b.answered.clear()
            alone_n = await steady(b, "alone-", time.monotonic() + args.seconds, 0.01)
            alone = await starts(h, "alone-", alone_n)
            answered_alone, b.answered = b.answered, []
            t0 = time.monotonic()
            flooding = asyncio.create_task(flood(a, "flood-", args.tasks, args.concurrency))
            await asyncio.sleep(0.5)
            busy_n = 0
            # B keeps going while A submits and while A's backlog is being dispatched.
            while not flooding.done() or await waiting(h, "flood"):
                busy_n += await steady(b, f"busy{busy_n:06d}-", time.monotonic() + 1, 0.01)
            seen = await flooding
            took = time.monotonic() - t0
            stages: dict[str, list[float]] = {}
            busy = await starts(h, "busy", busy_n, stages)
            print(
                f"  fairness {'on ' if fairness else 'off'}: A's {args.tasks} submitted in"
                f" {took:.1f}s {seen}, drained after {time.monotonic() - t0:.1f}s; B alone p50 {pct(alone, 0.5) * 1e3:.1f} ms p99"
                f" {pct(alone, 0.99) * 1e3:.1f} ms ({len(alone)}); with A flooding p50"
                f" {pct(busy, 0.5) * 1e3:.1f} ms p99 {pct(busy, 0.99) * 1e3:.1f} ms ({len(busy)})"
            )
            stages["B's submit answered (alone)"] = answered_alone
            stages["B's submit answered"] = b.answered
            for stage, values in stages.items():
                print(
                    f"    {stage}: p50 {pct(values, 0.5) * 1e3:.1f} ms,"
                    f" p99 {pct(values, 0.99) * 1e3:.1f} ms"
                )
            for c in (a, b):
                c.pool.close()
            return pct(alone, 0.5), pct(alone, 0.99), pct(busy, 0.5), pct(busy, 0.99)


async def main(args: argparse.Namespace) -> None:
    print(
        f"A floods {args.tasks} no-op tasks ({args.concurrency} submitters), B one every 10 ms;"
        f" {args.functions} more functions over {args.accounts} accounts"
    )
    ratios = {}
    for fairness in (True, False)[: 1 if args.only_fair else 2]:
        _, alone99, _, busy99 = await one_run(args, fairness)
        ratios[fairness] = busy99 / alone99
    print(
        "  B's p99 with A flooding / alone:",
        ", ".join(f"fairness {'on' if k else 'off'} {v:.2f}" for k, v in ratios.items()),
        "(target <= 2)",
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--functions", type=int, default=0)
    ap.add_argument("--accounts", type=int, default=16)
    ap.add_argument("--gateway-slots", type=int, default=8)
    ap.add_argument("--dispatch-slots", type=int, default=32)
    ap.add_argument("--only-fair", action="store_true", help="skip the run with fairness off")
    asyncio.run(main(ap.parse_args()))
