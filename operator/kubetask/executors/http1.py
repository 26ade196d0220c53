"""Keep-alive HTTP/1.1 connections to one warm instance (on localhost, or a warm pod).

A warm instance is invoked once per task, so the client's cost per request is paid on every
millisecond task: aiohttp's general-purpose client spent ~70 µs of CPU on each (session,
request and response objects, timers, trace hooks). This one writes the request in one call and
parses the answer with httptools (the C parser uvicorn uses); it does no redirects, cookies, TLS
or proxies, none of which a local instance needs. A request is abandoned by closing its
connection (`cancel`), which is how stop and timeout cut an invocation short.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

import httptools


class InstanceUnreachable(ConnectionError):
    """The connection failed or closed before a whole answer arrived."""


class _Connection(asyncio.Protocol):
    def __init__(self, pool: Http1Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parser: httptools.HttpResponseParser | None = None
        self._answer: asyncio.Future[tuple[int, bytes]] | None = None
        self._body: list[bytes] = []
        self._size = 0
        self._limit = 0
        self._headers_done = False
        self._framed = False  # the answer says where it ends: a Content-Length or chunks
        self._on_chunk: Callable[[int, bytes], None] | None = None
        # Not a TimerHandle: uvloop's call_at for a time already past returns a plain Handle,
        # which has no `when()` (seen failing a paced read now and then), so the time is kept.
        self._resuming: asyncio.Handle | None = None
        self._resume_at = 0.0

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._parser is None:
            self.abort()  # nothing was asked: the peer is not speaking HTTP to us
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # A protocol switch nobody asked for: its 101 is the (failed) answer, and what
            # follows is not HTTP. Uncaught, asyncio logged it as a fatal error.
            self._fail(InstanceUnreachable("the instance switched protocols (HTTP 101)"))
            self.abort()
        except httptools.HttpParserError as err:
            # A callback's own exception is the cause; the parser's message only names the hook.
            cause = err.__context__ or err
            self._fail(
                InstanceUnreachable(f"malformed HTTP answer: {type(cause).__name__}: {cause}")
            )
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self._answer is not None and not self._answer.done():
            whole = not self._framed or self._on_chunk is not None
            if self._headers_done and whole and self._parser is not None:
                # An answer without a length ends when the connection does; a streamed one is
                # judged whole by its reader, from its own frames (`warm_pods.py`).
                self._finish(keep=False)
            elif self._headers_done:
                # One with a length that had not all arrived was cut short (an instance that
                # died writing it): taken whole, its first part was the task's result.
                self._fail(InstanceUnreachable("connection closed before the whole answer"))
            else:
                self._fail(InstanceUnreachable(str(exc) if exc else "connection closed"))

    # -- httptools callbacks -------------------------------------------------------------------

    def on_header(self, name: bytes, _value: bytes) -> None:
        if len(name) in (14, 17) and name.lower() in (b"content-length", b"transfer-encoding"):
            self._framed = True

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        if self._on_chunk is not None and self._parser is not None:
            self._on_chunk(self._parser.get_status_code(), body)
            return
        self._size += len(body)
        self._body.append(body)
        if self._size > self._limit:
            # Too large: answer with what is there (the caller refuses it) and drop the rest.
            self._finish(keep=False)
            self.abort()

    def on_message_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # An interim answer (100 Continue, 103 Early Hints): the final one follows it. Taken
            # for the answer, it made the task succeed with no result and left the final
            # answer to be read as the next task's.
            self._headers_done, self._framed, self._body, self._size = False, False, [], 0
            return
        self._finish(keep=self._parser.should_keep_alive())

    # -- use ----------------------------------------------------------------------------------

    def send(
        self, request: bytes, limit: int, on_chunk: Callable[[int, bytes], None] | None = None
    ) -> asyncio.Future[tuple[int, bytes]]:
        """The answer's status and body; with `on_chunk`, the body is handed to it (with the
        status) piece by piece as it arrives, unbounded, and the answer's body is empty."""
        assert self.transport is not None
        self._parser = httptools.HttpResponseParser(self)
        self._answer = asyncio.get_running_loop().create_future()
        self._body, self._size, self._limit, self._headers_done = [], 0, limit, False
        self._framed = False
        self._on_chunk = on_chunk
        self.transport.write(request)
        return self._answer

    def _finish(self, keep: bool) -> None:
        parser, answer = self._parser, self._answer
        self._parser = None
        if parser is None or answer is None or answer.done():
            return
        answer.set_result((parser.get_status_code(), b"".join(self._body)))
        if keep and not self.closed:
            self.pool.idle.append(self)
        else:
            self.abort()

    def _fail(self, err: Exception) -> None:
        self._parser = None
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(err)

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def pause(self, seconds: float) -> None:
        """Reads nothing more for `seconds` (or until a longer pause asked for ends): the
        peer's writes wait, and the process reading pays nothing meanwhile."""
        if self.transport is None or self.closed:
            return
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        if self._resuming is None or until > self._resume_at:
            if self._resuming is not None:
                self._resuming.cancel()
            self._resume_at = until
            self.transport.pause_reading()
            self._resuming = loop.call_at(until, self._resume)

    def _resume(self) -> None:
        self._resuming = None
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def cancel(self, answer: asyncio.Future[tuple[int, bytes]]) -> None:
        """Abandon the request that `answer` waits for, if it still does (the connection may
        already serve someone else's)."""
        if self._answer is answer and not answer.done():
            self.abort()


class Http1Pool:
    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self.idle: list[_Connection] = []
        self._host = f"{host}:{port}".encode()

    def forget(self, conn: _Connection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)

    async def connection(self) -> _Connection:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(lambda: _Connection(self), self.host, self.port)
        except OSError as err:
            raise InstanceUnreachable(str(err)) from err
        return conn

    def encode(self, method: bytes, path: str, headers: dict[str, str], body: bytes) -> bytes:
        lines = [method + b" " + path.encode() + b" HTTP/1.1", b"Host: " + self._host]
        lines += [f"{k}: {v}".encode() for k, v in headers.items()]
        lines.append(b"Content-Length: " + str(len(body)).encode())
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

    def close(self) -> None:
        for conn in self.idle:
            conn.abort()
        self.idle.clear()
