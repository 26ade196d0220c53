"""Count outcomes and time stages into the Prometheus metrics."""

from __future__ import annotations

from .. import metrics
from ..models import TaskPhase
from .policy import Policy, TaskContext

_COUNTERS = {
    TaskPhase.Succeeded: metrics.SUCCEEDED,
    TaskPhase.Failed: metrics.FAILED,
    TaskPhase.Stopped: metrics.STOPPED,
    TaskPhase.Expired: metrics.EXPIRED_DROPPED,
}


class Accounting(Policy):
    async def on_terminal(self, ctx: TaskContext) -> None:
        counter = _COUNTERS.get(ctx.record.phase)
        if counter is not None:
            metrics.of(counter, ctx.account, ctx.function.name).inc()
