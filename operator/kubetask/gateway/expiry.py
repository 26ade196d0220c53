"""Records that JetStream expired leave the gateway's index.

A record is kept `KUBETASK_RETENTION_SECONDS` after its last write (the task bucket's max age),
or its account's shorter retention (`history.py`), but an expiry is not announced: the message
just ages out of the stream, and the index, fed by changes, would list and count the task for
ever. So the index is checked every so often for rows whose last write is older than the
retention; each such row is looked up, dropped if the record is gone, and left alone (until a
retention's tenth later) if it is still there — a pause or a resume writes a record without a
stage timestamp, so a row can look older than it is.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta

from ..plane import DataPlane
from .indexing import Indexer


class Expiry:
    def __init__(self, plane: DataPlane, indexer: Indexer) -> None:
        self.plane = plane
        self.indexer = indexer
        self.retention = plane.store.retention
        self._present_until: dict[tuple[str, str], datetime] = {}

    async def once(self) -> int:
        """Drop the rows of records that expired; returns how many."""
        now = datetime.now(UTC)
        dropped = 0
        index = self.indexer.index
        cutoff = now - timedelta(seconds=self.retention.shortest())
        for row in await self.indexer.run(lambda: list(index.written_before(cutoff))):
            key = (row.account, row.id)
            kept = timedelta(seconds=self.retention.seconds(row.account))
            written = row.written()
            if written is None or written >= now - kept or self._present_until.get(key, now) > now:
                continue
            if await self.plane.store.get(row.account, row.id) is None:
                await self.indexer.run(index.drop, row.account, row.id)
                self._present_until.pop(key, None)
                dropped += 1
            else:
                self._present_until[key] = now + kept / 10
        await self.indexer.run(index.commit)
        return dropped

    async def forever(self) -> None:
        interval = min(60.0, max(self.retention.shortest() / 4, 0.5))
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                await self.once()
