"""The connections and stores every data-plane process (gateway, dispatcher, operator) shares."""

from __future__ import annotations

from dataclasses import dataclass

from nats.js import JetStreamContext

from . import jetstream, metrics, names
from .history import Retention
from .models import TaskFunction
from .queue_moves import Mover
from .queues import QueueDepth
from .registry import Registry
from .rpc import Requester
from .settings import Settings
from .store import TaskStore
from .usage_reports import Tally


@dataclass
class DataPlane:
    nc: jetstream.Connection
    js: JetStreamContext
    rpc: Requester
    settings: Settings
    store: TaskStore
    registry: Registry
    depth: QueueDepth
    mover: Mover

    @classmethod
    async def connect(cls, settings: Settings, name: str, fail_fast: bool = False) -> DataPlane:
        """`fail_fast` (the gateway): while NATS is away, calls fail at once instead of being
        buffered until it is back, and JetStream calls in flight give up after 5 s rather than
        10, so a client is answered 503 promptly instead of waiting."""
        nc = await jetstream.connect(settings, name, buffer_while_reconnecting=not fail_fast)
        js = nc.jetstream(timeout=5 if fail_fast else 10)
        await jetstream.ensure_platform_once_up(js, settings)
        rpc = Requester(nc, timeout=10)
        await rpc.start()
        store = TaskStore(rpc, Retention(settings), Tally(nc, names.EVENTS_USAGE_SUBJECT))
        registry = Registry(js, settings)
        registry.on_function_change(_forget_deleted)
        await registry.start()
        depth = QueueDepth(rpc, settings.queue_max_msgs)
        return cls(nc, js, rpc, settings, store, registry, depth, Mover(js, settings))

    async def close(self) -> None:
        await self.mover.close()
        await self.registry.stop()
        await self.store.tally.close()
        await self.rpc.close()
        if not self.nc.is_closed:
            await self.nc.flush()
            await self.nc.close()


def _forget_deleted(account: str, name: str, fn: TaskFunction | None) -> None:
    """A deleted function's metrics series go with it, in every process."""
    if fn is None:
        metrics.forget(account, name)
