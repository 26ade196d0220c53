"""What history costs (issue 11): disk per task in the task bucket, the audit trail and the
logs, and nats-server CPU per task, with the history streams compressed and not — both
measured in one run on the same tasks. Prints figures; asserts nothing.

Run: .venv/bin/python bench/history.py [--tasks 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import httpx
from devrun import running_dev
from idle import component_pids, cpu_seconds

STREAMS = {"KV_kt_tasks": "records", "KT_EVENTS": "audit trail", "KT_LOGS": "logs"}
PAYLOAD = {"order": "A-1234567", "customer": "c-42", "items": [{"sku": "x", "n": 2}] * 5}


def stream_bytes(store: Path) -> dict[str, int]:
    sizes = dict.fromkeys(STREAMS, 0)
    for stream_dir in store.glob("jetstream/**/streams/*"):
        if stream_dir.name in sizes:
            sizes[stream_dir.name] = sum(
                f.stat().st_size for f in stream_dir.rglob("*") if f.is_file()
            )
    return sizes


async def run(tasks: int, compression: str) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix=f"kt-history-{compression}-"))
    async with running_dev(work, KUBETASK_HISTORY_COMPRESSION=compression) as dev:
        auth = {"Authorization": f"Bearer {dev.token}"}
        async with httpx.AsyncClient(base_url=dev.url, headers=auth, timeout=60) as h:
            fn = {
                "apiVersion": "kubetask.io/v1alpha1",
                "kind": "TaskFunction",
                "metadata": {"name": "work"},
                "spec": {
                    "command": ["sh", "-c", "echo started; echo done with 1 item"],
                    "maxConcurrency": 32,
                },
            }
            (await h.put("/v1/functions/work", json=fn)).raise_for_status()
            nats_pid = component_pids(dev.pid)["nats-server"]
            cpu0 = sum(cpu_seconds(p) for p in nats_pid)
            todo = iter(range(tasks))

            async def submit() -> None:
                for _ in todo:
                    (
                        await h.post("/v1/tasks", json={"function": "work", "payload": PAYLOAD})
                    ).raise_for_status()

            await asyncio.gather(*(submit() for _ in range(8)))
            while await dev.succeeded("default", "work") < tasks:  # noqa: ASYNC110 (polled)
                await asyncio.sleep(0.5)
            await asyncio.sleep(2)  # the last log lines and audit revisions land
            cpu = sum(cpu_seconds(p) for p in nats_pid) - cpu0
        sizes = stream_bytes(work)
    return {**{k: v / tasks for k, v in sizes.items()}, "cpu_ms": cpu / tasks * 1000}


async def main(args: argparse.Namespace) -> None:
    plain = await run(args.tasks, "off")
    packed = await run(args.tasks, "on")
    print(f"{args.tasks} tasks (payload {len(str(PAYLOAD))} B, two log lines each): bytes per task")
    print(f"  {'':22} {'uncompressed':>12} {'S2':>8} {'ratio':>6}")
    for stream, label in STREAMS.items():
        ratio = packed[stream] / plain[stream] if plain[stream] else 0
        print(
            f"  {label + ' (' + stream + ')':22} {plain[stream]:12.0f} {packed[stream]:8.0f} {ratio:6.2f}"
        )
    total_plain = sum(plain[s] for s in STREAMS)
    total_packed = sum(packed[s] for s in STREAMS)
    print(
        f"  {'all history':22} {total_plain:12.0f} {total_packed:8.0f} {total_packed / total_plain:6.2f}"
    )
    print(
        f"  nats-server CPU per task: {plain['cpu_ms']:.3f} ms uncompressed, {packed['cpu_ms']:.3f} ms S2"
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=10_000)
    asyncio.run(main(ap.parse_args()))
