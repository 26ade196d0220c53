"""A standing pull request on a function's consumer, sized to the worker's free slots.

nats-py's `fetch` makes each pull a request with its own waiter, and an empty queue answers it
with a TimeoutError whose traceback ties frames, tasks and futures into reference cycles: at a
thousand tasks a second the collector then stopped the dispatcher for 60-100 ms every couple of
seconds, which was most of the submit-to-start p99. Here one request at a time stays open for
as many messages as there are free slots, messages arrive on a subscription callback, and the
request is renewed when it has been filled, when the server ends it (408 expired, 409 refused)
or, should the server have lost it (a restart), when it is overdue. Messages are handed over as
they are read (`Connection.subscribe_direct`).

A function idle for long keeps no request open at all: it *dozes*, watching its queue subject
with a core subscription, and the first task published there wakes it (see `_doze`). A request
that finds the consumer gone (nats-server removes an idle one) has it re-created first
(`revive`, `idle_consumers.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ..jetstream import Connection

log = logging.getLogger("kubetask.dispatcher")

# A request lives this long on the server; a lost one is noticed GRACE after that.
EXPIRES = 5.0
GRACE = 1.0
# A request that expired with nothing for it is followed by one that lives four times as long,
# up to this (5, 20, 80 s), so a function with a task now and then keeps a request open without
# asking every five seconds; once one of IDLE_EXPIRES ends empty, a pull with a subject to watch
# dozes. Whatever the server forgets meanwhile is asked for again: on a reconnect at once,
# otherwise when the request is overdue.
IDLE_EXPIRES = 80.0
IDLE_GROWTH = 4
# After the server refuses a request (409: consumer deleted, too many waiting, ...).
REFUSED_PAUSE = 0.5
# After the consumer could not be re-created.
REVIVE_PAUSE = 1.0


class Pull:
    def __init__(
        self,
        nc: Connection,
        stream: str,
        consumer: str,
        free: Callable[[], int],
        deliver: Callable[[Msg], None],
        expires: float = EXPIRES,
        idle_expires: float = IDLE_EXPIRES,
        watch: str | None = None,
        revive: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._nc = nc
        self._subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._free = free
        self._deliver = deliver
        self._busy_expires = expires
        self._idle_expires = idle_expires
        self._expires = expires
        self._fed = False  # the open request brought something
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._loop = asyncio.get_running_loop()
        self._owed = 0  # messages the open request may still bring; 0: none open
        self._overdue: asyncio.TimerHandle | None = None
        self._renewal: asyncio.Handle | None = None
        self._sending: asyncio.Task[None] | None = None
        self._watch = watch  # the queue subject new tasks are published on
        self._dormant = False
        self._watching: Subscription | None = None
        self._dozing: asyncio.Task[None] | None = None
        self._unwatching: asyncio.Task[None] | None = None
        self._revive = revive  # re-creates the consumer nats-server removed while idle
        self._revival: asyncio.Task[None] | None = None  # no request opens meanwhile

    async def start(self, dozing: bool = False) -> None:
        """`dozing`: start asleep, watching the subject (its consumer is gone and nothing
        waits, `idle_consumers.bind`)."""
        self._sub = await self._nc.subscribe_direct(self._inbox, self._on_msg)
        self._nc.on_reconnect.add(self._forgotten)
        if dozing and self._watch is not None:
            self._doze()
        else:
            self.wake()

    def _forgotten(self) -> None:
        """Reconnected: the server forgot the request, and a dozing pull may have missed a
        publish while the connection was down."""
        self.rouse()
        self._expires = self._busy_expires
        self._ended()

    def wake(self, delay: float = 0.0) -> None:
        """Slots may have freed: open a request for them if none is open. Renewal waits for the
        next loop iteration, so slots freed together are asked for in one request. A dozing
        pull stays asleep: nothing waits for it until its subject says otherwise."""
        if self._owed or self._renewal is not None or self._sub is None or self._dormant:
            return
        if self._revival is not None:
            return
        if delay:
            self._renewal = self._loop.call_later(delay, self._renew)
        else:
            self._renewal = self._loop.call_soon(self._renew)

    def _renew(self) -> None:
        self._renewal = None
        batch = self._free()
        if self._owed or batch <= 0 or self._sub is None:
            return
        self._owed = batch
        self._fed = False
        self._overdue = self._loop.call_later(self._expires + GRACE, self._unanswered)
        self._sending = self._loop.create_task(self._request(batch))

    async def _request(self, batch: int) -> None:
        body = {"batch": batch, "expires": int(self._expires * 1e9)}
        try:
            await self._nc.publish(self._subject, json.dumps(body).encode(), reply=self._inbox)
        except Exception as err:  # disconnected: try again once the server may be back
            log.warning("pull request on %s failed: %s", self._subject, err)
            self._ended(REFUSED_PAUSE)
        finally:
            if self._sending is asyncio.current_task():
                self._sending = None

    def _ended(self, pause: float = 0.0) -> None:
        self._ended_request()
        self.wake(pause)

    def _on_msg(self, msg: Msg) -> None:
        if not msg.reply:  # a status: JetStream messages always carry their ack subject
            status = (msg.headers or {}).get("Status")
            if status == "100":  # idle heartbeat
                return
            if self._dormant and not self._fed:  # the look after dozing off found nothing
                self._ended_request()
                return
            if status == "503" and self._revive is not None:  # no consumer: removed while idle
                self._ended_request()
                self._revive_and_pull()
                return
            if status not in ("404", "408"):
                log.debug("pull on %s ended: %s %s", self._subject, status, msg.headers)
            elif status == "408" and not self._fed:
                if self._watch is not None and self._expires >= self._idle_expires:
                    self._doze()
                    return
                self._expires = min(self._expires * IDLE_GROWTH, self._idle_expires)
            self._ended(0.0 if status in ("404", "408") else REFUSED_PAUSE)
            return
        self._fed = True
        self._expires = self._busy_expires
        self.rouse()
        if self._owed:
            self._owed -= 1
            if not self._owed:
                self._ended()
        self._deliver(msg)

    def _unanswered(self) -> None:
        """The request outlived its expiry with no answer: the server forgot it (restarted), or
        it went to no consumer while something else subscribes to the request subject, so no
        503 came (an operator watching `>`, say)."""
        if self._revive is None:
            self._ended()
            return
        self._ended_request()
        self._revive_and_pull()

    def _revive_and_pull(self) -> None:
        if self._revival is None:
            self._revival = self._loop.create_task(self._revived())

    async def _revived(self) -> None:
        assert self._revive is not None
        pause = 0.0
        try:
            await self._revive()
        except Exception as err:  # NATS away, or the queue removed with its function
            log.warning("cannot re-create the consumer for %s: %s", self._subject, err)
            pause = REVIVE_PAUSE
        finally:
            self._revival = None
        self._ended(pause)

    def _doze(self) -> None:
        """Idle through a whole IDLE_EXPIRES: open no request, watch the queue subject instead.

        An idle function then asks nothing of the server at all, where a request always open
        was renewed every ten minutes (ten thousand functions: 17 renewals a second, through
        the dispatcher's loop and nats-server's), and its consumer, used by no request, is
        removed by nats-server after a while (`idle_consumers.py`): ten thousand idle
        consumers cost more than all the requests did (bench/README.md, "Idle functions").
        What a publish on the subject does not announce, the backlog gauge does
        (`backlog_gauge.py`): a retry moved in from its schedule, a redelivery after a
        dispatcher died."""
        self._ended_request()
        self._dormant = True
        self._dozing = self._loop.create_task(self._watch_and_look())

    async def _watch_and_look(self) -> None:
        """Subscribe, then pull once without waiting: the server takes the subscription before
        the pull (one connection, in order), so a task published before it is found by the
        look, and one after it by the subscription."""
        assert self._watch is not None
        try:
            watching = await self._nc.subscribe_direct(self._watch, self._on_publish)
        except Exception as err:
            log.warning("cannot watch %s: %s", self._watch, err)
            self._dormant = False
            self._ended(REFUSED_PAUSE)
            return
        if self._sub is None or not self._dormant:  # stopped or roused meanwhile
            await self._unwatch(watching)
            return
        self._watching = watching
        batch = self._free()
        if batch <= 0:  # no room here now: a task found later by the gauge or a publish waits
            return
        self._owed = batch
        self._fed = False
        self._overdue = self._loop.call_later(GRACE, self._ended_request)
        body = {"batch": batch, "no_wait": True}
        try:
            await self._nc.publish(self._subject, json.dumps(body).encode(), reply=self._inbox)
        except Exception as err:
            log.warning("pull request on %s failed: %s", self._subject, err)
            self._ended_request()

    def _on_publish(self, _msg: Msg) -> None:
        self.rouse()

    def rouse(self) -> None:
        """Leave the doze: a task was published on the subject, or is known to wait."""
        if not self._dormant:
            return
        self._dormant = False
        self._expires = self._busy_expires
        watching, self._watching = self._watching, None
        if watching is not None:
            self._unwatching = self._loop.create_task(self._unwatch(watching))
        self.wake()

    async def _unwatch(self, watching: Subscription) -> None:
        try:
            await self._nc.unsubscribe_direct(watching)
        except Exception as err:  # closed or reconnecting: the subscription goes with it
            log.debug("unwatching %s: %s", self._watch, err)

    def _ended_request(self) -> None:
        self._owed = 0
        if self._overdue is not None:
            self._overdue.cancel()
            self._overdue = None

    async def stop(self) -> None:
        self._nc.on_reconnect.discard(self._forgotten)
        sub, self._sub = self._sub, None
        for pending in (self._overdue, self._renewal, self._sending, self._revival):
            if pending is not None:
                pending.cancel()
        # Not cancelled: a cancel inside nats-py's subscribe could leave a subscription
        # nobody holds. It notices the stop and unsubscribes by itself.
        if self._dozing is not None and not self._dozing.done():
            await asyncio.wait([self._dozing], timeout=GRACE)
        watching, self._watching = self._watching, None
        if watching is not None:
            await self._unwatch(watching)
        if sub is not None:
            await self._nc.unsubscribe_direct(sub)
