"""Retry failed attempts with exponential backoff, up to maxAsyncRetryAttempts (0 = never).

The retry is a scheduled message, so the task holds no concurrency slot while it waits.
"""

from __future__ import annotations

from datetime import timedelta

from ..executors import Outcome
from ..metrics import RETRIED
from ..store import now
from .policy import Policy, Retry, TaskContext


class Retries(Policy):
    async def on_failure(self, ctx: TaskContext, outcome: Outcome) -> Retry | None:
        attempts = ctx.record.task.status.attempts
        if attempts > ctx.config.maxAsyncRetryAttempts:
            return None
        delay = ctx.config.retryBackoff.delay(attempts)
        RETRIED.labels(ctx.account, ctx.function.name).inc()
        return Retry(at=now() + timedelta(seconds=delay), delay=delay)
