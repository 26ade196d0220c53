"""A burst across many functions (issue 11): F `command` functions (maxConcurrency 64 each) get
T tasks each, all at once; then the same number of tasks goes to one function. Prints the
throughput of both and their ratio, the peak of executor processes, double claims (tasks that
took more than one attempt), slow-consumer disconnects in nats-server's log, and the
dispatcher's peak RSS. Prints figures; asserts nothing.

Run: .venv/bin/python bench/burst.py [--functions 1000 --tasks 20 --accounts 1 --idle 0]
(`--functions 10000 --accounts 100`: the layout of bench/idle.py; `--idle 350`: the burst comes
after the functions dozed and nats-server removed their consumers.)
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx
from devrun import Dev, running_dev
from kubetask.auth import create_token
from kubetask.executors.http1 import InstanceUnreachable
from noisy import Sender


def command_function(name: str, account: str, concurrency: int) -> dict[str, object]:
    return {
        "apiVersion": "kubetask.io/v1alpha1",
        "kind": "TaskFunction",
        "metadata": {"name": name, "namespace": account},
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


async def burst(
    dev: Dev, tokens: dict[str, str], functions: list[tuple[str, str]], per_function: int
) -> dict[str, float]:
    senders = {account: Sender(dev, token, "") for account, token in tokens.items()}
    total = len(functions) * per_function
    before = await dev.succeeded(None)
    peak_procs, peak_rss = 0, 0.0
    t0 = time.monotonic()
    # Ids unique by construction: random suffixes collided (a few in 10,000 at 24 bits), and
    # the 409 of a collision looked like an accepted task that never ran.
    jobs = iter(
        [(a, n, f"{n}-{i}-{k}") for i in range(per_function) for k, (a, n) in enumerate(functions)]
    )
    refused: dict[int, int] = {}

    async def submit() -> None:
        for account, name, task_id in jobs:
            sender = senders[account]
            sender.function = name
            while True:
                try:
                    status = await sender.submit(task_id)
                except InstanceUnreachable:  # a keep-alive connection the gateway closed
                    continue
                if status in (202, 409):  # the id makes a repeat a 409, not a second task
                    break
                refused[status] = refused.get(status, 0) + 1  # pushed back: try again shortly
                await asyncio.sleep(0.1)

    async def watch() -> None:
        nonlocal peak_procs, peak_rss
        while True:
            peak_procs = max(peak_procs, processes_named(b"true"))
            peak_rss = max(peak_rss, dispatcher_rss_mb())
            # Walking /proc is not free for the processes it reads (and it shares the two
            # cores): every 50 ms it held the measured rate down (bench/README.md).
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch())
    await asyncio.gather(*(submit() for _ in range(16)))
    shown = time.monotonic()
    print(f"  all {total} accepted after {shown - t0:.1f} s", flush=True)
    while True:
        done = await dev.succeeded(None) - before
        if done >= total:
            break
        if time.monotonic() - shown >= 10:  # a collapse shows itself without waiting for the end
            shown = time.monotonic()
            print(f"  ... {done:.0f} of {total} after {shown - t0:.0f} s", flush=True)
        # Each count is a scrape of a counter with a series per function: 10,000 of them.
        await asyncio.sleep(2.0)
    took = time.monotonic() - t0
    watcher.cancel()
    for sender in senders.values():
        sender.pool.close()
    if refused:
        print(f"  submissions refused and sent again: {refused}", flush=True)
    return {"rate": total / took, "seconds": took, "procs": peak_procs, "rss": peak_rss}


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="kt-burst-"))
    async with running_dev(work) as dev:
        accounts = [f"burst{a:03d}" for a in range(args.accounts)]
        tokens = {a: create_token(work / "tokens.json", a, a) for a in accounts}
        auth = {"Authorization": f"Bearer {dev.admin_token}"}
        async with httpx.AsyncClient(base_url=dev.url, headers=auth, timeout=60) as h:
            functions = [(accounts[i % len(accounts)], f"f{i:05d}") for i in range(args.functions)]
            todo = iter(functions)
            began = time.monotonic()

            async def register() -> None:
                for account, name in todo:
                    body = command_function(name, account, 64)
                    put = await h.put(
                        f"/v1/functions/{name}", params={"account": account}, json=body
                    )
                    put.raise_for_status()

            await asyncio.gather(*(register() for _ in range(8)))
            print(f"registered in {time.monotonic() - began:.0f} s", flush=True)
            one = command_function("one", accounts[0], args.one_concurrency)
            spec = one["spec"]
            assert isinstance(spec, dict)
            spec["queueMode"] = "dedicated"  # not counted among the account stream's functions
            put = await h.put("/v1/functions/one", params={"account": accounts[0]}, json=one)
            put.raise_for_status()
            if args.idle:  # long enough, and nats-server has removed every idle consumer
                print(f"idle for {args.idle:.0f} s", flush=True)
                await asyncio.sleep(args.idle)
            many = await burst(dev, tokens, functions, args.tasks)
            single = await burst(dev, tokens, [(accounts[0], "one")] * args.functions, args.tasks)
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
    print(
        f"{args.functions} functions over {args.accounts} accounts x {args.tasks} tasks ({total})"
        " vs one function:"
    )
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
    ap.add_argument("--accounts", type=int, default=1)
    ap.add_argument("--one-concurrency", type=int, default=64)
    # Seconds the functions stay idle before the burst (issue 11: idle, "then a burst").
    ap.add_argument("--idle", type=float, default=0.0)
    asyncio.run(main(ap.parse_args()))
