"""Each account keeps at most its quota of log lines and of audit trail in the streams all
accounts share, so one tenant printing fast, or churning through tasks, cannot push another
tenant's history out (`gateway/history_quota.py`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
import pytest
from harness import Api, as_user, gateway_clients
from kubetask import names, usage_reports
from kubetask.gateway.history_quota import CHUNKS, Usage
from kubetask.plane import DataPlane
from kubetask.settings import Settings
from kubetask.task_events import SOURCING_WAIT
from kubetask.usage_reports import PER_REPORT, STORED_OVERHEAD, Tally


def test_usage_keeps_the_newest_lines_that_fit_and_forgets_what_expired() -> None:
    rng = random.Random(7)
    for quota in (64 << 10, 1 << 20, 100_000):
        usage = Usage(quota)
        reports: list[tuple[int, int]] = []  # what was written, oldest first
        purged = False
        for now in range(5000):
            lines = rng.randint(1, 20)
            reports.append((lines, lines * rng.randint(31, 400)))
            usage.add(*reports[-1], now=float(now))
            before = usage.bytes
            keep = usage.keep()
            # Purged once over by a chunk, and then to the quota.
            assert usage.bytes <= (quota if keep else quota + quota // CHUNKS), usage.bytes
            assert usage.messages == sum(c.messages for c in usage.chunks) >= 1
            assert usage.bytes == sum(c.bytes for c in usage.chunks)
            if keep is None:
                assert usage.bytes == before
                if not purged:
                    assert usage.messages == sum(r[0] for r in reports)
                continue
            purged = True
            assert keep == usage.messages
            # It purges no more than the excess, to within one line of the oldest chunk.
            assert usage.bytes >= quota - 400, (usage.bytes, before, quota)
            fits, newest = 0, 0
            for lines, nbytes in reversed(reports):
                if fits + nbytes > quota:
                    break
                fits, newest = fits + nbytes, newest + lines
            # Lines are counted exactly but for the oldest chunk's share, taken from its bytes.
            assert abs(keep - newest) <= (quota // CHUNKS + 20 * 400) // 31 + 20, (keep, newest)
        before = usage.messages
        usage.expire(before=1e9)
        assert usage.messages == usage.bytes == 0 and not usage.chunks and before > 0


def test_one_report_over_the_quota_keeps_its_share_that_fits() -> None:
    usage = Usage(100_000)
    usage.add(1000, 1_000_000, now=0.0)
    assert usage.keep() == 100 and usage.bytes == 100_000
    usage.add(1, 1000, now=1.0)
    assert usage.keep() is None  # over, but by less than a chunk (3,125 bytes)
    usage.add(3, 3000, now=1.5)
    assert usage.keep() == 100 and usage.bytes == 100_000  # four old lines for the new ones
    usage.add(1, 500_000, now=2.0)
    assert usage.keep() == 1 and usage.bytes == 100_000  # a line larger than the quota


def test_a_report_is_read_entry_by_entry() -> None:
    report = {
        "team-a": [3, 900],
        "Bad_Name": [1, 1],
        "team-b": [1, -5],
        "team-c": [2, True],
        "team-d": [0, 10],
        "team-e": [1],
    }
    assert usage_reports.parse(json.dumps(report).encode()) == {"team-a": (3, 900)}
    assert usage_reports.parse(b"[1, 2]") == {} and usage_reports.parse(b"\xff") == {}


async def test_a_tenant_printing_fast_keeps_its_quota_and_its_neighbours_keep_their_logs(
    make_api: Callable[..., Awaitable[Api]],
    settings: Settings,
    tokens_file: Path,
    nats_passwords: dict[str, str],
) -> None:
    """Without the quota all of the loud account's lines stay (until the stream's own cap,
    which then drops every account's oldest alike)."""
    loud, quiet = await make_api(), await make_api()
    quota = 64 << 10
    keeping = dataclasses.replace(
        as_user(settings, "gateway", nats_passwords), account_max_log_bytes=quota
    )
    printer = "import sys\nfor i in range(int(sys.argv[1])): print(f'{i:06d} ' + 'x' * 200, file=sys.stderr)"
    # 1,000 lines for the loud account's tasks; 100 (~33 KB, within the quota) for the quiet.
    for api, lines_each in ((loud, "1000"), (quiet, "100")):
        await api.function("printer", command=["python3", "-c", printer, lines_each])
    async with gateway_clients(keeping, tokens_file, loud) as (http,):
        limits = (await http.get("/v1/limits")).json()
        assert limits["maxLogBytes"] == quota, limits
        quiet_task = (await quiet.submit("printer"))["metadata"]["name"]
        await quiet.wait(quiet_task)
        loud_tasks = [(await loud.submit("printer"))["metadata"]["name"] for _ in range(3)]
        for task_id in loud_tasks:
            await loud.wait(task_id)

        async def lines(api: Api, task_id: str) -> list[str]:
            read = await api.http.get(f"/v1/tasks/{task_id}/logs")
            return [json.loads(line)["line"] for line in read.text.splitlines()]

        # ~330 bytes a line as stored: the quota holds ~200 of the 3,000 lines, the newest,
        # once the gateway heard the last report (within a second or two).
        for _ in range(100):
            kept = [await lines(loud, t) for t in loud_tasks]
            if sum(map(len, kept)) < 250 and not kept[0]:  # not a purge between two reads
                break
            await asyncio.sleep(0.1)
        assert 100 < sum(map(len, kept)) < 250, [len(k) for k in kept]
        said = [line[:6] for lines_of_one in kept for line in lines_of_one]
        assert "000999" in said and "000000" not in said, said
        said = [line for line in await lines(quiet, quiet_task) if line[:6].isdigit()]
        assert len(said) == 100 and said[0].startswith("000000 "), len(said)


