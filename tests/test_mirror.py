"""The task index's mirror reads the bucket lazily, in batches, and ends up equal to it."""

from __future__ import annotations

from kubetask.jetstream import connect
from kubetask.rpc import Requester
from kubetask.settings import Settings
from kubetask.watch import LazyMirror
from nats.js.api import KeyValueConfig


async def test_lazy_mirror_applies_latest_values_and_deletions_across_batches(
    settings: Settings,
) -> None:
    nc = await connect(settings, "mirror-test")
    js = nc.jetstream()
    kv = await js.create_key_value(KeyValueConfig(bucket="mirrortest", history=1, direct=True))
    rpc = Requester(nc, timeout=5)
    await rpc.start()
    seen: dict[str, bytes] = {}
    applied: list[str] = []

    def apply(key: str, value: bytes | None, _revision: int) -> None:
        applied.append(key)
        if value is None:
            seen.pop(key, None)
        else:
            seen[key] = value

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
        await mirror.stop()
    finally:
        await js.delete_key_value("mirrortest")
        await rpc.close()
        await nc.close()
