"""Process-level tuning shared by the long-running services (gateway, dispatcher)."""

from __future__ import annotations

import gc


def quiet_gc() -> None:
    """Move start-up objects out of the collector's sight and collect young objects less often.

    With a default threshold a busy service runs a full collection every few seconds, walking
    every task summary and model in memory; the pause lands on whatever request is in flight.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 1000)
