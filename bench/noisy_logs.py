"""Noisy neighbour through output: flooding accounts run tasks that print `yes` to stderr (or
stdout) as fast as they can for 12 s, while account B submits a task every 100 ms; B's
submit-to-start (p50, p99) alone and with the flood, with each account's output read at its
pace (`dispatch/log_pacing.py`) and then with the pace set out of the way.

Prints figures; asserts nothing. Run: .venv/bin/python bench/noisy_logs.py
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from datetime import datetime
from pathlib import Path

import httpx
from devrun import running_dev
from figures import each_way, pct, summary
from kubetask.auth import create_token

UNPACED = {"KUBETASK_ACCOUNT_LOG_RATE": str(1 << 30), "KUBETASK_DISPATCHER_LOG_RATE": str(1 << 34)}


def function(name: str, command: list[str]) -> dict[str, object]:
    return {
        "apiVersion": "kubetask.io/v1alpha1",
        "kind": "TaskFunction",
        "metadata": {"name": name},
        "spec": {"command": command, "maxConcurrency": 64},
    }


async def starts(calm: httpx.AsyncClient, n: int) -> list[float]:
    """Seconds from each of `n` submissions (one every 100 ms) to its task's start."""
    ids = []
    for _ in range(n):
        ids.append((await calm.post("/v1/tasks", json={"function": "tick"})).json())
        await asyncio.sleep(0.1)
    await asyncio.sleep(3)
    waited = []
    for task in ids:
        got = (await calm.get(f"/v1/tasks/{task['metadata']['name']}")).json()
        stamps = got["status"]["timestamps"]
        if stamps.get("started"):
            started, submitted = (
                datetime.fromisoformat(stamps[k]) for k in ("started", "submitted")
            )
            waited.append((started - submitted).total_seconds())
    return waited


async def one_run(args: argparse.Namespace, paced: bool) -> tuple[float, float]:
    work = Path(tempfile.mkdtemp(prefix="kt-noisy-logs-"))
    async with running_dev(work, **({} if paced else UNPACED)) as dev:
        loud = [f"loud-{i}" for i in range(args.accounts)]
        tokens = {a: create_token(work / "tokens.json", a, a) for a in (*loud, "calm")}
        clients = {
            a: httpx.AsyncClient(base_url=dev.url, headers={"Authorization": f"Bearer {t}"})
            for a, t in tokens.items()
        }
        redirect = ">&2" if args.stream == "stderr" else ""
        spew = ["sh", "-c", f"timeout 12 yes 'spew spew spew spew spew spew spew spew' {redirect}"]
        for account in loud:
            (
                await clients[account].put("/v1/functions/spew", json=function("spew", spew))
            ).raise_for_status()
        tick = function("tick", ["sh", "-c", "echo tock >&2"])
        (await clients["calm"].put("/v1/functions/tick", json=tick)).raise_for_status()
        await asyncio.sleep(2)
        alone = await starts(clients["calm"], args.submissions)
        for i in range(args.tasks):
            await clients[loud[i % len(loud)]].post("/v1/tasks", json={"function": "spew"})
        await asyncio.sleep(1)
        busy = await starts(clients["calm"], args.submissions)
        for client in clients.values():
            await client.aclose()
        print(
            f"  {'paced  ' if paced else 'unpaced'}: B's submit-to-start alone {summary(alone)};"
            f" with the flood {summary(busy)}"
        )
        return pct(alone, 0.99), pct(busy, 0.99)


async def main(args: argparse.Namespace) -> None:
    print(
        f"{args.tasks} tasks of {args.accounts} account(s) print `yes` to {args.stream} for 12 s;"
        f" B submits every 100 ms, {args.submissions} submissions measured"
    )
    await each_way(
        lambda paced: one_run(args, paced), ("paced", "unpaced"), "B's p99 with the flood / alone"
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--accounts", type=int, default=1)
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--submissions", type=int, default=100)
    ap.add_argument("--stream", choices=("stderr", "stdout"), default="stderr")
    asyncio.run(main(ap.parse_args()))
