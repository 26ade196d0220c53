"""What holds a queued task back, as the dispatchers see it ("why is my task waiting?").

Below its function's `maxConcurrency` a task can wait for reasons only a dispatcher knows: its
dispatch window (AIMD), its account's fair share there, the function's start rate, the node's
slots, or no dispatcher running at all. The gateway cannot see those, so when a waiting task is
read it asks every dispatcher at once (`kt.holds.<account>.<function>`, the task's queue as the
body) and each answers with its own view (`dispatch/hold_answers.py`). Asked only when a single
waiting task is read: nothing is kept or sent on the hot path.

Each answer carries how many dispatchers its sender sees alive (the lease bucket's members),
so the gateway stops waiting as soon as all have answered; with none listening nats-server says
so at once; one that is stopped or cut off is waited for `ANSWER_WITHIN` seconds, then left out
and counted as silent.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import pydantic
from nats.aio.msg import Msg

from . import names
from .jetstream import Connection
from .rpc import NO_RESPONDERS, STATUS

ANSWER_WITHIN = 0.5


LIMIT_SETTINGS = (
    "(KUBETASK_ACCOUNT_MAX_CONCURRENCY, or its own in KUBETASK_ACCOUNT_CONCURRENCY_LIMITS)"
)


class View(pydantic.BaseModel):
    """One dispatcher's view of one of a function's queues."""

    model_config = pydantic.ConfigDict(extra="ignore", frozen=True)

    dispatcher: str
    dispatchers: int = pydantic.Field(default=1, ge=1)  # alive as it sees them, itself included
    consumes: bool  # it pulls from this queue (every dispatcher, or a partition's lessee)
    closing: bool = False
    running: int = 0  # the function's attempts from this queue in flight there
    window: int = 0  # what its dispatch window lets it have in flight
    account_running: int = 0  # its account's attempts there that count against its share
    account_share: int | None = None  # None: no share applies (the account alone, fairness off)
    # The account's concurrency limit's part on this dispatcher (None: no limit), and what the
    # account runs there.
    account_limit: int | None = None
    account_limit_running: int = 0
    paced: bool = False  # the function's maxStartsPerSecond allows no start right now
    store_full: bool = False  # JetStream's storage is nearly full: nothing starts there
    slots: int = 0
    slots_taken: int = 0
    processes: int | None = None  # None: the function's attempts start no process there
    processes_taken: int = 0
    queued: int = 0  # attempts there waiting for a slot, every account's
    # Slots and processes there kept free for other active accounts (`node_budget.py`).
    slots_kept: int = 0
    processes_kept: int = 0

    def holds(self, account: str) -> list[str]:
        """What keeps this dispatcher from taking another of the function's tasks; empty when
        nothing does."""
        if self.closing:
            return ["it is shutting down"]
        said = []
        if self.running >= self.window:
            said.append(
                f"its dispatch window for the function is full ({self.running} running of "
                f"{self.window}; the window grows while executors keep up and shrinks when they "
                "answer busy)"
            )
        if self.account_share is not None and self.account_running >= self.account_share:
            said.append(
                f"account {account!r} has {self.account_running} recently started "
                f"attempt{'' if self.account_running == 1 else 's'} in flight there, its fair "
                "share while other accounts have work (KUBETASK_ACCOUNT_WEIGHTS; an attempt "
                "counts for its first KUBETASK_DISPATCH_LEND_AFTER seconds)"
            )
        if self.account_limit == 0:
            said.append(
                f"the concurrency limit of account {account!r} is split over "
                f"{self.dispatchers} dispatchers and no part of it falls to this one, so the "
                f"others run its tasks {LIMIT_SETTINGS}"
            )
        elif self.account_limit is not None and self.account_limit_running >= self.account_limit:
            said.append(
                f"account {account!r} runs {self.account_limit_running} "
                f"attempt{'' if self.account_limit_running == 1 else 's'} there, its part of "
                f"its concurrency limit over {self.dispatchers} "
                f"dispatcher{'' if self.dispatchers == 1 else 's'} {LIMIT_SETTINGS}"
            )
        if self.paced:
            said.append("the function's maxStartsPerSecond allows no more starts this moment")
        if self.store_full:
            said.append(
                "the platform's storage is nearly full (KUBETASK_STORE_MAX_BYTES): no attempt "
                "starts until tasks are deleted or expire, so those running can record theirs"
            )
        if self.slots_taken + self.queued >= self.slots:
            said.append(f"all {self.slots} of its attempt slots are taken (KUBETASK_NODE_SLOTS)")
        elif self.slots_taken + self.queued + self.slots_kept >= self.slots:
            said.append(_kept(self.slots_kept, "attempt slots", self.slots, "KUBETASK_NODE_SLOTS"))
        if self.processes is not None:
            if self.processes_taken + self.queued >= self.processes:
                said.append(
                    f"all {self.processes} of its command processes are running "
                    "(KUBETASK_NODE_PROCESSES)"
                )
            elif self.processes_taken + self.queued + self.processes_kept >= self.processes:
                said.append(
                    _kept(
                        self.processes_kept,
                        "command processes",
                        self.processes,
                        "KUBETASK_NODE_PROCESSES",
                    )
                )
        return said


def _kept(kept: int, what: str, of: int, setting: str) -> str:
    return (
        f"the rest of its {of} {what} ({setting}) are taken but {kept}, kept for other "
        "accounts' next tasks"
    )


@dataclass
class Answers:
    views: list[View] = field(default_factory=list)
    nobody: bool = False  # nats-server said that no dispatcher listens
    expected: int = 0  # the most dispatchers any answer said are alive
    error: str | None = None  # the question could not be put

    @property
    def silent(self) -> int:
        return max(0, self.expected - len(self.views))


async def ask(nc: Connection, account: str, function: str, stream: str) -> Answers:
    answers = Answers()
    done = asyncio.Event()

    def heard(msg: Msg) -> None:
        if msg.headers and msg.headers.get(STATUS) == NO_RESPONDERS:
            answers.nobody = True
            done.set()
            return
        try:
            view = View.model_validate_json(msg.data)
        except pydantic.ValidationError:
            return
        answers.views.append(view)
        answers.expected = max(answers.expected, view.dispatchers)
        if len(answers.views) >= answers.expected:
            done.set()

    inbox = nc.new_inbox()
    try:
        sub = await nc.subscribe_direct(inbox, heard)
    except Exception as err:  # cut off from NATS
        answers.error = str(err) or type(err).__name__
        return answers
    try:
        await nc.publish(names.holds_subject(account, function), stream.encode(), reply=inbox)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), ANSWER_WITHIN)
    except Exception as err:
        answers.error = str(err) or type(err).__name__
    finally:
        with contextlib.suppress(Exception):
            await nc.unsubscribe_direct(sub)
    return answers
