"""The task index's mirror reads the bucket lazily, in batches, and ends up equal to it; the
small buckets' mirrors follow every change, and find their way back when their consumer is
lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from kubetask.jetstream import connect
from kubetask.rpc import Requester
from kubetask.settings import Settings
from kubetask.watch import BucketMirror, LazyMirror
from nats.js.api import ConsumerInfo, KeyValueConfig
from nats.js.client import JetStreamContext


class Mirrored:
    """What a mirror applied: each key's value now, and the keys in the order applied."""

    def __init__(self) -> None:
        self.seen: dict[str, bytes] = {}
        self.applied: list[str] = []

    def apply(self, key: str, value: bytes | None, _revision: int) -> None:
        self.applied.append(key)
        if value is None:
            self.seen.pop(key, None)
        else:
            self.seen[key] = value


async def _consumers(js: JetStreamContext, stream: str) -> AsyncIterator[ConsumerInfo]:
    for info in await js.consumers_info(stream):
        yield info


async def test_lazy_mirror_applies_latest_values_and_deletions_across_batches(
    settings: Settings,
) -> None:
    nc = await connect(settings, "mirror-test")
    js = nc.jetstream()
    kv = await js.create_key_value(KeyValueConfig(bucket="mirrortest", history=1, direct=True))
    rpc = Requester(nc, timeout=5)
    await rpc.start()
    mirrored = Mirrored()
    seen, applied, apply = mirrored.seen, mirrored.applied, mirrored.apply

    try:
        for i in range(7):
            await kv.put(f"acct.t{i}", b"v1")
        mirror = LazyMirror(rpc, "mirrortest", apply, interval=3600, batch=2)
        await mirror.start()  # the start-up load crosses batches (the second one larger)
        assert seen == {f"acct.t{i}": b"v1" for i in range(7)}

        applied.clear()
        for _ in range(3):  # three writes of one key: only the last is still stored
            await kv.put("acct.t1", b"v2")
        await kv.delete("acct.t3")
        await kv.put("acct.t9", b"new")
        await mirror.caught_up()
        assert sorted(applied) == ["acct.t1", "acct.t3", "acct.t9"]
        assert seen == {f"acct.t{i}": b"v1" for i in (0, 2, 4, 5, 6)} | {
            "acct.t1": b"v2",
            "acct.t9": b"new",
        }
        applied.clear()
        await mirror.caught_up()  # nothing new: nothing applied
        assert applied == []

        # Its consumer deleted behind its back (as a nats-server restart loses it): the next
        # catch-up reads on from where it was, nothing skipped, nothing applied twice.
        assert mirror._consumer is not None
        await js.delete_consumer("KV_mirrortest", mirror._consumer)
        await kv.put("acct.t4", b"v2")
        await kv.put("acct.t10", b"new")
        await mirror.caught_up()
        assert applied == ["acct.t4", "acct.t10"]
        assert seen["acct.t4"] == b"v2" and seen["acct.t10"] == b"new"

        await mirror.stop()
        names = [c.name async for c in _consumers(js, "KV_mirrortest")]
        assert names == [], "a stopped mirror leaves no consumer behind"
    finally:
        await js.delete_key_value("mirrortest")
        await rpc.close()
        await nc.close()


async def test_lazy_mirror_ends_when_the_last_messages_are_gone_before_it_reads_them(
    settings: Settings,
) -> None:
    """A task's retention can run out before the mirror reads its last write: the stream's
    last sequence then names no message, and a catch-up must still end, at that sequence."""
    nc = await connect(settings, "mirror-test")
    js = nc.jetstream()
    kv = await js.create_key_value(KeyValueConfig(bucket="mirrorttl", ttl=0.5, direct=True))
    rpc = Requester(nc, timeout=5)
    await rpc.start()
    applied: list[str] = []
    mirror = LazyMirror(rpc, "mirrorttl", lambda key, _v, _r: applied.append(key), interval=3600)
    try:
        await mirror.start()
        seq = 0
        for i in range(3):
            seq = await kv.put(f"acct.t{i}", b"short-lived")
        while (await js.stream_info("KV_mirrorttl")).state.messages:
            await asyncio.sleep(0.1)
        await mirror.caught_up()
        assert applied == [] and mirror.last_revision == seq
        await kv.put("acct.later", b"kept")
        await mirror.caught_up()
        assert applied == ["acct.later"]
    finally:
        await mirror.stop()
        await js.delete_key_value("mirrorttl")
        await rpc.close()
        await nc.close()


async def test_a_followed_bucket_loads_whole_follows_changes_and_survives_losing_its_consumer(
    settings: Settings,
) -> None:
    """The start-up load is larger than nats-server sends without a flow-control answer (it
    stalls unless each is answered); then writes and deletes arrive as they happen; a consumer
    deleted behind the mirror's back (as a nats-server restart loses it) is replaced once its
    heartbeats stop, reading on from the last revision applied, nothing skipped or applied
    twice."""
    nc = await connect(settings, "mirror-test")
    js = nc.jetstream()
    kv = await js.create_key_value(KeyValueConfig(bucket="followtest", history=1))
    mirrored = Mirrored()
    seen, applied, apply = mirrored.seen, mirrored.applied, mirrored.apply

    big = b"x" * 60_000
    mirror = BucketMirror(kv, apply, heartbeat=0.5)
    try:
        await asyncio.gather(*(kv.put(f"acct.k{i}", big) for i in range(1_200)))  # 72 MB
        await kv.put("acct.k0", b"latest")
        await asyncio.wait_for(mirror.start(), 60)
        assert len(seen) == 1_200 and seen["acct.k0"] == b"latest"
        assert len(applied) == 1_200, "each key once: its latest value"

        applied.clear()
        await kv.put("acct.k1", b"v2")
        await kv.delete("acct.k2")
        await mirror.caught_up()
        assert applied == ["acct.k1", "acct.k2"] and "acct.k2" not in seen

        applied.clear()
        await js.delete_consumer("KV_followtest", mirror._consumer)
        await kv.put("acct.k3", b"while-lost")
        await kv.put("acct.new", b"new")
        await mirror.caught_up(timeout=10)
        assert applied == ["acct.k3", "acct.new"], applied
        assert seen["acct.k3"] == b"while-lost" and seen["acct.new"] == b"new"

        await mirror.stop()
        names = [c.name async for c in _consumers(js, "KV_followtest")]
        assert names == [], "a stopped mirror leaves no consumer behind"
    finally:
        await mirror.stop()
        await js.delete_key_value("followtest")
        await nc.close()