async def test_a_tenant_churning_through_tasks_keeps_its_quota_of_audit_trail(
    make_api: Callable[..., Awaitable[Api]],
    settings: Settings,
    tokens_file: Path,
    nats_passwords: dict[str, str],
) -> None:
    """Every record write is a revision in the audit trail (`events.py`), from the gateway and
    the dispatcher alike; the busy account's oldest trails go, its neighbour's stays whole."""
    busy, quiet = await make_api(), await make_api()
    quota = 64 << 10
    keeping = dataclasses.replace(
        as_user(settings, "gateway", nats_passwords), account_max_events_bytes=quota
    )
    for api in (busy, quiet):
        await api.function("quick", command=["true"], maxConcurrency=8)
    async with gateway_clients(keeping, tokens_file, busy) as (http,):
        assert (await http.get("/v1/limits")).json()["maxEventsBytes"] == quota
        neighbour = (await quiet.submit("quick"))["metadata"]["name"]
        await quiet.wait(neighbour)
        # Three revisions each (created, running, succeeded): ~250 KB of trail.
        tasks = [(await busy.submit("quick"))["metadata"]["name"] for _ in range(100)]
        for task_id in tasks:
            await busy.wait(task_id)

        async def trail(api: Api, task_id: str) -> list[str]:
            events = await api.call("GET", f"/v1/tasks/{task_id}/events", 200)
            return [e["phase"] for e in events]

        # ~850 bytes a revision as stored: the quota holds ~75 of the 300, the newest, once the
        # gateway heard the last reports.
        for _ in range(50):
            kept = [await trail(busy, t) for t in tasks]
            if sum(map(len, kept)) < 110 and not kept[0]:  # not a purge between two reads
                break
            await asyncio.sleep(0.1)
        assert 40 < sum(map(len, kept)) < 110, [len(k) for k in kept]
        assert kept[0] == [] and kept[-1][-1] == "Succeeded", (kept[0], kept[-1])
        # A trail that lost the record's last revision is not waited on for it: KT_EVENTS took
        # that revision long ago (`task_events.read`).
        started = time.monotonic()
        assert await trail(busy, tasks[0]) == []
        assert time.monotonic() - started < SOURCING_WAIT, time.monotonic() - started
        assert await trail(quiet, neighbour) == ["Queued", "Running", "Succeeded"]


@pytest.mark.refused
async def test_only_platform_components_report_and_only_gateways_hear(
    nats_url: str, nats_passwords: dict[str, str]
) -> None:
    """A report makes a gateway purge an account's history: whoever could publish one could
    have another tenant's logs deleted, and whoever could hear them would learn every
    account's activity."""
    refused: list[str] = []

    async def connect(user: str) -> nats.NATS:
        async def error(err: Exception) -> None:
            refused.append(f"{user}: {err}")

        return await nats.connect(
            nats_url, user=user, password=nats_passwords[user], error_cb=error
        )

    gateway_nc, dispatcher_nc, destinations_nc = [
        await connect(user) for user in ("gateway", "dispatcher", "destinations")
    ]
    try:
        heard = await gateway_nc.subscribe(names.LOG_USAGE_SUBJECT)
        await dispatcher_nc.subscribe(names.LOG_USAGE_SUBJECT)
        await gateway_nc.flush()
        for nc, account in ((destinations_nc, "forged"), (dispatcher_nc, "reported")):
            await nc.publish(names.LOG_USAGE_SUBJECT, json.dumps({account: [1, 100]}).encode())
            await nc.flush()
        # The session's own components report too (their tasks' logs): only these two
        # accounts are looked at.
        reports = []
        until = time.monotonic() + 2
        with contextlib.suppress(nats.errors.TimeoutError):
            while (left := until - time.monotonic()) > 0:
                reports.append(usage_reports.parse((await heard.next_msg(timeout=left)).data))
        assert {"reported": (1, 100)} in reports, reports
        assert not any("forged" in r for r in reports), reports
        assert any(r.startswith("destinations:") and "publish" in r.lower() for r in refused)
        assert any(r.startswith("dispatcher:") and "subscri" in r.lower() for r in refused)
    finally:
        for nc in (gateway_nc, dispatcher_nc, destinations_nc):
            await nc.close()


async def test_a_report_of_many_accounts_is_split_to_fit_a_nats_message(plane: DataPlane) -> None:
    """10,000 accounts in one report (~600 KB) would come near NATS' 1 MB payload limit, and
    a refused publish is a report lost; more would always be."""
    subject = "kt.usage.test-split"
    heard = await plane.nc.subscribe(subject)
    tally = Tally(plane.nc, subject, every=3600)
    try:
        for i in range(2 * PER_REPORT + 5):
            tally.add(f"account-{i}", 100)
        tally.add("account-0", 50)
        await tally.report()
        got: dict[str, tuple[int, int]] = {}
        for _ in range(3):
            got.update(usage_reports.parse((await heard.next_msg(timeout=5)).data))
        assert len(got) == 2 * PER_REPORT + 5
        assert got["account-0"] == (2, 150 + 2 * STORED_OVERHEAD)
        await tally.report()  # nothing new: nothing said
        with contextlib.suppress(nats.errors.TimeoutError):
            assert (await heard.next_msg(timeout=0.3)) is None
    finally:
        await tally.close()
        await heard.unsubscribe()
