"""The `kubetask_backlog` gauge: how many tasks wait in each function's queue.

Asking every function's consumer every few seconds made registered functions cost in proportion
to their number even when idle (a thousand functions: two hundred consumer-info requests a
second between the dispatcher and nats-server). Instead each queue stream is asked once, with
its subjects filtered to the functions' queue subjects, for how many messages each subject
holds; only a function whose subject holds messages is asked for its exact waiting count (the
stream's count includes tasks claimed but not yet acknowledged). And a stream is asked only if
the stream list (one request per 256 streams) shows it holds messages at all, so idle streams
cost nothing of their own.
"""

from __future__ import annotations

import asyncio
import contextlib

from .. import metrics, queues
from ..plane import DataPlane

PERIOD = 5.0


async def collect_once(plane: DataPlane, last: dict[tuple[str, str], int] | None = None) -> None:
    """Read every function's backlog; with `last`, set only the gauges whose value changed
    (ten thousand label lookups every period otherwise)."""
    waiting: dict[tuple[str, str], int] = {}
    depths = await queues.stream_depths(plane.rpc)
    for stream, members in plane.registry.by_stream().items():
        if not depths.get(stream):
            for fn, _ in members:
                waiting.setdefault((fn.account, fn.name), 0)
            continue
        with contextlib.suppress(Exception):  # a queue being removed has no backlog
            held = await queues.held_by_subject(plane.js, members)
            for fn, queue in members:
                key = (fn.account, fn.name)
                waiting.setdefault(key, 0)
                if held[key]:
                    w, _ = await queues.queue_backlog(plane.js, queue)
                    waiting[key] += w
    for key, count in waiting.items():
        if last is None or last.get(key) != count:
            metrics.BACKLOG.labels(*key).set(count)
            if last is not None:
                last[key] = count


async def collect_forever(plane: DataPlane) -> None:
    last: dict[tuple[str, str], int] = {}
    while True:
        with contextlib.suppress(Exception):
            await collect_once(plane, last)
        await asyncio.sleep(PERIOD)
