"""Process-level tuning shared by the long-running services (gateway, dispatcher)."""

from __future__ import annotations

import ctypes
import gc

_PR_SET_DUMPABLE = 4


def keep_private() -> None:
    """A service holding NATS credentials: processes of the same user — functions run by a
    dispatcher, in `kubetask dev` — cannot read its memory, environment or open files through
    /proc (they become root's to read, as for a setuid program). Reset for the processes it
    starts: exec makes them ordinary again."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


def quiet_gc() -> None:
    """Move start-up objects out of the collector's sight and collect young objects less often.

    With a default threshold a busy service runs a full collection every few seconds, walking
    every task summary and model in memory; the pause lands on whatever request is in flight.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 1000)
