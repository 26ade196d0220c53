"""Mirror a KV bucket into memory: a background task applies every change through a callback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

# (key, value or None when deleted, revision)
Apply = Callable[[str, bytes | None, int], None]


class BucketMirror:
    def __init__(self, kv: KeyValue, apply: Apply) -> None:
        self.kv = kv
        self._apply = apply
        self._task: asyncio.Task[None] | None = None
        self.last_revision = 0
        self._advanced = asyncio.Event()

    async def start(self) -> None:
        """Return once every value present at start-up has been applied."""
        watcher = await self.kv.watchall()
        loaded: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def run() -> None:
            async for entry in watcher:
                if entry is None:
                    if not loaded.done():
                        loaded.set_result(None)
                    continue
                deleted = entry.operation in (KV_DEL, KV_PURGE)
                self._apply(entry.key, None if deleted else entry.value, entry.revision or 0)
                self.last_revision = max(self.last_revision, entry.revision or 0)
                self._advanced.set()
                self._advanced = asyncio.Event()
                if not loaded.done() and entry.delta == 0:
                    loaded.set_result(None)

        self._task = asyncio.create_task(run(), name=f"mirror-{self.kv._name}")
        self._watcher = watcher
        await loaded

    async def caught_up(self, timeout: float = 5.0) -> None:
        """Wait until every write acknowledged before this call is mirrored (read-your-writes)."""
        info = await self.kv._js.stream_info(self.kv._stream)
        target = info.state.last_seq
        deadline = asyncio.get_running_loop().time() + timeout
        while self.last_revision < target:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._advanced.wait(), remaining)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self._watcher.stop()  # type: ignore[no-untyped-call]
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
