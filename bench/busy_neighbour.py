"""A neighbour whose functions keep the cores busy (issue 9): account A's `command` function
spins for `--burn` seconds a task, `--burners` at once (the node's process budget by default),
while account B submits one task every 10 ms to its own no-op function (a warm server, or a
`command` with `--quick command`). B's submit->start, and where it goes (submitted->enqueued,
enqueued->dispatched, dispatched->started), alone and while A burns, from the records' stage
timestamps. noisy.py floods with no-op tasks; this one with CPU.

Prints figures; asserts nothing. Run: .venv/bin/python bench/busy_neighbour.py
[--burners 64 --burn 2 --tasks 400 --quick server --env KUBETASK_X=Y ...]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx
import noisy
from devrun import running_dev
from figures import summary
from kubetask.auth import create_token
from noisy import PY, Sender, flood, pct, server_function, starts, steady

noisy.STAGES = (
    ("submitted", "enqueued"),
    ("enqueued", "dispatched"),
    ("dispatched", "started"),
    ("started", "finished"),  # how long the no-op took where it ran
)


def burning_function(seconds: float, burners: int) -> dict[str, object]:
    spin = f"import time\nt = time.time()\nwhile time.time() - t < {seconds}:\n    pass"
    return {
        "apiVersion": "kubetask.io/v1alpha1",
        "kind": "TaskFunction",
        "metadata": {"name": "burn", "namespace": "busy"},
        "spec": {"command": [PY, "-c", spin], "maxConcurrency": burners},
    }


def quick_function(kind: str) -> dict[str, object]:
    if kind == "server":
        return server_function("quick", "calm", 16)
    return {
        "apiVersion": "kubetask.io/v1alpha1",
        "kind": "TaskFunction",
        "metadata": {"name": "quick", "namespace": "calm"},
        "spec": {"command": ["true"], "maxConcurrency": 16},
    }


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="kt-busy-"))
    env = dict(pair.split("=", 1) for pair in args.env)
    async with running_dev(work, **env) as dev:
        tokens = {a: create_token(work / "tokens.json", a, a) for a in ("busy", "calm")}
        admin = {"Authorization": f"Bearer {dev.admin_token}"}
        async with httpx.AsyncClient(base_url=dev.url, headers=admin, timeout=60) as http:
            for account, fn in (
                ("busy", burning_function(args.burn, args.burners)),
                ("calm", quick_function(args.quick)),
            ):
                name = fn["metadata"]["name"]  # type: ignore[index]
                q = {"account": account}
                (await http.put(f"/v1/functions/{name}", params=q, json=fn)).raise_for_status()
        a, b = Sender(dev, tokens["busy"], "burn"), Sender(dev, tokens["calm"], "quick")
        await steady(b, "warm-", time.monotonic() + 2, 0.01)
        alone = await steady(b, "alone-", time.monotonic() + 10, 0.01)
        burning = asyncio.create_task(flood(a, "burn-", args.tasks, 8))
        await asyncio.sleep(args.burn + 1)  # every burner running
        busy = await steady(b, "busy-", time.monotonic() + 10, 0.01)
        statuses = await burning
        auth = {"Authorization": f"Bearer {tokens['calm']}"}
        async with httpx.AsyncClient(base_url=dev.url, headers=auth, timeout=60) as http:
            results = {}
            for prefix, n in (("alone-", alone), ("busy-", busy)):
                stages: dict[str, list[float]] = {}
                results[prefix] = (await starts(http, prefix, n, stages), stages)
    print(
        f"B ({args.quick}) every 10 ms; A: {args.burners} at once of {args.tasks} tasks spinning"
        f" {args.burn} s each (submissions answered {statuses})"
    )
    for prefix, label in (("alone-", "B alone"), ("busy-", "B while A burns")):
        lat, stages = results[prefix]
        parts = ", ".join(f"{k} {summary(v)}" for k, v in stages.items())
        print(f"  {label}: submit->start {summary(lat)} ({parts})")
    print(f"  p99 ratio: {pct(results['busy-'][0], 0.99) / pct(results['alone-'][0], 0.99):.1f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--burners", type=int, default=64)
    ap.add_argument("--burn", type=float, default=2.0)
    ap.add_argument("--tasks", type=int, default=400)
    ap.add_argument("--quick", choices=("server", "command"), default="server")
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for kubetask dev")
    asyncio.run(main(ap.parse_args()))
