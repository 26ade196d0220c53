"""What a stream holds on one subject, read without a consumer: JetStream's batched direct get
(`$JS.API.DIRECT.GET.<stream>`, answered when the stream has `allow_direct`).

Trail and log reads each took a consumer on KT_EVENTS or KT_LOGS, which every account shares
and where nats-server allows 1,000: one account reading fast filled them, and every account's
reads failed until they went (a 500, later a 503). A direct get holds nothing on the server
between requests, so no account's reads can use up what another's need; it also spares the
consumer's create and delete, which a cluster passes through its meta leader, and any replica
may answer it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

from nats import errors as nats_errors
from nats.aio.client import Client

# At most this many messages, or this many bytes of them, per answer: a long log is read in
# several, and no answer holds the gateway's memory for the whole of it.
BATCH = 256
BATCH_BYTES = 1 << 20
# How long one answer's messages may take to arrive before the read is given up (a 503).
ANSWER_WAIT = 5.0
_FRACTION = re.compile(r"(\.\d{6})\d+")


@dataclass(frozen=True, slots=True)
class Stored:
    sequence: int
    data: bytes
    time: datetime | None


@dataclass(frozen=True, slots=True)
class Batch:
    messages: list[Stored]
    pending: int  # how many more the subject holds after the last of them


async def after(nc: Client, stream: str, subject: str, sequence: int) -> Batch:
    """The subject's messages stored after `sequence`, oldest first, up to BATCH."""
    request = {
        "seq": sequence + 1,
        "next_by_subj": subject,
        "batch": BATCH,
        "max_bytes": BATCH_BYTES,
    }
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish(f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(), reply=inbox)
        messages: list[Stored] = []
        while True:
            msg = await sub.next_msg(timeout=ANSWER_WAIT)
            headers = msg.headers or {}
            status = headers.get("Status")
            if status == "404":  # nothing after `sequence`
                return Batch(messages, 0)
            if status == "204":  # the end of this batch
                return Batch(messages, int(headers.get("Nats-Num-Pending", 0)))
            if status == "503":  # no server answers direct gets for the stream
                raise nats_errors.NoRespondersError
            if status:
                raise RuntimeError(f"direct get on {stream}: {status} {msg.data!r}")
            stamp = headers.get("Nats-Time-Stamp")
            messages.append(
                Stored(
                    int(headers["Nats-Sequence"]),
                    msg.data,
                    datetime.fromisoformat(_FRACTION.sub(r"\1", stamp)) if stamp else None,
                )
            )
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


@contextlib.asynccontextmanager
async def wakeups(nc: Client, subject: str) -> AsyncIterator[asyncio.Event]:
    """Set whenever a message is published on `subject`, so a reader following it reads again
    at once rather than polling. The stream may store the message a moment after it is heard
    (its leader on another server): a wake that finds nothing new is worth another read soon
    after."""
    heard = asyncio.Event()

    async def on_message(_: object) -> None:
        heard.set()

    sub = await nc.subscribe(subject, cb=on_message)
    try:
        yield heard
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
