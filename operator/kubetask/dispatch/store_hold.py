"""No attempt starts while JetStream's storage is nearly full.

The gateway stops accepting submissions at 90% of `KUBETASK_STORE_MAX_BYTES`
(`gateway/store_room.py`), but a task's result is written after that: tasks whose results
outgrew their payloads took JetStream to its limit, where an attempt that had run could not
record its outcome, was handed back, and ran again once room came back (seen on a 64 MiB disk:
tasks Running for as long as the store stayed full). Past `HOLD` of the figure a dispatcher
starts nothing: the tasks wait Queued, saying why, and the attempts running keep the rest of
the room to record their outcomes. Room comes back as tasks are deleted or expire; the pulls
held then are woken.
"""

from __future__ import annotations

from collections.abc import Callable

from ..gateway.store_room import StoreRoom
from ..plane import DataPlane

HOLD = 0.95


class StoreHold:
    def __init__(self, plane: DataPlane) -> None:
        self.room = StoreRoom(plane, on_read=self._read)
        self._held: dict[Callable[[], None], None] = {}  # wake-ups of held pulls (ordered)

    def full(self) -> bool:
        return self.room.past(HOLD)

    def free(self, wake: Callable[[], None]) -> int | None:
        """None while there is room; else 0, and `wake` is called once there is."""
        if not self.full():
            return None
        self._held[wake] = None
        return 0

    def _read(self) -> None:
        if self._held and not self.full():
            held, self._held = self._held, {}
            for wake in held:
                wake()
