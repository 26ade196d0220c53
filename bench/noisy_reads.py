"""Noisy neighbour through reads: account A reads one of its tasks as fast as it can (64 reads
at a time, from a client process at nice 19, as if it ran elsewhere) while account B submits
one task every 20 ms; B's submission round trip (p50, p99) alone and with A reading, with
fairness on and then off. Fairness on, A's reads take turns at the gateway with B's
submissions (`gateway/fair_gate.py`).

Prints figures; asserts nothing. Run: .venv/bin/python bench/noisy_reads.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from devrun import running_dev
from figures import each_way, pct, summary
from kubetask.auth import create_token
from kubetask.executors.http1 import Http1Pool


async def submissions(port: int, token: str, n: int, every: float) -> list[float]:
    """Seconds from sending each of `n` submissions, one every `every`, to its answer."""
    pool = Http1Pool(port)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    answered: list[float] = []
    try:
        for i in range(n):
            body = json.dumps({"function": "quick", "payload": i}).encode()
            request = pool.encode(b"POST", "/v1/tasks", headers, body)
            t0 = time.perf_counter()
            status, _ = await (await pool.connection()).send(request, 1 << 20)
            answered.append(time.perf_counter() - t0)
            assert status == 202, status
            await asyncio.sleep(every)
    finally:
        pool.close()
    return answered


async def reader(port: int, token: str, path: str, concurrency: int, seconds: float) -> None:
    """The flooding reader (run in its own process): prints how many reads were answered."""
    pool = Http1Pool(port)
    request = pool.encode(b"GET", path, {"Authorization": f"Bearer {token}"}, b"")
    end = time.monotonic() + seconds
    statuses: dict[int, int] = {}

    async def one() -> None:
        while time.monotonic() < end:
            status, _ = await (await pool.connection()).send(request, 1 << 20)
            statuses[status] = statuses.get(status, 0) + 1

    await asyncio.gather(*(one() for _ in range(concurrency)))
    pool.close()
    print(json.dumps(statuses))


async def one_run(args: argparse.Namespace, fairness: bool) -> tuple[float, float]:
    work = Path(tempfile.mkdtemp(prefix="kt-noisy-reads-"))
    async with running_dev(work, KUBETASK_FAIRNESS="on" if fairness else "off") as dev:
        port = int(dev.url.rsplit(":", 1)[1])
        tokens = {a: create_token(work / "tokens.json", a, a) for a in ("reader", "calm")}
        for account, name in (("reader", "r"), ("calm", "quick")):
            fn = {
                "apiVersion": "kubetask.io/v1alpha1",
                "kind": "TaskFunction",
                "metadata": {"name": name, "namespace": account},
                "spec": {"command": ["true"], "maxConcurrency": 16},
            }
            headers = {"Authorization": f"Bearer {tokens[account]}"}
            async with httpx.AsyncClient(base_url=dev.url, headers=headers) as http:
                (await http.put(f"/v1/functions/{name}", json=fn)).raise_for_status()
                if account == "reader":
                    task = (await http.post("/v1/tasks", json={"function": "r"})).json()
        await submissions(port, tokens["calm"], 50, args.every)  # warm
        alone = await submissions(port, tokens["calm"], args.submissions, args.every)
        seconds = args.submissions * args.every * 1.5 + 3
        flood = subprocess.Popen(
            [
                "nice",
                "-n",
                "19",
                sys.executable,
                __file__,
                "--reader",
                f"{port},{tokens['reader']},/v1/tasks/{task['metadata']['name']},{seconds}",
                "--concurrency",
                str(args.concurrency),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        await asyncio.sleep(2)
        busy = await submissions(port, tokens["calm"], args.submissions, args.every)
        out, _ = flood.communicate(timeout=seconds + 30)
        reads = json.loads(out.strip().splitlines()[-1])
        print(
            f"  fairness {'on ' if fairness else 'off'}: B's submit alone {summary(alone)};"
            f" with A reading {summary(busy)};"
            f" A's reads {sum(reads.values()) / seconds:.0f}/s {reads}"
        )
        return pct(alone, 0.99), pct(busy, 0.99)


async def main(args: argparse.Namespace) -> None:
    print(
        f"A reads one task, {args.concurrency} at a time (nice 19); B submits every"
        f" {args.every * 1e3:.0f} ms, {args.submissions} submissions measured"
    )
    await each_way(
        lambda fairness: one_run(args, fairness),
        ("fairness on", "fairness off"),
        "B's submit p99 with A reading / alone",
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--submissions", type=int, default=300)
    ap.add_argument("--every", type=float, default=0.02)
    ap.add_argument("--reader", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.reader:
        port, token, path, seconds = args.reader.split(",")
        asyncio.run(reader(int(port), token, path, args.concurrency, float(seconds)))
    else:
        asyncio.run(main(args))
