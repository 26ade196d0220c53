"""Idle is free (issue 11): F functions registered over A accounts and left idle; the CPU each
component spends while nothing happens, then how promptly an idle function's first task starts.
Prints figures; asserts nothing.

Run: .venv/bin/python bench/idle.py [--functions 10000 --accounts 100 --seconds 30 --settle 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
import nats
from devrun import Dev, running_dev

TICKS = os.sysconf("SC_CLK_TCK")


def component_pids(dev_pid: int) -> dict[str, list[int]]:
    """The processes `kubetask dev` started, by component (nats-server, gateway, dispatcher);
    the supervisor itself is `dev_pid`."""
    found: dict[str, list[int]] = {"nats-server": [], "gateway": [], "dispatcher": []}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\x00")
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent != dev_pid:
            continue
        for name in found:
            if argv[0].endswith(name.encode()) or name.encode() in argv[1:5]:
                found[name].append(int(proc.name))
    return found


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def function(name: str, account: str) -> dict[str, object]:
    return {
        "apiVersion": "kubetask.io/v1alpha1",
        "kind": "TaskFunction",
        "metadata": {"name": name, "namespace": account},
        "spec": {"command": ["true"], "maxConcurrency": 4},
    }


async def consumer_count(dev: Dev) -> int:
    """JetStream's own count (an idle function's consumer is removed, `idle_consumers.py`)."""
    url = next(x for x in (dev.data / "dev.out").read_text().split() if x.startswith("nats://"))
    users = json.loads((dev.data / "secrets" / "nats-users.json").read_text())
    nc = await nats.connect(url, user="admin", password=users["admin"])
    try:
        info = json.loads((await nc.request("$JS.API.INFO", b"", timeout=10)).data)
        return int(info["consumers"])
    finally:
        await nc.close()


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="kt-idle-"))
    async with running_dev(work) as dev:
        auth = {"Authorization": f"Bearer {dev.admin_token}"}
        async with httpx.AsyncClient(base_url=dev.url, headers=auth, timeout=120) as h:
            names = [(f"f{i:05d}", f"acct{i % args.accounts:03d}") for i in range(args.functions)]
            todo = iter(names)
            began = time.monotonic()

            async def register() -> None:
                for name, account in todo:
                    put = await h.put(
                        f"/v1/functions/{name}",
                        params={"account": account},
                        json=function(name, account),
                    )
                    put.raise_for_status()

            await asyncio.gather(*(register() for _ in range(8)))
            print(
                f"registered {args.functions} functions over {args.accounts} accounts"
                f" in {time.monotonic() - began:.0f} s; settling {args.settle:.0f} s",
                flush=True,
            )
            await asyncio.sleep(args.settle)
            pids = {"supervisor": [dev.pid], **component_pids(dev.pid)}
            before = {n: sum(cpu_seconds(p) for p in ps) for n, ps in pids.items()}
            await asyncio.sleep(args.seconds)
            after = {n: sum(cpu_seconds(p) for p in ps) for n, ps in pids.items()}
            shares = {n: (after[n] - before[n]) / args.seconds * 100 for n in before}
            print(f"idle for {args.seconds:.0f} s, CPU in % of one core:")
            for n, share in shares.items():
                print(f"  {n:12} {share:5.2f}%  ({len(pids[n])} process(es))")
            print(f"  {'total':12} {sum(shares.values()):5.2f}%  (target < 2%)")
            print(f"  consumers nats-server holds: {await consumer_count(dev)}")

            waits = []
            for name, account in random.Random(3).sample(names, args.wakeups):
                sub = await h.post(
                    "/v1/tasks", params={"account": account}, json={"function": name}
                )
                task_id = sub.json()["metadata"]["name"]
                while True:
                    got = (await h.get(f"/v1/tasks/{task_id}", params={"account": account})).json()
                    stamps = got["status"]["timestamps"]
                    if stamps.get("started"):
                        break
                    await asyncio.sleep(0.005)
                began_at = datetime.fromisoformat(stamps["submitted"])
                waits.append(
                    (datetime.fromisoformat(stamps["started"]) - began_at).total_seconds() * 1000
                )
                await asyncio.sleep(args.seconds / args.wakeups)
            print(
                f"first task of an idle function, submit->start over {len(waits)} functions:"
                f" median {statistics.median(waits):.1f} ms, max {max(waits):.1f} ms"
            )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--functions", type=int, default=10_000)
    ap.add_argument("--accounts", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=30.0)
    # Idle means past both thresholds: a function's pull request lapses 105 s after its last
    # task (KUBETASK_PULL_IDLE_EXPIRES) and nats-server removes its consumer 120 s after that
    # (KUBETASK_CONSUMER_IDLE); measured before then, each function still holds a consumer.
    ap.add_argument("--settle", type=float, default=300.0)
    ap.add_argument("--wakeups", type=int, default=10)
    asyncio.run(main(ap.parse_args()))
