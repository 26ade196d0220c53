"""Back-pressure fairness (issue 9, benchmark 4): account A floods past its backlog limit while
account B submits one task every 10 ms. Prints the share of 429s that went to A and B's
acceptance. Prints figures; asserts nothing. Run: .venv/bin/python bench/backpressure.py
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from devrun import running_dev
from kubetask.auth import create_token

PY = sys.executable


def function(name: str, account: str, command: list[str], concurrency: int) -> dict[str, object]:
    return {
        "apiVersion": "kubetask.io/v1alpha1",
        "kind": "TaskFunction",
        "metadata": {"name": name, "namespace": account},
        "spec": {"command": command, "maxConcurrency": concurrency},
    }


async def submitter(
    http: httpx.AsyncClient, fn: str, until: float, pause: float, seen: Counter[int]
) -> None:
    while time.monotonic() < until:
        resp = await http.post("/v1/tasks", json={"function": fn})
        seen[resp.status_code] += 1
        if pause:
            await asyncio.sleep(pause)


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="kt-backpressure-"))
    async with running_dev(work, KUBETASK_ACCOUNT_MAX_BACKLOG=str(args.backlog)) as dev:
        admin, url = dev.admin_token, dev.url
        tokens = {a: create_token(work / "tokens.json", a, a) for a in ("flood", "calm")}
        async with httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {admin}"}
        ) as h:
            slow = [PY, "-c", "import time; time.sleep(0.05)"]
            for account, name, command, concurrency in (
                ("flood", "bulk", slow, 2),
                ("calm", "quick", ["true"], 4),
            ):
                body = function(name, account, command, concurrency)
                resp = await h.put(f"/v1/functions/{name}", json=body)
                resp.raise_for_status()
        until = time.monotonic() + args.seconds
        seen = {"flood": Counter[int](), "calm": Counter[int]()}
        clients = {
            a: httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {t}"}, timeout=30)
            for a, t in tokens.items()
        }
        await asyncio.gather(
            *(submitter(clients["flood"], "bulk", until, 0, seen["flood"]) for _ in range(8)),
            submitter(clients["calm"], "quick", until, 0.01, seen["calm"]),
        )
        for c in clients.values():
            await c.aclose()
        refused = seen["flood"][429] + seen["calm"][429]
        calm_total = sum(seen["calm"].values())
        print(f"backlog limit {args.backlog}, {args.seconds:g} s")
        print(f"  A (flooding): {dict(seen['flood'])}")
        print(f"  B (every 10 ms): {dict(seen['calm'])}")
        print(f"  share of 429s that went to A: {seen['flood'][429] / max(1, refused):.1%}")
        print(f"  B's acceptance: {seen['calm'][202] / max(1, calm_total):.2%}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--backlog", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=15)
    asyncio.run(main(ap.parse_args()))
