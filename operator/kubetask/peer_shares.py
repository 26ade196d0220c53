"""How many connections one address may hold open to an endpoint every tenant can reach: a
dispatcher's runtime endpoint (`executors/runtime_connections.py`) and its metrics port
(`metrics.py`). Either kept a connection that sent nothing for as long as its peer liked, so
one tenant's code opening connections without end would have spent the dispatcher's memory,
descriptors or threads, and every other tenant's attempts on it with them. Past its share, an
address's new connection is closed before anything is read from it.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

log = logging.getLogger("kubetask")


class PeerShares:
    def __init__(self, per_peer: int, endpoint: str) -> None:
        self.per_peer = per_peer
        self.endpoint = endpoint
        self.held: Counter[str] = Counter()
        self._warned: set[str] = set()
        # The metrics server admits in its accepting thread and releases in each request's.
        self._lock = threading.Lock()

    def admit(self, peer: str) -> bool:
        with self._lock:
            if self.held[peer] >= self.per_peer:
                warn = peer not in self._warned
                self._warned.add(peer)
            else:
                self.held[peer] += 1
                return True
        if warn:
            log.warning(
                "%s holds %d connections to the %s; closing its new ones",
                peer,
                self.per_peer,
                self.endpoint,
            )
        return False

    def release(self, peer: str) -> None:
        with self._lock:
            self.held[peer] -= 1
            if self.held[peer] <= 0:
                del self.held[peer]
                self._warned.discard(peer)
