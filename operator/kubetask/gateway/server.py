"""How the gateway is served: uvicorn on uvloop and httptools, one response sent in one write,
no request let to arrive for ever, and no ticking while idle.

uvicorn writes a response's status line and headers, then its body: two system calls and two
TCP segments for every 202 the gateway answers, and on loopback the sender also pays for the
receiving side of each. The writes a connection makes in one loop iteration are sent together.

uvicorn also waits as long as a client likes for a request's headers and body: a client that
opens connections and trickles a byte now and then (slowloris) holds a file descriptor and a
request in progress each, until the gateway has none left for anybody. Nor does it bound the
headers: httptools gathers a header value whole before handing it over, by concatenation, so a
header sent endlessly fills memory and keeps the event loop copying (seen: 145 MB in 30 s took
the gateway from 93 to 313 MB).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from ..models import ErrorBody
from ..settings import Settings
from .connection_holders import Holders
from .errors import RETRY_AFTER

LINGER = 2.0  # seconds a refused request's connection keeps reading before it is closed


class _Coalesced:
    """A transport whose writes are joined until the end of the loop iteration."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GatewayProtocol(HttpToolsProtocol):
    def __init__(
        self,
        *args: Any,
        request_timeout: float,
        max_connections: int,
        max_header_bytes: int,
        holders: Holders,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.max_header_bytes = max_header_bytes
        self.holders = holders
        self._deadline: asyncio.TimerHandle | None = None
        self._in_head = True  # until the current request's headers are complete
        self._begun = False  # a request is in progress (its first byte came, its end not yet)
        self._fresh = False  # a request began or ended in the read being parsed
        self._head_bytes = 0
        self._lingering = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(cast(asyncio.Transport, _Coalesced(transport)))
        if len(self.connections) > self.max_connections and not self.holders.make_room():
            # Refused before it can hold anything but its socket: the descriptors left are
            # what NATS, the index and the connections already open need.
            self._send_error(
                503,
                f"the gateway has {self.max_connections} connections open, its limit; "
                f"retry in {RETRY_AFTER}s",
                retry_after=RETRY_AFTER,
                linger=False,  # lingering would hold the descriptor this refusal saves
            )
            return
        self.holders.hold(self, None)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.holders.drop(self)
        super().connection_lost(exc)

    @property
    def idle(self) -> bool:
        """Between requests: none in progress, none begun, none waiting behind."""
        return (
            not self._begun
            and not self.pipeline
            and (self.cycle is None or self.cycle.response_complete)
            and not self.transport.is_closing()
        )

    def give_up(self) -> None:
        self._disarm()
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        """Counts what a request's head takes, read by read. In a read where a request ends or
        begins, the bytes before the new request's are the previous one's, so only the line and
        the headers the parser has handed over count there: a head may pass the limit by at most
        one read before it is refused."""
        if self._lingering:
            return
        self._fresh = False
        super().data_received(data)
        if not self._in_head or self.transport.is_closing():
            return
        if not self._fresh:
            self._head_bytes += len(data)
        elif self._begun:
            self._head_bytes = len(self.url) + sum(len(n) + len(v) for n, v in self.headers)
        else:
            self._head_bytes = 0
        if self._head_bytes > self.max_header_bytes:
            self._send_error(
                431, f"the request line and headers exceed {self.max_header_bytes} bytes"
            )

    def on_message_begin(self) -> None:
        """A request's time counts from its first byte: the connection's idle deadline, armed
        when it opened, starts again here."""
        super().on_message_begin()
        self._in_head = self._begun = self._fresh = True
        self._disarm()
        self._arm()

    def on_headers_complete(self) -> None:
        self._in_head = False
        credential = next((v for n, v in self.headers if n == b"authorization"), None)
        self.holders.hold(self, credential)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_head, self._fresh, self._begun = True, True, False
        super().on_message_complete()

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.request_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        """A connection that sent nothing is closed, as an idle keep-alive one is; a request
        begun and not finished in time is answered 408, and its route, if it is waiting for
        the rest of the body, sees the client gone."""
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_started:
            self.transport.close()
            return
        if self.headers is not None:
            self._send_error(
                408, f"the request did not arrive whole within {self.request_timeout:g} s"
            )
        else:
            self.transport.close()
        if cycle is not None:
            cycle.disconnected = True
            cycle.message_event.set()

    def send_400_response(self, msg: str) -> None:
        """A request the HTTP parser refused (a Content-Length that is not a number, a
        malformed request line) gets the one error body too, not uvicorn's plain text."""
        self._send_error(400, f"malformed HTTP request: {msg}")

    def _send_error(
        self, status: int, error: str, retry_after: int | None = None, linger: bool = True
    ) -> None:
        body = ErrorBody(error=error, retryAfter=retry_after)
        data = body.model_dump_json(exclude_none=True).encode()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        if retry_after is not None:
            head.append(b"retry-after: %d\r\n" % retry_after)
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(data),
            b"connection: close\r\n\r\n",
            data,
        ]
        self.transport.write(b"".join(head))
        if linger:
            self._linger()
        else:
            self.transport.close()

    def _linger(self) -> None:
        """Closed for writing at once, for reading after what the client still sends has been
        read and dropped for a moment: closing a socket with unread bytes resets the connection,
        and the client may lose the answer that says why."""
        self._lingering = True
        self._disarm()
        self.transport.write_eof()
        self.transport.resume_reading()
        self.loop.call_later(LINGER, self.transport.close)


def config(app: ASGIApp, host: str, port: int, settings: Settings, **extra: Any) -> uvicorn.Config:
    protocol = partial(
        GatewayProtocol,
        request_timeout=settings.request_timeout,
        max_connections=settings.max_connections,
        max_header_bytes=settings.max_header_bytes,
        holders=Holders(),
    )
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http=cast(type[asyncio.Protocol], protocol),
        # No route is a WebSocket: an upgrade request is served as the plain request it also
        # is, rather than refused with a bare 403 and no error body.
        ws="none",
        # Nothing here uses the client's address, so X-Forwarded-* need no middleware.
        proxy_headers=False,
        access_log=False,
        log_level="warning",
        # Open `logs -f` streams would otherwise hold a shutdown for as long as they last.
        timeout_graceful_shutdown=1,
        **extra,
    )


class Server(uvicorn.Server):
    """uvicorn's server, ticking once a second instead of ten times: its tick checks for a stop
    and refreshes the Date header, and at ten a second it was the largest part of what an
    idle gateway cost (bench/idle.py). Being told to stop (a signal, or `should_exit` set)
    wakes it at once instead."""

    def __init__(self, config: uvicorn.Config) -> None:
        self._wake: Callable[[], object] | None = None
        super().__init__(config)

    @property
    def should_exit(self) -> bool:
        return self._should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._should_exit = value
        if value and self._wake is not None:
            self._wake()

    async def main_loop(self) -> None:
        loop, stop = asyncio.get_running_loop(), asyncio.Event()
        self._wake = partial(loop.call_soon_threadsafe, stop.set)
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 10) % 864000  # each tick stands for ten of uvicorn's
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
