"""A dispatcher's answer to "what holds this function's queued tasks back here?" (`holds.py`).

Read from the worker's and the dispatcher's state as it is when asked, without taking anything
or registering a wake-up, so an answer never changes what is dispatched.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from nats.aio.msg import Msg

from .. import names
from ..holds import View

if TYPE_CHECKING:
    from .dispatcher import Dispatcher

log = logging.getLogger("kubetask.dispatcher")


def view(dispatcher: Dispatcher, account: str, function: str, stream: str) -> View:
    leases = dispatcher.leases
    seen = {
        "dispatcher": dispatcher.id,
        "dispatchers": leases.dispatchers() if leases is not None else 1,
        "closing": dispatcher.closing,
    }
    worker = dispatcher.workers.get((account, function, stream))
    if worker is None:
        return View(consumes=False, **seen)
    fairness, budget = dispatcher.fairness, dispatcher.budget
    slots_kept, processes_kept = budget.kept(account)
    return View(
        consumes=True,
        running=len(worker.inflight),
        window=worker.window.allowed(),
        account_running=fairness.inflight.get(account, 0),
        account_share=fairness.share(account),
        account_limit=dispatcher.concurrency.share(account),
        account_limit_running=dispatcher.concurrency.running.get(account, 0),
        paced=worker.rate is not None and worker.rate.spent(),
        store_full=dispatcher.store_hold.full(),
        slots=budget.settings.slots,
        slots_taken=budget.running,
        processes=budget.settings.processes if worker.process else None,
        processes_taken=budget.processes,
        queued=budget.waiting(),
        slots_kept=slots_kept,
        processes_kept=processes_kept if worker.process else 0,
        **seen,
    )


async def listen(dispatcher: Dispatcher) -> None:
    """Answer every question put to the dispatchers from now on."""
    nc = dispatcher.plane.nc

    async def asked(msg: Msg) -> None:
        parts = msg.subject.split(".")
        if not msg.reply or len(parts) != 4:
            return
        try:
            said = view(dispatcher, parts[2], parts[3], msg.data.decode())
            await nc.publish(msg.reply, said.model_dump_json().encode())
        except Exception:
            log.exception("could not say what holds %s back", msg.subject)

    await nc.subscribe(f"{names.HOLDS_PREFIX}.>", cb=asked)
