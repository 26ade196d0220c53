"""An account's output read at its pace, and every account's within the dispatcher's total
(`dispatch/log_pacing.py`), on asyncio's real clock: the waits are the behaviour, so the
elapsed times are bounded from below only."""

from __future__ import annotations

import asyncio

from kubetask.dispatch.log_pacing import LogPacing

CHUNK = b"x" * 8191 + b"\n"  # 8 KiB, one line: 8,292 counted


async def _print(pacing: LogPacing, account: str, chunks: int) -> float:
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(chunks):
        await asyncio.sleep(pacing.delay(account, CHUNK))
    return loop.time() - started


async def test_many_accounts_printing_together_are_held_to_the_total() -> None:
    """Each account's pace alone let N accounts printing at once take N paces of the
    dispatcher's time: four accounts at a pace of 1 MiB/s each read 256 KiB in 0.03 s."""
    cost = LogPacing.cost(CHUNK) * 8 * 4
    pacing = LogPacing(rate=1 << 20, burst=4096, total=128 * 1024)
    taken = await asyncio.gather(*(_print(pacing, f"team-{i}", 8) for i in range(4)))
    assert max(taken) >= (cost - 4 * 4096) / (128 * 1024) * 0.9, taken
    alone = LogPacing(rate=1 << 20, burst=4096, total=128 * 1024)  # one account: up to the total
    assert await _print(alone, "team-a", 8) >= (cost / 4 - 4096) / (128 * 1024) * 0.9


async def test_an_account_within_its_burst_is_not_held_by_one_past_it() -> None:
    pacing = LogPacing(rate=32 * 1024, burst=16 * 1024, total=1 << 20)
    loud = asyncio.create_task(_print(pacing, "loud", 8))  # 64 KiB at 32 KiB/s: ~1.5 s
    await asyncio.sleep(0.1)
    await _print(pacing, "quiet", 1)
    assert not loud.done()  # the quiet one was read while the loud one waited
    assert await loud >= (LogPacing.cost(CHUNK) * 8 - 16 * 1024) / (32 * 1024) * 0.9
