"""How many warm `server` instances one dispatcher keeps, all functions together.

Each function bounds its own instances (`maxInstances`), but ten thousand functions with one
warm instance each would be ten thousand resident processes on one node — idle instances are
stopped only after their `idleSeconds`. So starting an instance needs room in the node's
budget (KUBETASK_NODE_INSTANCES); when there is none, the instance of another function idle the
longest is stopped to make room, and if every instance is busy the start waits until one is
idle or gone. An instance serving a task is never stopped for room.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .server import Instance, InstancePool


class InstanceBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._changed = asyncio.Event()

    def changed(self) -> None:
        """An instance went idle or away: whoever waits for room looks again."""
        self._changed.set()

    async def room(self, pools: Iterable[InstancePool], asking: InstancePool) -> None:
        """Return once the instance `asking` is starting (already counted) fits the budget,
        stopping idle instances of other functions if need be."""
        while sum(p.started() for p in list(pools)) > self.limit:
            victim = self._longest_idle(pools, asking)
            if victim is not None:
                pool, inst = victim
                pool.instances.remove(inst)  # no await since it was found idle: nothing took it
                await inst.terminate()
                continue
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), 1.0)
            except TimeoutError:
                pass

    @staticmethod
    def _longest_idle(
        pools: Iterable[InstancePool], asking: InstancePool
    ) -> tuple[InstancePool, Instance] | None:
        best: tuple[InstancePool, Instance] | None = None
        for pool in list(pools):
            if pool is asking:
                continue
            for inst in pool.instances:
                if inst.inflight or inst.dead:
                    continue
                if best is None or inst.idle_since < best[1].idle_since:
                    best = (pool, inst)
        return best
