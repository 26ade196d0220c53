"""Keeping the gateway's task index current, without making the gateway wait for it.

The gateway listens at once. The index resumes from the stream sequence it stored (everything
when it has none) in the background; until it has caught up, `/healthz` answers 503 with the
progress, so a supervisor or a load balancer sends queries elsewhere, while submissions and
reads by id — which never touch the index — are served. A query that arrives anyway waits for
the index to catch up (read-your-writes), as it always has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from .. import names
from ..plane import DataPlane
from ..watch import LazyMirror
from .index import TaskIndex

STREAM = f"KV_{names.TASKS_BUCKET}"
log = logging.getLogger("kubetask.gateway")


class Indexer:
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.index = TaskIndex(plane.settings.index_path or None)
        self.mirror: LazyMirror | None = None
        self.target = 0
        self._loading: asyncio.Task[None] | None = None

    async def start(self) -> None:
        info = await self.plane.js.stream_info(STREAM)
        self.target = info.state.last_seq
        applied = self.index.resume(str(info.created), self.target)
        self.mirror = LazyMirror(
            self.plane.rpc,
            names.TASKS_BUCKET,
            self.index.apply,
            applied=applied,
            commit=self.index.commit,
        )
        log.info(
            "task index resumed at sequence %d of %d (%s)",
            applied,
            self.target,
            self.plane.settings.index_path or "in memory",
        )
        self._loading = asyncio.create_task(self._load(self.mirror, applied), name="index-load")

    async def _load(self, mirror: LazyMirror, applied: int) -> None:
        began = time.monotonic()
        while True:  # NATS away for a moment must not leave the gateway without an index
            try:
                await mirror.start()
                break
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("indexing task records failed (%s); going on in a second", err)
                await asyncio.sleep(1)
        log.info(
            "task index caught up: sequences %d to %d read in %.1f s",
            applied + 1,
            mirror.last_revision,
            time.monotonic() - began,
        )

    @property
    def loaded(self) -> bool:
        return self._loading is not None and self._loading.done()

    def progress(self) -> str:
        done = self.mirror.last_revision if self.mirror is not None else 0
        return f"indexing task records: at sequence {done} of {self.target}"

    async def caught_up(self) -> None:
        """Every write acknowledged before this call is in the index."""
        assert self.mirror is not None and self._loading is not None
        await asyncio.shield(self._loading)
        await self.mirror.caught_up()

    async def stop(self) -> None:
        if self._loading is not None:
            self._loading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loading
        if self.mirror is not None:
            await self.mirror.stop()
        self.index.close()
