"""Connecting to NATS and creating the platform-wide buckets and streams (idempotently)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import re
import time
from collections.abc import Callable

from nats import errors as nats_errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js import errors as js_errors
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

from . import events, history, names, nats_auth, quarantine
from .settings import Settings
from .sizes import in_binary_units

_WHITESPACE = re.compile(r"\s")


log = logging.getLogger("kubetask.nats")
# JetStream's codes for "insufficient resources" (a write past its storage) and "insufficient
# storage resources available" (a stream's reservation past it).
NO_ROOM = (10023, 10047)
# How often a component waiting for JetStream says so again.
WAIT_WARNING_EVERY = 30.0

# Errors that mean NATS did not answer (in time): what was asked was not done; try again.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    nats_errors.TimeoutError,
    nats_errors.ConnectionClosedError,
    nats_errors.ConnectionDrainingError,
    nats_errors.ConnectionReconnectingError,
    nats_errors.NoRespondersError,
    nats_errors.OutboundBufferLimitError,
    nats_errors.StaleConnectionError,
    nats_errors.NoServersError,
    js_errors.ServiceUnavailableError,
    js_errors.NoStreamResponseError,
    # JetStream failed to do it (a consumer changed by two requests at once, a store hiccup):
    # nothing was done, and trying again is the remedy.
    js_errors.ServerError,
    TimeoutError,
    asyncio.TimeoutError,
    ConnectionError,
)


class Connection(Client):
    """nats-py's client with a cheaper header parser — every queue message and every record read
    carries headers, and the stock parser tests each character of each name in Python — and
    subscriptions whose messages are handed over as they are read (`subscribe_direct`)."""

    def __init__(self) -> None:
        super().__init__()
        self._direct: dict[int, Callable[[Msg], None]] = {}
        # Called once reconnected: what the server held for this client (open pull requests)
        # may be gone.
        self.on_reconnect: set[Callable[[], None]] = set()

    async def _reconnected(self) -> None:
        log.warning("reconnected to NATS")
        for listener in list(self.on_reconnect):
            listener()

    async def subscribe_direct(self, subject: str, handler: Callable[[Msg], None]) -> Subscription:
        """Call `handler` with each message right in the read loop. A stock subscription puts
        each message on a queue for a task of its own to pick up, a task switch per message; the
        hot-path subscriptions (request replies, pulled queue messages) only file the message
        away, so they need no task of their own. The handler must not block."""
        sub = await self.subscribe(subject)
        self._direct[sub._id] = handler
        return sub

    async def unsubscribe_direct(self, sub: Subscription) -> None:
        self._direct.pop(sub._id, None)
        await sub.unsubscribe()

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        handler = self._direct.get(sid)
        if handler is None:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        hdr = await self._process_headers(headers) if headers else None
        try:
            handler(self._build_message(sid, subject, reply, data, hdr))
        except Exception:  # the read loop must go on
            log.exception("handling a message on %s failed", subject.decode(errors="replace"))

    async def _process_err(self, err_msg: str) -> None:
        """nats-py closes the connection for good on most server errors (a request the server
        found too long, say), which left a component cut off until restarted. Here only a
        permissions error is reported and the connection kept; every other error reconnects,
        for ever, like a lost connection does."""
        said = err_msg.strip("'")
        if "permissions violation" in said.lower():
            log.error("NATS refused: %s", said)
            return
        log.warning("NATS server error %s; reconnecting", said)
        await self._process_op_err(nats_errors.Error(f"nats: {said}"))

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


async def _disconnected() -> None:
    log.warning("lost the connection to NATS; reconnecting")


async def _error(err: Exception) -> None:
    log.warning("NATS connection: %s", err or type(err).__name__)


async def connect(
    settings: Settings,
    name: str,
    user: str | None = None,
    password: str | None = None,
    buffer_while_reconnecting: bool = True,
) -> Connection:
    """Connect as this component's NATS user (or `user`), waiting for NATS as long as it takes:
    a component started before NATS, or while it restarts, comes up when NATS does."""
    user = user or settings.nats_user
    password = password or settings.nats_password
    options: dict[str, object] = {}
    if not buffer_while_reconnecting:
        options["pending_size"] = 0
    if user:
        options.update(user=user, password=password, inbox_prefix=nats_auth.inbox_prefix(user))
    delay = 0.1
    while True:
        nc = Connection()
        try:
            await nc.connect(
                settings.nats_url,
                name=name,
                max_reconnect_attempts=-1,
                # Seconds, slept on as given; nats-py's hint says int.
                reconnect_time_wait=0.5,  # type: ignore[arg-type]
                allow_reconnect=True,
                connect_timeout=2,
                disconnected_cb=_disconnected,
                reconnected_cb=nc._reconnected,
                error_cb=_error,
                **options,  # type: ignore[arg-type]
            )
            return nc
        except (nats_errors.NoServersError, OSError, TimeoutError) as err:
            log.warning("cannot reach NATS at %s (%s); retrying", settings.nats_url, err)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


class StreamDoesNotFit(ValueError):
    """JetStream has too little storage left to reserve a stream's `max_bytes`: a setting to
    lower or a disk to grow, which waiting does not mend."""


async def ensure_stream(js: JetStreamContext, config: StreamConfig, settings: Settings) -> None:
    """Create the stream, or update it when its config changed (e.g. a new limit), with the
    platform's number of replicas."""
    config = dataclasses.replace(config, num_replicas=settings.stream_replicas)
    try:
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.update_stream(config)
    except js_errors.APIError as err:
        if err.err_code not in NO_ROOM or not config.max_bytes:
            raise
        raise StreamDoesNotFit(
            f"stream {config.name} would reserve {in_binary_units(config.max_bytes)} of"
            " JetStream's storage, more than nats-server has left: lower"
            " KUBETASK_LOGS_MAX_BYTES and KUBETASK_EVENTS_MAX_BYTES, or give it more disk"
        ) from None


