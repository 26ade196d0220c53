"""A queue's dispatch picture for "why is my task waiting?": its function's attempts in flight
(a consumer-info request) and what the dispatchers say holds it (`holds.py`), shared by every
read of a waiting task of that queue for `FRESH_FOR` seconds.

Each look asks nats-server once and every dispatcher once. Unshared, a tenant polling one
queued task 400 times a second took 8% of a core from each dispatcher, time its neighbours'
tasks wait for. Shared, one queue costs at most two looks a second however often its tasks are
read; an account may also start only `LOOKS_PER_SECOND` looks (bursts of `LOOKS_BURST`) at
each gateway, so one polling many queues is bounded too: past that its reads get the last look
(or, with none, the count alone, and a reason that says the dispatchers were not asked).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from .. import holds, queues
from ..models import TaskFunction
from ..plane import DataPlane
from ..token_bucket import TokenBucket

FRESH_FOR = 0.5
LOOKS_PER_SECOND = 10.0
LOOKS_BURST = 20.0
# Past this many queues or accounts remembered, what is stale is let go.
REMEMBERED = 4096

Key = tuple[str, str, str]  # account, function, stream


@dataclass(frozen=True)
class Look:
    running: int | None  # the function's attempts in flight, None: nats-server did not say
    # None: not asked (the function is at its maxConcurrency, or its account looked too often)
    answers: holds.Answers | None


class QueueLooks:
    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane
        self._seen: dict[Key, tuple[float, Look]] = {}
        self._looking: dict[Key, asyncio.Task[Look]] = {}
        self._allowance: dict[str, TokenBucket] = {}  # looks each account may start

    async def of(self, fn: TaskFunction, stream: str) -> Look:
        key = (fn.account, fn.name, stream)
        now = time.monotonic()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < FRESH_FOR:
            return seen[1]
        looking = self._looking.get(key)
        if looking is None:
            if not self._allowed(fn.account, now):
                return seen[1] if seen is not None else Look(await self._running(fn), None)
            looking = self._looking[key] = asyncio.create_task(self._look(key, fn, stream))
        # Shielded: a reader that gives up does not cancel the look the others wait for.
        return await asyncio.shield(looking)

    async def _look(self, key: Key, fn: TaskFunction, stream: str) -> Look:
        try:
            running = await self._running(fn)
            if running is not None and running >= fn.spec.maxConcurrency:
                look = Look(running, None)  # held by its own limit: nothing to ask
            else:
                look = Look(running, await holds.ask(self._plane.nc, fn.account, fn.name, stream))
            self._remember(key, look)
            return look
        finally:
            del self._looking[key]

    async def _running(self, fn: TaskFunction) -> int | None:
        with contextlib.suppress(Exception):
            return (await queues.backlog(self._plane.js, fn))[1]
        return None

    def _allowed(self, account: str, now: float) -> bool:
        bucket = self._allowance.get(account)
        if bucket is None:
            bucket = self._allowance[account] = TokenBucket(LOOKS_PER_SECOND, LOOKS_BURST, now)
        if not bucket.take(now):
            return False
        if len(self._allowance) > REMEMBERED:  # a full bucket is as good as none
            self._allowance = {a: b for a, b in self._allowance.items() if b.level(now) < b.burst}
        return True

    def _remember(self, key: Key, look: Look) -> None:
        now = time.monotonic()
        self._seen[key] = (now, look)
        if len(self._seen) > REMEMBERED:
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < FRESH_FOR}
