"""The `kubetask_backlog` gauge: how many tasks wait in each function's queue.

Asking every function's consumer every few seconds made registered functions cost in proportion
to their number even when idle (a thousand functions: two hundred consumer-info requests a
second between the dispatcher and nats-server). Instead each queue stream is asked once, with
its subjects filtered to the functions' queue subjects, for how many messages each subject
holds; only a function whose subject holds messages is asked for its exact waiting count (the
stream's count includes tasks claimed but not yet acknowledged). And a stream is asked only if
the stream list (one request per 256 streams) shows it holds messages at all, so idle streams
cost nothing of their own.

The same reading rouses a dozing pull (`pull.py`) whose queue holds messages that no publish
announced: a retry JetStream moved in from its schedule (waiting), a redelivery after a
dispatcher died (in flight while no dispatcher has a request open), tasks in a queue whose
consumer nats-server removed while idle. A task in flight while some dispatcher has a request
open rouses nobody: that request takes it if it comes back, and a long task elsewhere does not
keep every other dispatcher's pull awake.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from .. import metrics, names, queues
from ..plane import DataPlane

PERIOD = 5.0

# Told (account, function, stream) of each queue with tasks a dozing pull must not miss.
Held = Callable[[str, str, str], None]


class BacklogGauge:
    """Sets `kubetask_backlog` from a reading of the queues every period, touching only what
    changed: a function of a stream holding nothing waits for nothing, so an idle stream's
    functions are not even looked at (ten thousand of them took a loop over each every period),
    and a function whose count fell to zero since is set to zero. The series of every registered
    function is made (0) when the registry changes, and a removed function's is dropped."""

    def __init__(self, plane: DataPlane, held_at: Held | None = None) -> None:
        self.plane = plane
        self.held_at = held_at
        self._last: dict[tuple[str, str], int] = {}
        self._generation: int | None = None

    async def collect(self) -> None:
        registry = self.plane.registry
        if self._generation != registry.generation:
            self._generation = registry.generation
            registered = set(registry.functions)
            for key in [k for k in self._last if k not in registered]:
                del self._last[key]
                with contextlib.suppress(KeyError):
                    metrics.BACKLOG.remove(*key)
            for key in registered - self._last.keys():
                self._last[key] = 0
                metrics.BACKLOG.labels(*key).set(0)
        waiting: dict[tuple[str, str], int] = {}
        depths = await queues.stream_depths(self.plane.rpc)
        for stream, members in registry.by_stream().items():
            if not depths.get(stream):
                continue
            with contextlib.suppress(Exception):  # a queue being removed has no backlog
                held = await queues.held_by_subject(self.plane.js, members)
                for fn, queue in members:
                    key = (fn.account, fn.name)
                    waiting.setdefault(key, 0)
                    if held[key]:
                        pending, unwatched = await self._consumer(queue, held[key])
                        waiting[key] += pending
                        if self.held_at is not None and (pending or unwatched):
                            self.held_at(fn.account, fn.name, stream)
        for key, count in self._last.items():
            if count and key not in waiting:
                waiting[key] = 0
        for key, count in waiting.items():
            if self._last.get(key) != count and key in self._last:
                metrics.BACKLOG.labels(*key).set(count)
                self._last[key] = count

    async def _consumer(self, queue: names.Queue, held: int) -> tuple[int, bool]:
        """(tasks to deliver, whether some are in flight while no dispatcher has a request open:
        a redelivery, its dispatcher having died, would have no taker). A consumer removed
        while idle (`idle_consumers.py`) has nothing in flight: all its subject holds waits."""
        info = await queues.consumer_info(self.plane.js, queue)
        if info is None:
            return held, False
        return info.num_pending or 0, bool(info.num_ack_pending and not info.num_waiting)


async def collect_forever(plane: DataPlane, held_at: Held | None = None) -> None:
    gauge = BacklogGauge(plane, held_at)
    while True:
        with contextlib.suppress(Exception):
            await gauge.collect()
        await asyncio.sleep(PERIOD)
