"""What idle consumers cost nats-server on their own (issue 11): a nats-server with S work-queue
streams of C durable pull consumers each (the layout of S accounts of C functions), nothing else
connected once they exist; its CPU over successive windows, then with a core subscription per
consumer's subject (what dozing functions hold), then with a waiting pull request per consumer
instead (what they held before). Prints figures; asserts nothing.

Run: .venv/bin/python bench/bare_consumers.py [--streams 100 --consumers 100 --window 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from pathlib import Path

import nats
from kubetask.embedded import free_port, start_nats
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, RetentionPolicy, StreamConfig

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def windows(pid: int, label: str, count: int, seconds: float) -> None:
    shares = []
    for _ in range(count):
        before = cpu_seconds(pid)
        await asyncio.sleep(seconds)
        shares.append((cpu_seconds(pid) - before) / seconds * 100)
    print(f"{label}: " + ", ".join(f"{s:.2f}%" for s in shares) + " of a core", flush=True)


async def main(args: argparse.Namespace) -> None:
    port = free_port()
    server = start_nats(Path(tempfile.mkdtemp(prefix="kt-bare-")) / "js", port)
    nc = await nats.connect(f"nats://127.0.0.1:{port}")
    try:
        js = nc.jetstream()
        subjects = []
        for s in range(args.streams):
            stream = f"KT_Q_a{s}"
            await js.add_stream(
                StreamConfig(
                    name=stream, subjects=[f"kt.q.a{s}.*"], retention=RetentionPolicy.WORK_QUEUE
                )
            )
            for c in range(args.consumers):
                subject = f"kt.q.a{s}.f{c}"
                subjects.append((stream, f"fn_f{c}", subject))
                await js.add_consumer(
                    stream,
                    ConsumerConfig(
                        durable_name=f"fn_f{c}",
                        ack_policy="explicit",
                        ack_wait=30,
                        filter_subject=subject,
                        max_ack_pending=64,
                    ),
                )
        print(f"{len(subjects)} consumers over {args.streams} streams; settling", flush=True)
        await asyncio.sleep(args.window)
        await windows(server.pid, "consumers alone", 4, args.window)

        async def ignore(_: Msg) -> None:
            pass

        subs = [await nc.subscribe(subject, cb=ignore) for _, _, subject in subjects]
        await nc.flush()
        await windows(server.pid, "+ a core subscription each", 2, args.window)
        for sub in subs:
            await sub.unsubscribe()
        inbox = nc.new_inbox()
        await nc.subscribe(inbox, cb=ignore)
        request = json.dumps({"batch": 8, "expires": int(600e9)}).encode()
        for stream, consumer, _ in subjects:
            await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}", request, inbox)
        await nc.flush()
        await windows(server.pid, "+ a waiting pull request each instead", 2, args.window)
    finally:
        await nc.close()
        server.kill()
        server.wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--consumers", type=int, default=100)
    ap.add_argument("--window", type=float, default=30.0)
    asyncio.run(main(ap.parse_args()))
