"""Stopping background tasks when a library may swallow their cancellation.

nats-py's publish path (`Client._flush_pending`) catches `CancelledError` and returns: a task
cancelled while it publishes goes on to its next await as if nothing happened, and whoever
awaited it after `cancel()` waited forever (the dispatcher's partition leases did, and a CI run
hung in the test session's teardown until it was killed). Cancelling again until the task is
done ends it at its next await either way; the pause between cancellations leaves a task that
does honour the first one time for its own cleanup.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("kubetask")

RECANCEL_AFTER = 1.0


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel `tasks` (None is skipped) and return once every one has ended; an exception one
    ended with is logged, not raised: it is being stopped."""
    live = {t for t in tasks if t is not None}
    ended = set(live)
    while live:
        for task in live:
            task.cancel()
        _, live = await asyncio.wait(live, timeout=RECANCEL_AFTER)
    for task in ended:
        if not task.cancelled() and task.exception() is not None:
            log.warning("%s ended with %r while stopping", task.get_name(), task.exception())
