"""JetStream publishes and direct gets on the hot path, as requests on one shared inbox.

Every task costs four JetStream requests (record create and queue publish in the gateway; claim
and finish in a dispatcher, plus a record get when the record did not come with the message).
nats-py's `request` spends ~45 µs of CPU on each: a fresh
NUID plus an `os.urandom` call per reply subject, an `asyncio.wait_for` with its own timer and
waiter, and a dataclass built from every publish ack. Here a request is a counter-numbered reply
subject on one wildcard subscription (handed replies as they are read), a future in a dict, and
one sweep that times out whatever waited too long. Errors are nats-py's own exception types, so
callers handle them as before.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pydantic_core
from nats.aio.msg import Msg
from nats.errors import ConnectionReconnectingError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError, NoStreamResponseError

from .cancellation import cancel_and_wait
from .jetstream import Connection

STATUS = "Status"
NO_RESPONDERS = "503"
# JetStream's "wrong last sequence" errors: a compare-and-set lost its race.
WRONG_LAST_SEQUENCE = frozenset({10071, 10164})


class Requester:
    def __init__(self, nc: Connection, timeout: float) -> None:
        self.nc = nc
        self.timeout = timeout
        self._prefix = ""
        self._count = 0
        self._pending: dict[str, tuple[asyncio.Future[Msg], float]] = {}
        self._batches: dict[str, list[Msg]] = {}  # replies of a batch get, before its end
        self._sweeper: asyncio.Task[None] | None = None
        self._waiting = asyncio.Event()  # set while a request waits: an idle sweeper sleeps

    async def start(self) -> None:
        self._prefix = self.nc.new_inbox() + "."
        await self.nc.subscribe_direct(self._prefix + "*", self._on_reply)
        self._sweeper = asyncio.create_task(self._expire_forever())

    async def request(
        self,
        subject: str,
        payload: bytes,
        headers: dict[str, str] | None = None,
        batch: list[Msg] | None = None,
    ) -> Msg:
        """The reply; with `batch`, replies without a status are collected there and the status
        reply that ends them is returned."""
        if not self.nc.is_connected:
            # nats-py would buffer it until reconnected; the caller is better told now.
            raise ConnectionReconnectingError
        self._count += 1
        reply = self._prefix + str(self._count)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Msg] = loop.create_future()
        if not self._pending:
            self._waiting.set()
        self._pending[reply] = (future, loop.time() + self.timeout)
        if batch is not None:
            self._batches[reply] = batch
        try:
            await self.nc.publish(subject, payload, reply=reply, headers=headers)
            return await future
        finally:
            del self._pending[reply]
            self._batches.pop(reply, None)

    def _on_reply(self, msg: Msg) -> None:
        batch = self._batches.get(msg.subject)
        if batch is not None and not (msg.headers and STATUS in msg.headers):
            batch.append(msg)  # one of many; the status message that ends them answers below
            return
        waiting = self._pending.get(msg.subject)
        if waiting is not None and not waiting[0].done():
            waiting[0].set_result(msg)

    async def _expire_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                # Ticking twice a second while nothing waited was a good part of what an idle
                # gateway or dispatcher cost (bench/idle.py).
                self._waiting.clear()
                await self._waiting.wait()
            await asyncio.sleep(min(self.timeout / 4, 0.5))
            now = loop.time()
            # Cut off from NATS, nothing pending will be answered: fail it now, not at its
            # deadline.
            cut_off = not self.nc.is_connected
            for future, deadline in list(self._pending.values()):
                if (cut_off or deadline < now) and not future.done():
                    future.set_exception(
                        ConnectionReconnectingError() if cut_off else NatsTimeoutError()
                    )

    async def close(self) -> None:
        await cancel_and_wait(self._sweeper)

    async def batch_get(self, stream: str, request: dict[str, object]) -> tuple[list[Msg], int]:
        """A batch direct get: the stored messages it returns (in sequence order) and how many
        more match after them."""
        batch: list[Msg] = []
        subject = f"$JS.API.DIRECT.GET.{stream}"
        end = await self.request(subject, json.dumps(request).encode(), batch=batch)
        headers = end.headers or {}
        status = headers.get(STATUS)
        if status == "404":
            return [], 0
        if status != "204":  # 204 "EOB": the end of a batch
            raise APIError(code=int(status or 0), description=headers.get("Description", ""))
        return batch, int(headers.get("Nats-Num-Pending", "0"))

    async def api(
        self, subject: str, payload: bytes = b"", headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """A JetStream API answer (a publish ack, stream info, ...), its error raised as the
        matching nats-py exception."""
        msg = await self.request(subject, payload, headers)
        if msg.headers and msg.headers.get(STATUS) == NO_RESPONDERS:
            raise NoStreamResponseError
        answer: dict[str, Any] = pydantic_core.from_json(msg.data)
        if "error" in answer:
            APIError.from_error(answer["error"])  # raises
        return answer

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> int:
        """Store a message in the stream that holds `subject`; its sequence when stored."""
        seq: int = (await self.api(subject, payload, headers))["seq"]
        return seq

    async def last_for(self, stream: str, subject: str) -> Msg | None:
        """The stream's last message on `subject` (a direct get), None when there is none."""
        msg = await self.request(f"$JS.API.DIRECT.GET.{stream}.{subject}", b"")
        headers = msg.headers or {}
        status = headers.get(STATUS)
        if status == "404":
            return None
        if status == NO_RESPONDERS:
            # JetStream away (restarting, out of space, a cluster without a leader): unavailable,
            # as a publish nobody answers is. A NotFoundError reached a client as a 500 (seen).
            raise NoStreamResponseError
        if status is not None:
            raise APIError(code=int(status), description=headers.get("Description", ""))
        return msg
