"""What one history-quota purge costs nats-server (`gateway/history_quota.py`): an account
with N log subjects (one line per task) beside a neighbour with as many, then purges of the
account's oldest lines with a subject filter and `keep`, and one with nothing to purge.
Prints figures; asserts nothing.

Run: .venv/bin/python bench/history_purge.py [--subjects 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from kubetask import embedded, logs, names
from kubetask.plane import DataPlane
from kubetask.settings import Settings


async def run(subjects: int) -> None:
    store = Path(tempfile.mkdtemp(prefix="kt-purge-"))
    port = embedded.free_port()
    server = embedded.start_nats(store, port)
    try:
        plane = await DataPlane.connect(Settings(nats_url=f"nats://127.0.0.1:{port}"), "bench")
        line = logs.encode_line(1, "stderr", "x" * 100)
        for account in ("big", "other"):
            for i in range(subjects):
                await plane.nc.publish(names.log_subject(account, f"t{i:08d}"), line)
                if i % 5000 == 0:
                    await plane.nc.flush()
        await plane.nc.flush()
        info = await plane.js.stream_info(names.LOGS_STREAM)
        while info.state.messages < 2 * subjects:  # published without waiting: let them land
            await asyncio.sleep(0.2)
            info = await plane.js.stream_info(names.LOGS_STREAM)
        print(f"KT_LOGS: {info.state.messages} lines, {info.state.bytes / 1e6:.0f} MB")
        for keep in (subjects * 95 // 100, subjects * 90 // 100, subjects // 2, subjects // 2):
            started = time.perf_counter()
            await plane.js.purge_stream(
                names.LOGS_STREAM, subject=names.account_logs("big"), keep=keep
            )
            spent = (time.perf_counter() - started) * 1000
            print(f"purge keeping {keep} of the account's lines: {spent:.1f} ms")
        await plane.close()
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subjects", type=int, default=200_000)
    asyncio.run(run(parser.parse_args().subjects))


if __name__ == "__main__":
    main()
