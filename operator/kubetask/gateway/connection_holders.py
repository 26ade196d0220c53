"""Who holds the gateway's connections, so that at its limit (`KUBETASK_MAX_CONNECTIONS`) the
one holding the most gives up an idle one to a newcomer.

The limit keeps the descriptors NATS and the index need from a flood of connections; refusing
every newcomer past it let one client keeping connections open (a request on each now and
then, within the keep-alive) shut every other tenant out, each refused with a 503. A newcomer
cannot be told apart before it sends anything, so the choice falls on those already in: an
idle connection (no request in progress, none read in part) of whoever holds the most. Closing
an idle keep-alive connection is what HTTP allows a server to do at any time; its client opens
another for its next request. Holders are told apart by their credential (the Authorization
header of their latest request); connections that have sent no request with one are held by
nobody, together.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Protocol


class Held(Protocol):
    @property
    def idle(self) -> bool: ...

    def give_up(self) -> None: ...


class Holders:
    def __init__(self) -> None:
        self._held: defaultdict[int | None, set[Held]] = defaultdict(set)
        self._holder: dict[Held, int | None] = {}

    def hold(self, connection: Held, credential: bytes | None) -> None:
        """The connection is `credential`'s now (its latest request came with it)."""
        holder = None if credential is None else hash(credential)
        if connection in self._holder and self._holder[connection] == holder:
            return
        self.drop(connection)
        self._holder[connection] = holder
        self._held[holder].add(connection)

    def drop(self, connection: Held) -> None:
        if connection not in self._holder:
            return
        holder = self._holder.pop(connection)
        held = self._held[holder]
        held.discard(connection)
        if not held:
            del self._held[holder]

    def make_room(self) -> bool:
        """Close an idle connection of whoever holds the most that have one; False when every
        connection is busy."""
        for held in sorted(self._held.values(), key=len, reverse=True):
            for connection in held:
                if connection.idle:
                    connection.give_up()
                    self.drop(connection)
                    return True
        return False
