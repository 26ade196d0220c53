"""Each account's share of the history streams every account shares: the logs (KT_LOGS) and
the audit trail (KT_EVENTS). Past its quota (`KUBETASK_ACCOUNT_MAX_LOG_BYTES`,
`KUBETASK_ACCOUNT_MAX_EVENTS_BYTES`) an account's own oldest messages are purged.

Each stream is capped as a whole too (`KUBETASK_LOGS_MAX_BYTES`, `KUBETASK_EVENTS_MAX_BYTES`),
the oldest messages dropped first; alone, that let one tenant printing fast, or churning
through tasks, push every other tenant's history out. A stream per account was not wanted
(thousands of accounts would be thousands of streams), and JetStream has no limit per subject
prefix; but the writers know what they wrote, and report it per account every second
(`usage_reports.py`). Every gateway adds that up in a few chunks per account, oldest first
(`Usage`), and when an account's total passes its quota it purges the account's subjects
keeping only the newest messages that fit: one purge request, with a filter and `keep`.

What a gateway did not hear (written before it started) it does not count; since `keep` keeps
the newest messages, those go with the account's next purge, so an account holds at most twice
its quota. Every gateway purges alike: the purge of one that heard less keeps more, and changes
nothing after the purge of one that heard everything.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.msg import Msg

from .. import metrics, names, usage_reports
from ..plane import DataPlane

log = logging.getLogger("kubetask.history_quota")

# An account's usage is kept in chunks of at least this share of its quota, so what is purged
# is exact to about that share and a month of a quiet account's writes is a few dozen chunks.
CHUNKS = 32
# How often accounts that stopped writing are looked at again, to forget what expired.
FORGET_EVERY = 60.0


@dataclass
class Chunk:
    messages: int  # log lines, or revisions of records
    bytes: int
    newest: float  # when its newest message was heard


class Usage:
    """One account's messages in a stream, as heard, oldest first."""

    def __init__(self, quota: int) -> None:
        self.quota = quota
        self.chunks: deque[Chunk] = deque()
        self.messages = 0
        self.bytes = 0

    def add(self, messages: int, nbytes: int, now: float) -> None:
        last = self.chunks[-1] if self.chunks else None
        if last is not None and last.bytes < self.quota // CHUNKS:
            last.messages += messages
            last.bytes += nbytes
            last.newest = now
        else:
            self.chunks.append(Chunk(messages, nbytes, now))
        self.messages += messages
        self.bytes += nbytes

    def expire(self, before: float) -> None:
        """Forget chunks whose every message has outlived the account's retention."""
        while self.chunks and self.chunks[0].newest < before:
            self._drop_oldest()

    def keep(self) -> int | None:
        """The newest messages that fit in the quota, once the account is over it by a chunk
        (then they are all that is counted from now on); None before. A purge costs nats-server
        a walk over the account's subjects, so an account writing on at its quota is purged
        once per chunk it writes, not after every report."""
        if self.bytes <= self.quota + self.quota // CHUNKS:
            return None
        while self.bytes - self.quota >= self.chunks[0].bytes and len(self.chunks) > 1:
            self._drop_oldest()
        excess = self.bytes - self.quota
        if excess > 0:
            # Within a chunk messages are taken to be of one size: the share over the quota goes.
            oldest = self.chunks[0]
            gone = min(-(-oldest.messages * excess // oldest.bytes), oldest.messages - 1)
            freed = min(-(-oldest.bytes * gone // oldest.messages), oldest.bytes)
            freed = max(freed, excess if gone == oldest.messages - 1 else 0)
            oldest.messages -= gone
            oldest.bytes -= freed
            self.messages -= gone
            self.bytes -= freed
        return self.messages

    def _drop_oldest(self) -> None:
        oldest = self.chunks.popleft()
        self.messages -= oldest.messages
        self.bytes -= oldest.bytes


class HistoryQuota:
    def __init__(
        self,
        plane: DataPlane,
        stream: str,
        reports: str,
        subjects: Callable[[str], str],
        quota: int,
    ) -> None:
        self.plane = plane
        self.stream = stream
        self.reports = reports  # the subject writers report on
        self.subjects = subjects  # an account's subjects in the stream
        self.quota = quota
        self.usage: dict[str, Usage] = {}

    @classmethod
    def of_logs(cls, plane: DataPlane) -> HistoryQuota:
        quota = plane.settings.account_max_log_bytes
        return cls(plane, names.LOGS_STREAM, names.LOG_USAGE_SUBJECT, names.account_logs, quota)

    @classmethod
    def of_events(cls, plane: DataPlane) -> HistoryQuota:
        quota = plane.settings.account_max_events_bytes
        subjects = names.account_events
        return cls(plane, names.EVENTS_STREAM, names.EVENTS_USAGE_SUBJECT, subjects, quota)

    async def run(self) -> None:
        sub = await self.plane.nc.subscribe(self.reports)
        loop = asyncio.get_running_loop()
        forgot = loop.time()
        try:
            async for msg in sub.messages:
                await self.heard(msg, loop.time())
                if loop.time() - forgot > FORGET_EVERY:
                    forgot = loop.time()
                    self.forget(forgot)
        finally:
            await sub.unsubscribe()

    async def heard(self, msg: Msg, now: float) -> None:
        for account, (count, nbytes) in usage_reports.parse(msg.data).items():
            usage = self.usage.get(account)
            if usage is None:
                usage = self.usage[account] = Usage(self.quota)
            usage.add(count, nbytes, now)
            usage.expire(now - self.plane.store.retention.seconds(account))
            keep = usage.keep()
            if keep is not None:
                await self._purge(account, keep)

    def forget(self, now: float) -> None:
        for account in list(self.usage):
            usage = self.usage[account]
            usage.expire(now - self.plane.store.retention.seconds(account))
            if not usage.chunks:
                del self.usage[account]

    async def _purge(self, account: str, keep: int) -> None:
        try:
            await self.plane.js.purge_stream(self.stream, subject=self.subjects(account), keep=keep)
        except Exception as err:  # the next report tries again
            log.warning("could not purge account %s's oldest in %s: %s", account, self.stream, err)
            return
        metrics.HISTORY_QUOTA_PURGES.labels(account, self.stream).inc()
