"""The task state machine: every allowed phase change, in one table.

Every writer (gateway, dispatcher, sweeper, operator) goes through `store.TaskStore.transition`,
which checks this table and writes with a compare-and-set on the record's KV revision, so a
transition is never lost and two dispatchers can never both claim one task.
"""

from __future__ import annotations

from .models import TaskPhase as P

TERMINAL: frozenset[P] = frozenset({P.Succeeded, P.Failed, P.Expired, P.Stopped})
# Waiting for a dispatcher: these may be claimed, paused, stopped or expired.
WAITING: frozenset[P] = frozenset({P.Pending, P.Queued, P.Retrying})

TRANSITIONS: dict[P, frozenset[P]] = {
    # Pending: accepted, publish to the queue not yet confirmed (the sweeper republishes it).
    P.Pending: frozenset({P.Queued, P.Running, P.Paused, P.Stopped, P.Expired}),
    P.Queued: frozenset({P.Running, P.Paused, P.Stopped, P.Expired}),
    # Running -> Running is a takeover: the claiming dispatcher died and its message came back.
    # Running -> Queued: the executor answered busy; the task goes back, no attempt spent.
    P.Running: frozenset(
        {P.Running, P.Queued, P.Succeeded, P.Failed, P.Retrying, P.Stopping, P.Stopped, P.Expired}
    ),
    P.Retrying: frozenset({P.Running, P.Paused, P.Stopped, P.Expired, P.Failed}),
    # Resume republishes with a fresh dispatch token, so it passes through Pending again.
    P.Paused: frozenset({P.Pending, P.Stopped}),
    P.Stopping: frozenset({P.Stopped}),
    P.Succeeded: frozenset(),
    P.Failed: frozenset(),
    P.Expired: frozenset(),
    P.Stopped: frozenset(),
}

# Which user actions apply from which phases; the API answers 409 for the rest.
STOPPABLE = WAITING | {P.Paused, P.Running}
PAUSABLE = WAITING
RESUMABLE = frozenset({P.Paused})
DELETABLE = TERMINAL | {P.Paused}


class IllegalTransition(Exception):
    def __init__(self, current: P, wanted: P, action: str | None = None) -> None:
        self.current = current
        self.wanted = wanted
        what = action or f"move to {wanted.value}"
        super().__init__(f"cannot {what}: the task is {current.value}")


def allowed(current: P, wanted: P) -> bool:
    return wanted in TRANSITIONS[current]
