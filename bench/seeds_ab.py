"""The seeds' A/B case (issue 9, benchmark 2): in one account, function A (maxConcurrency 1, each
task sleeps 200 ms) has a backlog while function B (a no-op warm server, highly parallel) runs
a closed loop of submissions. B's throughput with A busy / B's throughput alone, and A's pace
(tasks per second) while B runs, measured in one run.

Prints figures; asserts nothing. Run: .venv/bin/python bench/seeds_ab.py
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from devrun import Dev, running_dev
from kubetask.auth import create_token
from noisy import Sender, server_function


async def b_round(dev: Dev, sender: Sender, tag: str, n: int, conc: int) -> float:
    """Tasks per second for n submissions of B, from the first submission to the last success."""
    before = await dev.succeeded("shop", "b")
    ids = iter(range(n))

    async def one() -> None:
        for i in ids:
            await sender.submit(f"{tag}-{i:06d}")

    t0 = time.monotonic()
    await asyncio.gather(*(one() for _ in range(conc)))
    while await dev.succeeded("shop", "b") < before + n:  # noqa: ASYNC110 (polls the API)
        await asyncio.sleep(0.2)
    return n / (time.monotonic() - t0)


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="kt-seeds-ab-"))
    async with running_dev(work) as dev:
        token = create_token(work / "tokens.json", "shop", "shop")
        auth = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=dev.url, headers=auth, timeout=60) as h:
            a = {
                "apiVersion": "kubetask.io/v1alpha1",
                "kind": "TaskFunction",
                "metadata": {"name": "a", "namespace": "shop"},
                "spec": {"command": ["sleep", "0.2"], "maxConcurrency": 1},
            }
            (await h.put("/v1/functions/a", json=a)).raise_for_status()
            (
                await h.put("/v1/functions/b", json=server_function("b", "shop", 256))
            ).raise_for_status()
            b = Sender(dev, token, "b")
            await b_round(dev, b, "warm", 200, args.concurrency)
            alone = [
                await b_round(dev, b, f"alone{r}", args.tasks, args.concurrency)
                for r in range(args.rounds)
            ]
            for i in range(args.a_backlog):
                (
                    await h.post("/v1/tasks", json={"function": "a", "id": f"a-{i:05d}"})
                ).raise_for_status()
            await asyncio.sleep(1)
            a0, t0 = await dev.succeeded("shop", "a"), time.monotonic()
            await asyncio.sleep(10)
            a_alone = (await dev.succeeded("shop", "a") - a0) / (time.monotonic() - t0)
            a0, t0 = await dev.succeeded("shop", "a"), time.monotonic()
            busy = [
                await b_round(dev, b, f"busy{r}", args.tasks, args.concurrency)
                for r in range(args.rounds)
            ]
            a_pace = (await dev.succeeded("shop", "a") - a0) / (time.monotonic() - t0)
            b.pool.close()
    mid_alone, mid_busy = statistics.median(alone), statistics.median(busy)
    print(f"B alone: {', '.join(f'{x:.0f}' for x in alone)} tasks/s")
    print(f"B with A's backlog of {args.a_backlog}: {', '.join(f'{x:.0f}' for x in busy)} tasks/s")
    print(f"B busy / B alone (medians): {mid_busy / mid_alone:.2f} (target >= 0.9)")
    print(f"A's pace: alone {a_alone:.2f} tasks/s, while B ran {a_pace:.2f} (at most 5)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--a-backlog", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(ap.parse_args()))
