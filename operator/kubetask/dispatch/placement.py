"""Where an attempt runs, once a Kubernetes executor learns it (a Job's pod when its sidecar
calls in, a warm pod when an invocation outlasts a moment): written onto the task's record, so
`kubetask login`, `describe` and `kubectl get tasks -o wide` name the pod while the attempt
runs. The write is the attempt's own: it is dropped if the task has moved on meanwhile."""

from __future__ import annotations

import asyncio
import contextlib

from ..executors import Placement
from ..models import ExecutorRef, TaskPhase
from ..states import IllegalTransition
from ..store import TaskGone, TaskRecord, TaskStore


class Placements:
    def __init__(self, store: TaskStore, dispatcher: str, host: str) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.host = host
        self._writing: set[asyncio.Task[None]] = set()

    def record(
        self, account: str, task_id: str, seq: int | None, attempt: int, where: Placement
    ) -> None:
        def place(r: TaskRecord) -> TaskRecord:
            st = r.task.status
            if r.phase is not TaskPhase.Running or r.claimSeq != seq or st.attempts != attempt:
                raise IllegalTransition(r.phase, r.phase)
            st.executor = ExecutorRef(
                backend="kubernetes",
                dispatcher=self.dispatcher,
                host=self.host,
                instance=where.pod,
                pod=where.pod,
                namespace=where.namespace,
                container=where.container,
                node=where.node,
            )
            return r

        async def write() -> None:
            with contextlib.suppress(IllegalTransition, TaskGone):
                await self.store.transition(account, task_id, place)

        task = asyncio.create_task(write())
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)

    async def close(self) -> None:
        if self._writing:
            await asyncio.wait(self._writing, timeout=5)
