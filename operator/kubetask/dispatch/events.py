"""Record the terminal phase of every task in the audit stream (see `kubetask.events`)."""

from __future__ import annotations

from ..events import publish_terminal
from .policy import Policy, TaskContext


class TerminalEvents(Policy):
    async def on_terminal(self, ctx: TaskContext) -> None:
        await publish_terminal(ctx.plane.js, ctx.record)
