"""Noisy neighbour through the control plane: account A re-registers its functions as fast as it
can (16 of them, each PUT changing its maxConcurrency, so every dispatcher restarts its
workers), while account B submits one task every 10 ms to a warm function. Prints B's
submit->start p50 and p99 alone and during A's churn, and what A's PUTs were answered, under
`KUBETASK_ACCOUNT_MAX_CHANGES` as given (0: no limit).

Prints figures; asserts nothing. Run: .venv/bin/python bench/noisy_changes.py [--limit 20]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx
from devrun import running_dev
from figures import pct
from kubetask.auth import create_token
from noisy import Sender, server_function, starts, steady


async def churn(url: str, token: str, until: float, loops: int, seen: dict[int, int]) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:

        async def one(k: int) -> None:
            i = 0
            while time.monotonic() < until:
                spec = {"command": ["true"], "maxConcurrency": 4 + i % 2}
                r = await http.put(f"/v1/functions/c{k}", json={"metadata": {"name": f"c{k}"},
                                                                "spec": spec})  # fmt: skip
                seen[r.status_code] = seen.get(r.status_code, 0) + 1
                i += 1

        await asyncio.gather(*(one(k) for k in range(loops)))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=float, default=20.0, help="KUBETASK_ACCOUNT_MAX_CHANGES")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--loops", type=int, default=16, help="A's functions, one PUT loop each")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kt-changes-"))
    async with running_dev(work, KUBETASK_ACCOUNT_MAX_CHANGES=str(args.limit)) as dev:
        tokens = {a: create_token(work / "tokens.json", a, a) for a in ("churn", "calm")}
        admin = {"Authorization": f"Bearer {dev.admin_token}"}
        async with httpx.AsyncClient(base_url=dev.url, headers=admin, timeout=60) as h:
            body = server_function("quick", "calm", 16)
            (await h.put("/v1/functions/quick", json=body)).raise_for_status()
            b = Sender(dev, tokens["calm"], "quick")
            await asyncio.sleep(1.5)  # tokens made a moment ago: the gateway reads them within 1 s
            for i in range(50):  # warm B's instance
                await b.submit(f"warm{i}")
            await asyncio.sleep(2)
            n = await steady(b, "alone-", time.monotonic() + 5, 0.01)
            alone = await starts(h, "alone-", n)
            seen: dict[int, int] = {}
            until = time.monotonic() + args.seconds
            churning = asyncio.create_task(churn(dev.url, tokens["churn"], until, args.loops, seen))
            await asyncio.sleep(0.5)
            n = await steady(b, "busy-", until - 0.5, 0.01)
            await churning
            busy = await starts(h, "busy-", n)
    print(
        f"KUBETASK_ACCOUNT_MAX_CHANGES={args.limit:g}: B's submit->start alone p50"
        f" {pct(alone, 0.5) * 1e3:.1f} ms p99 {pct(alone, 0.99) * 1e3:.1f} ms; with A"
        f" re-registering p50 {pct(busy, 0.5) * 1e3:.1f} ms p99 {pct(busy, 0.99) * 1e3:.1f} ms"
        f" (ratio of p99s {pct(busy, 0.99) / pct(alone, 0.99):.2f}); A's PUTs answered"
        f" {dict(sorted(seen.items()))} in {args.seconds:g} s"
    )


if __name__ == "__main__":
    asyncio.run(main())
