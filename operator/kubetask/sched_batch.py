"""`kubetask dev` runs its nats-server under the kernel's SCHED_BATCH policy, and nothing else.

Why: every task is handed from the gateway to nats-server to a dispatcher and back several
times, and under the default policy each hand-off wakes nats-server, which then preempts
whichever component was on the core and leaves that one's loop iteration half done. Flooding
no-op tasks on 2 cores, the gateway was switched out against its will 17,000 times in 11.7 s.
A thread woken under SCHED_BATCH does not preempt: it runs at once on an idle core, otherwise
when the running thread blocks or its turn ends, and then finds more work waiting. Same flood
with nats-server alone under it (`bench/README.md`, 2026-12-03): 9.7 s, the gateway's
involuntary switches 2,100.

Not the gateway and the dispatchers, though that was faster still (8.2 s, 29% less CPU): a
component that does not preempt waits for a tenant's CPU-bound function to end its turn before
it takes the next task (up to a scheduler slice per hand-off), and a light account's p99 went
from about 6 ms to about 8 while a neighbour burned both cores (`bench/busy_neighbour.py`);
with nats-server alone under it, about 6. Functions keep the default policy, as they would
anywhere else.

The policy is per thread and inherited by the threads a thread starts, so it is set in the
forked child before nats-server is executed, and all of Go's threads have it. Only Linux has
it; where it is refused, `kubetask dev` says so and goes on (not seen: nothing here refuses
a process its own non-real-time policy).
`KUBETASK_DEV_NATS_BATCH=off` leaves nats-server under the default policy. On Kubernetes
nats-server is a pod of its own and keeps the default.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

SWITCH = "KUBETASK_DEV_NATS_BATCH"


def wanted() -> bool:
    """Whether `kubetask dev` asks for it; ValueError naming the variable on a bad value."""
    from .settings import env_switch  # the components' settings: not for every CLI call

    return env_switch(SWITCH, True) and hasattr(os, "SCHED_BATCH")


def enter() -> None:
    """For a `preexec_fn`: SCHED_BATCH for the calling thread and all it starts. A refusal
    cannot be reported from there; `holds` tells the parent afterwards."""
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def preexec(batch: bool, then: Callable[[], None] | None) -> Callable[[], None] | None:
    """The `preexec_fn` of a child that is under SCHED_BATCH if `batch`, then runs `then` (the
    parent's death signal, say); None when there is nothing to do."""
    if not batch:
        return then

    def enter_then() -> None:
        enter()
        if then is not None:
            then()

    return enter_then


def holds(pid: int) -> bool:
    """Whether `pid`'s main thread runs under SCHED_BATCH."""
    try:
        return os.sched_getscheduler(pid) == os.SCHED_BATCH
    except OSError:
        return False