async def ensure_bucket(js: JetStreamContext, config: KeyValueConfig, settings: Settings) -> None:
    """Create the bucket with the platform's number of replicas, or bring an existing one to
    it (a single server's buckets, once NATS became a cluster)."""
    replicas = settings.stream_replicas
    try:
        info = await js.stream_info(f"KV_{config.bucket}")
    except NotFoundError:
        await js.create_key_value(dataclasses.replace(config, replicas=replicas))
        return
    if info.config.num_replicas != replicas:
        await js.update_stream(dataclasses.replace(info.config, num_replicas=replicas))


async def ensure_platform_once_up(js: JetStreamContext, settings: Settings) -> None:
    """`ensure_platform`, waiting for JetStream as long as it takes. A server started without
    JetStream answers 503 (seen), and so, reasoned, does one still restoring its streams or a
    cluster still electing its leader. A component that exited then (it did, with a traceback)
    would be restarted by Kubernetes with a back-off growing to five minutes, and be away that
    long after JetStream is back. Celery's workers wait for their broker the same way."""
    delay, warned = 0.1, -math.inf
    while True:
        try:
            await ensure_platform(js, settings)
        except UNAVAILABLE as err:
            if time.monotonic() - warned >= WAIT_WARNING_EVERY:
                warned = time.monotonic()
                # nats-py's text for no responders (a 503 without a code) names nothing.
                unanswered = isinstance(err, js_errors.ServiceUnavailableError) and (
                    err.err_code is None
                )
                why = "no JetStream answered" if unanswered else str(err) or type(err).__name__
                url = settings.nats_url
                log.warning("JetStream at %s is not available (%s); waiting", url, why)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            continue
        if warned > -math.inf:
            log.info("JetStream at %s answered; going on", settings.nats_url)
        return


async def ensure_platform(js: JetStreamContext, settings: Settings) -> None:
    """Buckets and streams every component needs; safe to call from each at start-up."""
    tasks = KeyValueConfig(
        bucket=names.TASKS_BUCKET,
        history=1,
        storage=StorageType.FILE,
        ttl=settings.retention_seconds,
        direct=True,  # reads are answered by any replica without the JSON API (much cheaper)
    )
    await ensure_bucket(js, tasks, settings)
    await history.apply_to(js, f"KV_{names.TASKS_BUCKET}", settings, compress=False)
    for bucket in (names.FUNCTIONS_BUCKET, names.ASYNC_CONFIGS_BUCKET, names.ROUTES_BUCKET):
        config = KeyValueConfig(bucket=bucket, history=1, storage=StorageType.FILE)
        await ensure_bucket(js, config, settings)
    # Leases live only as long as they are renewed; losing them all in a restart is harmless.
    leases = KeyValueConfig(
        bucket=names.LEASES_BUCKET, history=1, storage=StorageType.MEMORY, ttl=settings.lease_ttl
    )
    await ensure_bucket(js, leases, settings)
    await ensure_stream(
        js,
        StreamConfig(
            name=names.LOGS_STREAM,
            subjects=[names.ALL_LOGS],
            max_age=settings.retention_seconds,
            max_bytes=settings.logs_max_bytes,
            discard=DiscardPolicy.OLD,
            storage=StorageType.FILE,
            allow_direct=True,  # read without consumers: `direct_reads.py`
            **history.stream_options(settings),  # type: ignore[arg-type]
        ),
        settings,
    )
    await ensure_stream(js, events.stream_config(settings), settings)
    await ensure_stream(js, quarantine.stream_config(settings.retention_seconds), settings)
