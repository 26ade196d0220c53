"""Which dispatcher consumes which partition: leases in a KV bucket whose entries expire.

A function with one queue is consumed by every dispatcher (JetStream spreads its messages). A
partitioned function's partitions are spread instead: each is leased to one dispatcher, so N
partitions keep up to N dispatchers busy without all of them pulling from all of them.

- **Members**: every dispatcher writes `m.<id>` every `ttl / 3`; an entry not renewed within
  `ttl` expires (the bucket's max age), so a dispatcher killed with SIGKILL leaves within `ttl`.
- **Owner**: the live members are put in an order of the function's own (a hash of function
  and member), and partition i goes to the (i mod members)-th: every dispatcher computes the
  same assignment from the same members, each gets an even share of every function's
  partitions, and different functions start their round at different members. (Highest-rank
  hashing per partition moved fewer partitions on a join, but left one of two dispatchers
  with all four partitions one time in eight.)
- **Lease**: the owner creates `p.<account>.<function>.<n>` with compare-and-set and renews it
  with its revision; it releases a partition it no longer owns (a member joined), and the new
  owner takes it at its next round. A lease that fails to renew is dropped at once.

Leases spread work; they are not what keeps a task from running twice (the claim on the task's
record is): two dispatchers briefly consuming one partition during a handover is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import re
import time
from collections.abc import Callable

from nats.js.errors import APIError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from .. import metrics
from ..cancellation import cancel_and_wait
from ..models import TaskFunction
from ..registry import Registry
from ..watch import BucketMirror

log = logging.getLogger("kubetask.dispatcher")


def member_key(dispatcher_id: str) -> str:
    return "m." + re.sub(r"[^A-Za-z0-9_-]", "-", dispatcher_id)


def partition_key(fn: TaskFunction, index: int) -> str:
    return f"p.{fn.account}.{fn.name}.{index}"


def rank(partition: str, member: str) -> bytes:
    return hashlib.blake2b(f"{partition}|{member}".encode(), digest_size=8).digest()


class Leases:
    def __init__(
        self,
        kv: KeyValue,
        registry: Registry,
        dispatcher_id: str,
        ttl: float,
        changed: Callable[[], None],
        members_changed: Callable[[], None] = lambda: None,
    ) -> None:
        """`changed`: the partitions held here changed; `members_changed`: a dispatcher joined
        or left, as seen at a round (what is split over the members is split anew)."""
        self.kv = kv
        self.registry = registry
        self.me = member_key(dispatcher_id)
        self.ttl = ttl
        self.changed = changed
        self.members_changed = members_changed
        self._members_seen: list[str] = []
        self.seen: dict[str, float] = {}  # key -> when it was last written, as we saw it
        self.held: dict[str, int] = {}  # partition key -> revision of our lease
        self._mirror = BucketMirror(kv, self._apply)
        self._task: asyncio.Task[None] | None = None

    def _apply(self, key: str, value: bytes | None, revision: int) -> None:
        """Expiry is not announced (entries just age out of the stream), so a member counts as
        alive while we have seen it written within `ttl`."""
        if value is None:
            self.seen.pop(key, None)
        else:
            self.seen[key] = time.monotonic()

    def holds(self, fn: TaskFunction, index: int) -> bool:
        return partition_key(fn, index) in self.held

    async def start(self) -> None:
        await self.kv.put(self.me, b"")
        await self._mirror.start()
        self._task = asyncio.create_task(self._run(), name="leases")

    async def _run(self) -> None:
        while True:
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # NATS away: leases lapse; others take over meanwhile
                log.warning("renewing partition leases failed: %s", err)
            await asyncio.sleep(self.ttl / 3)

    def members(self) -> list[str]:
        """The dispatchers alive now (their member keys, sorted), this one included."""
        alive = time.monotonic() - self.ttl
        return sorted(
            {k for k, at in self.seen.items() if k[:2] == "m." and at > alive} | {self.me}
        )

    def dispatchers(self) -> int:
        """The dispatchers alive now, this one included."""
        return len(self.members())

    def holds_any_of(self, account: str) -> bool:
        """Whether this dispatcher leases a partition of one of `account`'s functions."""
        prefix = f"p.{account}."
        return any(key.startswith(prefix) for key in self.held)

    def wanted(self) -> set[str]:
        """The partitions this dispatcher should hold, given the members alive now."""
        members = self.members()
        mine = set()
        for fn in self.registry.partitioned():
            order = sorted(members, key=functools.partial(rank, f"{fn.account}.{fn.name}"))
            for index in range(fn.spec.partitions):
                if order[index % len(order)] == self.me:
                    mine.add(partition_key(fn, index))
        return mine

    async def round(self) -> None:
        await self.kv.put(self.me, b"")
        members = self.members()
        if members != self._members_seen:
            self._members_seen = members
            self.members_changed()
        wanted = self.wanted()
        before = set(self.held)
        for key in sorted(before - wanted):
            revision = self.held.pop(key)
            with contextlib.suppress(APIError):
                await self.kv.delete(key, last=revision)
        for key in sorted(before & wanted):
            try:
                self.held[key] = await self.kv.update(key, self.me.encode(), last=self.held[key])
            except (KeyWrongLastSequenceError, APIError):
                del self.held[key]  # expired and taken, or deleted: not ours any more
        for key in sorted(wanted - before):
            with contextlib.suppress(KeyWrongLastSequenceError, APIError):
                self.held[key] = await self.kv.create(key, self.me.encode())
        metrics.LEASES_HELD.set(len(self.held))
        if set(self.held) != before:
            log.info("partitions held: %s", ", ".join(sorted(self.held)) or "none")
            self.changed()

    async def close(self) -> None:
        """Leave: hand every partition back at once instead of letting the leases lapse."""
        await cancel_and_wait(self._task)
        for key, revision in list(self.held.items()):
            with contextlib.suppress(Exception):
                await self.kv.delete(key, last=revision)
        self.held.clear()
        with contextlib.suppress(Exception):
            await self.kv.delete(self.me)
        await self._mirror.stop()
