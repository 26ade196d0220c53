"""How many connections one address may hold open to a dispatcher's runtime endpoint.

The endpoint (`runtime_server.py`) must be reachable from every function pod, and aiohttp
keeps a connection that never sends a request for as long as its peer likes (seen: 90 s and
counting, with nothing sent or half a request line). One tenant's pod opening connections
without end would have spent the dispatcher's memory and descriptors, and with them every other
tenant's attempts on it. A sidecar sends one request at a time; `PER_PEER` allows many more.
Past it, a new connection from that address is closed as soon as it is made, before anything
is read from it.

Pods have addresses of their own (no function pod runs on the host's network: `pod_template.py`),
so one pod cannot use up another's share. Behind a network plugin that masqueraded pod-to-pod
traffic, every pod of a node would share one address and this one limit.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable

PER_PEER = 32
log = logging.getLogger("kubetask.executors")


class PeerLimit:
    """A protocol factory for `loop.create_server`, around aiohttp's (`AppRunner.server`)."""

    def __init__(self, factory: Callable[[], asyncio.Protocol], per_peer: int = PER_PEER) -> None:
        self.factory = factory
        self.per_peer = per_peer
        self.held: Counter[str] = Counter()
        self._warned: set[str] = set()

    def __call__(self) -> asyncio.Protocol:
        return _Counted(self)

    def admit(self, peer: str) -> bool:
        if self.held[peer] >= self.per_peer:
            if peer not in self._warned:
                self._warned.add(peer)
                log.warning(
                    "%s holds %d connections to the runtime endpoint; closing its new ones",
                    peer,
                    self.per_peer,
                )
            return False
        self.held[peer] += 1
        return True

    def release(self, peer: str) -> None:
        self.held[peer] -= 1
        if self.held[peer] <= 0:
            del self.held[peer]
            self._warned.discard(peer)


class _Counted(asyncio.Protocol):
    def __init__(self, limit: PeerLimit) -> None:
        self.limit = limit
        self.peer: str | None = None
        self.inner: asyncio.Protocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        address = transport.get_extra_info("peername")
        peer = str(address[0]) if isinstance(address, tuple) else str(address)
        if not self.limit.admit(peer):
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
            self.limit.release(self.peer)
            self.inner.connection_lost(exc)
