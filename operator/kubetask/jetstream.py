"""Connecting to NATS and creating the platform-wide buckets and streams (idempotently)."""

from __future__ import annotations

import contextlib
import re

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType, StreamConfig
from nats.js.errors import BadRequestError
from nats.js.kv import KeyValue

from . import events, names
from .settings import Settings

_WHITESPACE = re.compile(r"\s")


class Connection(Client):
    """nats-py's client with a cheaper header parser: every queue message and every record read
    carries headers, and the stock parser tests each character of each name in Python."""

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        """Same result as nats-py's: `Name: Value` lines, names with whitespace or non-ASCII
        bytes skipped, values decoded leniently."""
        out: dict[str, str] = {}
        for line in raw.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            try:
                key = name.strip().decode("ascii")
            except UnicodeDecodeError:
                continue
            if _WHITESPACE.search(key):
                continue
            out[key] = value.strip().decode("utf-8", "replace")
        return out


async def connect(settings: Settings, name: str) -> Client:
    nc = Connection()
    await nc.connect(
        settings.nats_url,
        name=name,
        max_reconnect_attempts=-1,
        # Seconds, slept on as given; nats-py's hint says int.
        reconnect_time_wait=0.5,  # type: ignore[arg-type]
        allow_reconnect=True,
    )
    return nc


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream, or update it when its config changed (e.g. a new limit)."""
    try:
        await js.add_stream(config)
    except BadRequestError:
        await js.update_stream(config)


async def ensure_kv(
    js: JetStreamContext, bucket: str, settings: Settings, history: int = 1
) -> KeyValue:
    with contextlib.suppress(Exception):
        return await js.key_value(bucket)
    return await js.create_key_value(
        # `direct`: reads are answered by any replica without the JSON API (much cheaper).
        KeyValueConfig(
            bucket=bucket,
            history=history,
            storage=StorageType.FILE,
            ttl=settings.retention_seconds,
            direct=True,
        )
    )


async def ensure_platform(js: JetStreamContext, settings: Settings) -> None:
    """Buckets and streams every component needs; safe to call from each at start-up."""
    await ensure_kv(js, names.TASKS_BUCKET, settings)
    for bucket in (names.FUNCTIONS_BUCKET, names.ASYNC_CONFIGS_BUCKET):
        with contextlib.suppress(Exception):
            await js.key_value(bucket)
            continue
        await js.create_key_value(
            KeyValueConfig(bucket=bucket, history=1, storage=StorageType.FILE)
        )
    await ensure_stream(
        js,
        StreamConfig(
            name=names.LOGS_STREAM,
            subjects=["kt.logs.>"],
            max_age=settings.retention_seconds,
            storage=StorageType.FILE,
        ),
    )
    await ensure_stream(js, events.stream_config(settings))
