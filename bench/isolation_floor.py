"""What processes of its own would buy a light account (issue 9, benchmark 1's floor): account A
floods 20,000 no-op tasks into one `kubetask dev` while account B submits one every 10 ms to
another, on the same cores; B's submit->start p99 with A flooding is divided by B's p99 alone,
as in `noisy.py`. Nothing is shared between A and B but the kernel and the cores, so this is
the least a shared platform's processes could add to B's tail. With `--a-idle`, every thread
of A's platform (nats-server, gateway, dispatcher, its instance) and of A's client runs under
`SCHED_IDLE`, so the kernel runs B's work first whenever both wait for a core. With `--spin N`,
A is replaced by N processes that only spin, under `SCHED_IDLE`, for as long: what merely
keeping the cores busy costs B on this machine, with no I/O or memory traffic of A's.

Prints figures; asserts nothing. Run: .venv/bin/python bench/isolation_floor.py [--a-idle | --spin 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

import httpx
from devrun import Dev, children, running_dev
from figures import pct
from kubetask.auth import create_token
from noisy import Sender, server_function, starts, steady, waiting

HERE = Path(__file__).resolve().parent


def idle(pid: int) -> None:
    """`pid`, its threads and its descendants under SCHED_IDLE; what they start inherits it."""
    for thread in Path(f"/proc/{pid}/task").glob("*"):
        with suppress(OSError):
            os.sched_setscheduler(int(thread.name), os.SCHED_IDLE, os.sched_param(0))
    for child in children(pid):
        idle(child)


async def register(dev: Dev, body: dict[str, object]) -> None:
    meta = body["metadata"]
    assert isinstance(meta, dict)
    headers = {"Authorization": f"Bearer {dev.admin_token}"}
    async with httpx.AsyncClient(base_url=dev.url, headers=headers) as h:
        (await h.put(f"/v1/functions/{meta['name']}", json=body)).raise_for_status()


async def beside_spinners(
    b: Sender, h_b: httpx.AsyncClient, args: argparse.Namespace
) -> tuple[str, list[float]]:
    spin = "import os; os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
    spin += "while True: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(args.spin)]
    try:
        await asyncio.sleep(0.5)
        n = await steady(b, "busy-", time.monotonic() + args.seconds, 0.01)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    busy = await starts(h_b, "busy-", n)
    return f"{args.spin} processes spinning under SCHED_IDLE", busy


async def beside_flood(
    dev_a: Dev, token_a: str, b: Sender, h_b: httpx.AsyncClient, args: argparse.Namespace
) -> tuple[str, list[float]]:
    admin = {"Authorization": f"Bearer {dev_a.admin_token}"}
    # A's submitters in a process of their own, so that they can be put under SCHED_IDLE.
    code = (
        f"import asyncio, sys; sys.path.insert(0, {str(HERE)!r});"
        "from devrun import Dev; from noisy import Sender, flood;"
        f"s = Sender(Dev({dev_a.url!r}, None, '', '', [], 0), {token_a!r}, 'bulk');"
        f"print(asyncio.run(flood(s, 'flood-', {args.tasks}, {args.concurrency})))"
    )
    async with httpx.AsyncClient(base_url=dev_a.url, headers=admin, timeout=60) as h_a:
        flooder = subprocess.Popen([sys.executable, "-c", code])
        if args.a_idle:
            idle(flooder.pid)
        t0 = time.monotonic()
        await asyncio.sleep(0.5)
        n = 0
        while flooder.poll() is None or await waiting(h_a, "flood"):
            n += await steady(b, f"busy{n:06d}-", time.monotonic() + 1, 0.01)
        drained = time.monotonic() - t0
    busy = await starts(h_b, "busy", n)
    priority = "under SCHED_IDLE" if args.a_idle else "at normal priority"
    return f"A {priority}, its {args.tasks} drained after {drained:.1f} s", busy


async def main(args: argparse.Namespace) -> None:
    wa = Path(tempfile.mkdtemp(prefix="kt-floor-a-"))
    wb = Path(tempfile.mkdtemp(prefix="kt-floor-b-"))
    async with running_dev(wa) as dev_a, running_dev(wb) as dev_b:
        token_a = create_token(wa / "tokens.json", "flood", "flood")
        token_b = create_token(wb / "tokens.json", "calm", "calm")
        await register(dev_a, server_function("bulk", "flood", 256))
        await register(dev_b, server_function("quick", "calm", 16))
        a, b = Sender(dev_a, token_a, "bulk"), Sender(dev_b, token_b, "quick")
        for i in range(50):  # warm both instances
            await a.submit(f"warm{i}")
            await b.submit(f"warm{i}")
        a.pool.close()
        await asyncio.sleep(2)
        if args.a_idle:
            idle(dev_a.pid)
        admin = {"Authorization": f"Bearer {dev_b.admin_token}"}
        async with httpx.AsyncClient(base_url=dev_b.url, headers=admin, timeout=60) as h_b:
            alone_n = await steady(b, "alone-", time.monotonic() + args.seconds, 0.01)
            alone = await starts(h_b, "alone-", alone_n)
            if args.spin:
                what, busy = await beside_spinners(b, h_b, args)
            else:
                what, busy = await beside_flood(dev_a, token_a, b, h_b, args)
        b.pool.close()
    print(
        f"{what}: B alone p50 {pct(alone, 0.5) * 1e3:.1f} ms p99 {pct(alone, 0.99) * 1e3:.1f} ms;"
        f" beside it p50 {pct(busy, 0.5) * 1e3:.1f} ms p99 {pct(busy, 0.99) * 1e3:.1f} ms;"
        f" ratio {pct(busy, 0.99) / pct(alone, 0.99):.2f} (issue 9's target <= 2)"
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--a-idle", action="store_true", help="A's processes under SCHED_IDLE")
    ap.add_argument("--spin", type=int, default=0, help="N spinning processes instead of A")
    asyncio.run(main(ap.parse_args()))
