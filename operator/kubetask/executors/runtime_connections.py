"""How many connections one address may hold open to a dispatcher's runtime endpoint
(`runtime_server.py`), which every function pod can reach (why: `peer_shares.py`). aiohttp kept
a connection that sent nothing, or half a request line, open for as long as its peer liked
(seen: still open after 90 s). A sidecar sends one request at a time; `PER_PEER` allows many
more.

Pods have addresses of their own (no function pod runs on the host's network: `pod_template.py`),
so one pod cannot use up another's share. Behind a network plugin that masqueraded pod-to-pod
traffic, every pod of a node would share one address and this one limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..peer_shares import PeerShares

PER_PEER = 32


class PeerLimit:
    """A protocol factory for `loop.create_server`, around aiohttp's (`AppRunner.server`)."""

    def __init__(self, factory: Callable[[], asyncio.Protocol], per_peer: int = PER_PEER) -> None:
        self.factory = factory
        self.shares = PeerShares(per_peer, "runtime endpoint")

    def __call__(self) -> asyncio.Protocol:
        return _Counted(self)


class _Counted(asyncio.Protocol):
    def __init__(self, limit: PeerLimit) -> None:
        self.limit = limit
        self.peer: str | None = None
        self.inner: asyncio.Protocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        address = transport.get_extra_info("peername")
        peer = str(address[0]) if isinstance(address, tuple) else str(address)
        if not self.limit.shares.admit(peer):
            transport.close()  # nothing read, nothing to write: it goes at once
            return
        self.peer = peer
        self.inner = self.limit.factory()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is not None and self.peer is not None:
            self.limit.shares.release(self.peer)
            self.inner.connection_lost(exc)
