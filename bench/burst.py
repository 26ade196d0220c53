"""A burst across many functions (issue 11): F `command` functions (maxConcurrency 64 each) get
T tasks each, all at once; then the same number of tasks goes to one function. Prints the
throughput of both and their ratio, the peak of executor processes, double claims (tasks that
took more than one attempt), slow-consumer disconnects in nats-server's log, and the
dispatcher's peak RSS. Prints figures; asserts nothing.

Run: .venv/bin/python bench/burst.py [--functions 1000 --tasks 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import httpx
from devrun import Dev, running_dev
from kubetask.auth import create_token
from noisy import Sender


def command_function(name: str, concurrency: int) -> dict[str, object]:
    return {
        "apiVersion": "kubetask.io/v1alpha1",
        "kind": "TaskFunction",
        "metadata": {"name": name, "namespace": "burst"},
        "spec": {"command": ["true"], "maxConcurrency": concurrency},
    }


def processes_named(name: bytes) -> int:
    count = 0
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                count += (proc / "cmdline").read_bytes() == name + b"\x00"
            except OSError:
                pass
    return count


def dispatcher_rss_mb() -> float:
    rss = 0.0
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"dispatcher" in (proc / "cmdline").read_bytes():
                    status = (proc / "status").read_text()
                    line = next(x for x in status.splitlines() if x.startswith("VmRSS:"))
                    rss = max(rss, int(line.split()[1]) / 1024)
            except (OSError, StopIteration):
                pass
    return rss


async def burst(dev: Dev, token: str, names: list[str], per_function: int) -> dict[str, float]:
    sender = Sender(dev, token, names[0])
    total = len(names) * per_function
    before = await dev.succeeded("burst")
    peak_procs, peak_rss = 0, 0.0
    t0 = time.monotonic()
    jobs = iter([(n, i) for i in range(per_function) for n in names])

    async def submit() -> None:
        for name, i in jobs:
            sender.function = name
            await sender.submit(f"{name}-{i}-{os.urandom(3).hex()}")

    async def watch() -> None:
        nonlocal peak_procs, peak_rss
        while True:
            peak_procs = max(peak_procs, processes_named(b"true"))
            peak_rss = max(peak_rss, dispatcher_rss_mb())
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    await asyncio.gather(*(submit() for _ in range(16)))
    while True:
        done = await dev.succeeded("burst") - before
        if done >= total:
            break
        await asyncio.sleep(0.5)
    took = time.monotonic() - t0
    watcher.cancel()
    sender.pool.close()
    return {"rate": total / took, "seconds": took, "procs": peak_procs, "rss": peak_rss}


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="kt-burst-"))
    async with running_dev(work) as dev:
        token = create_token(work / "tokens.json", "burst", "burst")
        auth = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=dev.url, headers=auth, timeout=60) as h:
            names = [f"f{i:05d}" for i in range(args.functions)]
            for name in names:
                (
                    await h.put(f"/v1/functions/{name}", json=command_function(name, 64))
                ).raise_for_status()
            one = command_function("one", args.one_concurrency)
            # A stream of its own: the account's serves at most 10,000 functions
            # (KUBETASK_QUEUE_MAX_FUNCTIONS), which --functions 10000 fills.
            spec = one["spec"]
            assert isinstance(spec, dict)
            spec["queueMode"] = "dedicated"
            (await h.put("/v1/functions/one", json=one)).raise_for_status()
            many = await burst(dev, token, names, args.tasks)
            single = await burst(dev, token, ["one"] * args.functions, args.tasks)
            tasks = []
            cursor = None
            while True:
                params = {"limit": "1000", **({"cursor": cursor} if cursor else {})}
                page = (await h.get("/v1/tasks", params=params)).json()
                tasks += page["items"]
                cursor = page["cursor"]
                if not cursor:
                    break
        slow = (work / "logs" / "nats.log").read_text().count("Slow Consumer")
    twice = sum(1 for t in tasks if t["status"]["attempts"] > 1)
    unfinished = sum(1 for t in tasks if t["status"]["phase"] != "Succeeded")
    total = args.functions * args.tasks
    print(f"{args.functions} functions x {args.tasks} tasks ({total}) vs one function:")
    for label, r in (("many functions", many), ("one function", single)):
        print(
            f"  {label}: {r['rate']:.0f} tasks/s ({r['seconds']:.1f} s), peak executor"
            f" processes {r['procs']:.0f}, dispatcher peak RSS {r['rss']:.0f} MB"
        )
    print(f"  many / one: {many['rate'] / single['rate']:.2f} (target >= 0.8)")
    print(f"  tasks not Succeeded {unfinished}, with more than one attempt {twice}")
    print(f"  slow-consumer disconnects in nats-server's log: {slow}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--functions", type=int, default=1000)
    ap.add_argument("--tasks", type=int, default=20)
    ap.add_argument("--one-concurrency", type=int, default=64)
    asyncio.run(main(ap.parse_args()))
