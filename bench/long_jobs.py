"""Long jobs beside a light neighbour: account A submits `--jobs` command tasks sleeping
`--job-seconds` (maxConcurrency 64) while account B submits a short command task every 0.2 s.
Prints how many of A's jobs ran at once at most, when A's last job ended, and B's submit->start
p50/p99, with attempts lent back after 1 s (the default) and with them counted until they end
(`KUBETASK_DISPATCH_LEND_AFTER=3600`, as before lending), in the same run.

Then a neighbour arriving at a full node: A alone submits `--fill` jobs (maxConcurrency as
many) until its running count stops growing, then B submits one task; B's submit->start, with
fairness on (the node keeps a few processes for whoever comes next) and off.

Prints figures; asserts nothing. Run: .venv/bin/python bench/long_jobs.py
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from backpressure import function
from devrun import running_dev
from figures import pct
from kubetask.auth import create_token
from noisy import Sender, starts, steady


@dataclass
class Platform:
    http: httpx.AsyncClient  # the admin's
    jobs: Sender  # account A's, to function `job`
    tick: Sender  # account B's, to function `tick`


@asynccontextmanager
async def platform(job_seconds: float, most: int, **env: str) -> AsyncIterator[Platform]:
    """`kubetask dev` with `env`, A's function `job` (`sleep job_seconds`, maxConcurrency
    `most`) and B's `tick` (`true`)."""
    work = Path(tempfile.mkdtemp(prefix="kt-long-"))
    async with running_dev(work, **env) as dev:
        tokens = {a: create_token(work / "tokens.json", a, a) for a in ("jobs", "tick")}
        admin = {"Authorization": f"Bearer {dev.admin_token}"}
        async with httpx.AsyncClient(base_url=dev.url, headers=admin, timeout=60) as h:
            for body in (
                function("job", "jobs", ["sleep", str(job_seconds)], most),
                function("tick", "tick", ["true"], 4),
            ):
                meta = body["metadata"]
                assert isinstance(meta, dict)
                (await h.put(f"/v1/functions/{meta['name']}", json=body)).raise_for_status()
            a, b = Sender(dev, tokens["jobs"], "job"), Sender(dev, tokens["tick"], "tick")
            try:
                yield Platform(h, a, b)
            finally:
                for c in (a, b):
                    c.pool.close()


async def running(http: httpx.AsyncClient, account: str) -> int:
    params = {"account": account, "status": "Running", "limit": "1000"}
    return len((await http.get("/v1/tasks", params=params)).json()["items"])


async def one_run(args: argparse.Namespace, lend_after: str) -> None:
    async with platform(args.job_seconds, 64, KUBETASK_DISPATCH_LEND_AFTER=lend_after) as p:
        t0 = time.monotonic()
        ticking = asyncio.create_task(steady(p.tick, "tick-", t0 + args.seconds, 0.2))
        await asyncio.sleep(2)
        for i in range(args.jobs):
            await p.jobs.submit(f"job-{i:04d}")
        most, last_end = 0, None
        while time.monotonic() < t0 + args.seconds or last_end is None:
            most = max(most, await running(p.http, "jobs"))
            params = {"account": "jobs", "status": "Succeeded", "limit": "1000"}
            done = len((await p.http.get("/v1/tasks", params=params)).json()["items"])
            if done >= args.jobs and last_end is None:
                last_end = time.monotonic() - t0 - 2
            await asyncio.sleep(0.5)
        ticks = await ticking
        lat = await starts(p.http, "tick-", ticks)
        print(
            f"  KUBETASK_DISPATCH_LEND_AFTER={lend_after}: A ran {most} of its {args.jobs}"
            f" jobs at once at most, all done {last_end:.1f}s after submitting;"
            f" B's submit->start p50 {pct(lat, 0.5) * 1e3:.1f} ms"
            f" p99 {pct(lat, 0.99) * 1e3:.1f} ms ({len(lat)} tasks)"
        )


async def arrival_run(args: argparse.Namespace, fairness: str) -> None:
    async with platform(args.fill_seconds, args.fill, KUBETASK_FAIRNESS=fairness) as p:
        for i in range(args.fill):
            await p.jobs.submit(f"job-{i:04d}")
        held, same = 0, 0
        while same < 4:
            await asyncio.sleep(0.5)
            now = await running(p.http, "jobs")
            same = same + 1 if now == held else 0
            held = now
        await p.tick.submit("arrival")
        lat = await starts(p.http, "arrival", 1)
        print(
            f"  KUBETASK_FAIRNESS={fairness}: A holds {held} jobs at once;"
            f" B's first task started {lat[0] * 1e3:.1f} ms after its submission"
        )


async def main(args: argparse.Namespace) -> None:
    print(
        f"A: {args.jobs} jobs of {args.job_seconds} s (maxConcurrency 64); B: `true` every 0.2 s"
        f" for {args.seconds} s"
    )
    for lend_after in ("1", "3600"):
        await one_run(args, lend_after)
    print(f"A alone: {args.fill} jobs of {args.fill_seconds} s; then B submits one `true`")
    for fairness in ("on", "off"):
        await arrival_run(args, fairness)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=40)
    ap.add_argument("--job-seconds", type=float, default=10)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--fill", type=int, default=100)
    ap.add_argument("--fill-seconds", type=float, default=30)
    asyncio.run(main(ap.parse_args()))
