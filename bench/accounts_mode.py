"""Tenants' command functions in accounts mode (`KUBETASK_FUNCTION_USERS=accounts`, as root):
each attempt a process run as its account's user, in its account's namespaces and Landlock
domain, behind its account's firewall rules. A accounts each submit N tasks of `/bin/true`
(`maxConcurrency` 16) at once; prints the tasks a second, first submission to last success.

Prints figures; asserts nothing. Run (as root): .venv/bin/python bench/accounts_mode.py
[--tasks 400 --accounts 1 --rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from devrun import Dev, running_dev
from kubetask.auth import create_token


async def register(dev: Dev, tokens: dict[str, str]) -> None:
    await asyncio.sleep(1.5)  # tokens made a moment ago: the gateway reads them within 1 s
    fn = {"metadata": {"name": "true"}, "spec": {"command": ["/bin/true"], "maxConcurrency": 16}}
    for token in tokens.values():
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=dev.url, headers=headers, timeout=60) as http:
            (await http.put("/v1/functions/true", json=fn)).raise_for_status()


async def round_of(dev: Dev, tokens: dict[str, str], tasks: int, tag: str) -> float:
    before = {a: await dev.succeeded(a, "true") for a in tokens}

    async def account(token: str) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=dev.url, headers=headers, timeout=60) as http:
            sem = asyncio.Semaphore(32)

            async def submit(i: int) -> None:
                async with sem:
                    body = {"function": "true", "id": f"{tag}-{i:05d}"}
                    (await http.post("/v1/tasks", json=body)).raise_for_status()

            await asyncio.gather(*(submit(i) for i in range(tasks)))

    start = time.perf_counter()
    await asyncio.gather(*(account(t) for t in tokens.values()))
    while True:
        done = {a: await dev.succeeded(a, "true") - before[a] for a in tokens}
        if all(n >= tasks for n in done.values()):
            return len(tokens) * tasks / (time.perf_counter() - start)
        await asyncio.sleep(0.05)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=400, help="per account, per round")
    parser.add_argument("--accounts", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("accounts mode runs functions as their accounts' users: run as root")
    with tempfile.TemporaryDirectory(prefix="kt-accounts-", dir="/var/tmp") as root:
        data = Path(root)
        os.chmod(root, 0o755)  # a tenant's process starts where the dispatcher runs if it may
        async with running_dev(data, KUBETASK_FUNCTION_USERS="accounts") as dev:
            tokens = {
                f"bench-{i}": create_token(data / "tokens.json", f"bench-{i}", f"bench-{i}")
                for i in range(args.accounts)
            }
            await register(dev, tokens)
            rates = []
            for r in range(args.rounds):
                rates.append(await round_of(dev, tokens, args.tasks, f"r{r}"))
                print(f"round {r + 1}: {rates[-1]:,.0f} tasks/s", flush=True)
            print(
                f"{args.accounts} account(s) x {args.tasks} tasks of /bin/true: median "
                f"{statistics.median(rates):,.0f} tasks/s"
            )


if __name__ == "__main__":
    asyncio.run(main())
