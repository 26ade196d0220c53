"""Connecting to NATS and creating the platform-wide buckets and streams (idempotently)."""

from __future__ import annotations

import contextlib

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType, StreamConfig
from nats.js.errors import BadRequestError
from nats.js.kv import KeyValue

from . import events, names
from .settings import Settings


async def connect(settings: Settings, name: str) -> Client:
    return await nats.connect(
        settings.nats_url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        allow_reconnect=True,
    )


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
