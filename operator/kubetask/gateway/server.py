"""How the gateway is served: uvicorn on uvloop and httptools, one response sent in one write.

uvicorn writes a response's status line and headers, then its body: two system calls and two
TCP segments for every 202 the gateway answers, and on loopback the sender also pays for the
receiving side of each. The writes a connection makes in one loop iteration are sent together.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from ..models import ErrorBody


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

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(cast(asyncio.Transport, _Coalesced(transport)))

    def send_400_response(self, msg: str) -> None:
        """A request the HTTP parser refused (a Content-Length that is not a number, a
        malformed request line) gets the one error body too, not uvicorn's plain text."""
        body = ErrorBody(error=f"malformed HTTP request: {msg}").model_dump_json(exclude_none=True)
        data = body.encode()
        head = [STATUS_LINE[400]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(data),
            b"connection: close\r\n\r\n",
            data,
        ]
        self.transport.write(b"".join(head))
        self.transport.close()


def config(app: ASGIApp, host: str, port: int, **extra: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http=CoalescingProtocol,
        # Nothing here uses the client's address, so X-Forwarded-* need no middleware.
        proxy_headers=False,
        access_log=False,
        log_level="warning",
        # Open `logs -f` streams would otherwise hold a shutdown for as long as they last.
        timeout_graceful_shutdown=1,
        **extra,
    )
