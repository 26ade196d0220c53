"""Drop tasks that waited in the queue longer than maxAsyncEventAgeInSeconds, unrun.

Age is dequeue time minus enqueue time (the first enqueue, or the latest resume), so time spent
waiting out retry backoff counts too, as with Lambda and Function Compute. The drop is counted
(`AsyncEventExpiredDropped`) by `accounting` once it is recorded.
"""

from __future__ import annotations

from ..models import TaskPhase
from .policy import Drop, Policy, TaskContext


class MaxEventAge(Policy):
    async def on_dequeue(self, ctx: TaskContext) -> Drop | None:
        stamps = ctx.record.task.status.timestamps
        enqueued = stamps.enqueued or stamps.submitted
        if enqueued is None:
            return None
        age = (ctx.dequeued_at - enqueued).total_seconds()
        limit = ctx.config.maxAsyncEventAgeInSeconds
        if age <= limit:
            return None
        return Drop(TaskPhase.Expired, f"waited {age:.1f}s in the queue, over the {limit}s limit")
