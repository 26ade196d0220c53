"""Poison never spreads: a record or queue message that cannot be decoded is set aside here —
kept with its reason in the `KT_QUARANTINE` stream, counted in a metric, listed for admins at
`GET /v1/quarantine` — and the component that met it goes on. Nothing that fails to decode may
crash a component, block its start-up or hold a concurrency slot.

Records stay where they are (the platform never deletes a tenant's data on its own); the
gateway's index leaves them out, and reading one answers 404 saying why. Queue messages are
terminated after being copied here, so they are not delivered again.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from prometheus_client import Counter

from . import names

if TYPE_CHECKING:  # store -> rpc -> jetstream -> this module
    from .store import Unreadable

STREAM = "KT_QUARANTINE"
SUBJECT_PREFIX = "kt.quarantine"
REASON = "Kubetask-Reason"
WHERE = "Kubetask-Where"
KEPT = 100_000  # entries; the oldest go first
log = logging.getLogger("kubetask.quarantine")

QUARANTINED = Counter(
    "kubetask_quarantined_total",
    "Records and queue messages that could not be decoded and were set aside.",
    ("source",),
)


def stream_config(retention_seconds: float) -> StreamConfig:
    return StreamConfig(
        name=STREAM,
        subjects=[f"{SUBJECT_PREFIX}.>"],
        storage=StorageType.FILE,
        max_msgs=KEPT,
        max_age=retention_seconds,
        allow_direct=True,
    )


@dataclass(frozen=True)
class Poison:
    source: str  # "record", "queue", "registry"
    where: str  # the KV key or the queue subject it was found at
    data: bytes
    reason: str
    msg_id: str  # the same poison found twice is kept once


async def keep(js: JetStreamContext, poison: Poison) -> None:
    """Copy the poison into the quarantine stream. Best effort: failing to keep it must not
    turn into the crash quarantine exists to prevent (it is logged and counted either way)."""
    QUARANTINED.labels(poison.source).inc()
    log.error("quarantined a %s at %s: %s", poison.source, poison.where, poison.reason)
    headers = {
        REASON: poison.reason[:1000],
        WHERE: poison.where[:400],
        "Nats-Msg-Id": poison.msg_id[:200],
    }
    try:
        await js.publish(f"{SUBJECT_PREFIX}.{poison.source}", poison.data, headers=headers)
    except Exception as err:
        log.error("could not keep the quarantined %s: %s", poison.source, err)


def describe(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:500]


def entry(headers: dict[str, str], data: bytes) -> dict[str, Any]:
    """One quarantined item as `GET /v1/quarantine` shows it."""
    subject = headers.get("Nats-Subject", "")
    return {
        "sequence": int(headers.get("Nats-Sequence", "0")),
        "time": headers.get("Nats-Time-Stamp"),
        "source": subject.rpartition(".")[2],
        "where": headers.get(WHERE, ""),
        "reason": headers.get(REASON, ""),
        "size": len(data),
        "preview": data[:200].decode("utf-8", "replace"),
    }


def record(key: str, revision: int, raw: bytes, err: BaseException) -> Poison:
    """A task record (KV key `key`) that does not decode."""
    where = f"{names.TASKS_BUCKET}/{key}"
    return Poison("record", where, raw, describe(err), f"record.{key}.{revision}")


def unreadable(err: Unreadable) -> Poison:
    return record(err.key, err.revision, err.raw, err.err)


def keep_later(js: JetStreamContext, poison: Poison) -> None:
    """For synchronous callers (mirrors applying a change): keep it from a task of its own."""
    task = asyncio.get_running_loop().create_task(keep(js, poison))
    _keeping.add(task)
    task.add_done_callback(_keeping.discard)


_keeping: set[asyncio.Task[None]] = set()


async def list_entries(rpc: Any, limit: int) -> list[dict[str, Any]]:
    """The newest `limit` quarantined items, oldest first. NATS errors are the caller's to
    answer (503): an outage must not read as an empty quarantine."""
    state = (await rpc.api(f"$JS.API.STREAM.INFO.{STREAM}"))["state"]
    if not state["messages"]:
        return []
    last = int(state["last_seq"])
    first = max(int(state["first_seq"]), last - limit + 1)
    msgs, _ = await rpc.batch_get(STREAM, {"seq": first, "batch": limit})
    return [entry(m.headers or {}, m.data) for m in msgs]
