"""Each account's share of the task bucket: `KUBETASK_ACCOUNT_MAX_RECORD_BYTES` of task records
as stored (payloads and results in them), past which its submissions are refused with `429`.

Records are kept for the retention (`KUBETASK_RETENTION_SECONDS`, a week by default) after a
task's last change, in the one task bucket every account writes to. Nothing bounded what one
account kept there: submitting as fast as its rate allowed, with the largest payloads and
results, it could fill the JetStream store, and then every account's submissions and every
task's progress failed. Records are state, not history, so unlike the logs
(`history_quota.py`) the oldest are not dropped to make room; they leave when their tasks are
deleted (`DELETE /v1/tasks/{id}`) or expire.

Counted by the gateway's task index: SQLite triggers keep each account's records and bytes as
records are applied (`index.py`), read every second (`indexing.py`), so a check costs a dict
lookup. The index applies records about a second after they are written, so the records this
gateway created in the last `LAG` seconds are added to the count: without them an account
flooding at 20 submissions a second went to twice its quota before the count caught up (and
at the gateway's full speed it would have gone far past). Counted twice for a moment rather
than not at all, so an account near its quota may be refused a little early. Until the index
has caught up the counts are partial, and nothing is refused on them.

The operator holds kubectl-applied Tasks to the same quota with the counts the gateways say
(`record_reports.py`).
"""

from __future__ import annotations

import time
from collections import deque

from ..record_reports import Counts
from .throttle import Throttled

# A record leaves when deleted or expired, neither of which a retry brings sooner.
RETRY_AFTER = 60


# Seconds from a record's write to its being in the count: the index's pass and the count's.
LAG = 3.0


class _Recent:
    """Records created lately and their bytes, with their sum kept as they come and go."""

    def __init__(self) -> None:
        self.created: deque[tuple[float, int]] = deque()
        self.bytes = 0

    def add(self, at: float, nbytes: int) -> None:
        self.created.append((at, nbytes))
        self.bytes += nbytes

    def since(self, at: float) -> int:
        while self.created and self.created[0][0] < at:
            self.bytes -= self.created.popleft()[1]
        return self.bytes


class RecordQuota:
    def __init__(
        self, limit: int, counts: Counts, lag: float = LAG, unlisted_bytes: int = 0
    ) -> None:
        """`unlisted_bytes`: what an account the counts do not list may hold. A gateway's
        index lists every account (0); the operator hears only the accounts near their quota
        (`record_reports.NEAR`), so an account it does not hear of may hold up to that."""
        self.limit = limit
        self.counts = counts
        self.lag = lag
        self.unlisted_bytes = unlisted_bytes
        # Records created lately, per account: an account's entry goes at its next submission
        # once they are counted, so there is at most one per account.
        self._recent: dict[str, _Recent] = {}

    def held(self, account: str) -> tuple[int, int]:
        """The account's records and their bytes, as of the last count."""
        return self.counts.usage.get(account, (0, 0))

    def created(self, account: str, nbytes: int) -> None:
        recent = self._recent.get(account)
        if recent is None:
            recent = self._recent[account] = _Recent()
        recent.add(time.monotonic(), nbytes)

    def _lately(self, account: str) -> tuple[int, int]:
        """Records created in the last `lag` seconds and their bytes."""
        recent = self._recent.get(account)
        if recent is None:
            return 0, 0
        nbytes = recent.since(time.monotonic() - self.lag)
        if not recent.created:
            del self._recent[account]
        return len(recent.created), nbytes

    def admit(self, account: str) -> None:
        """Raises Throttled when the account's records take its quota."""
        said = self.counts.usage.get(account)
        counted, counted_bytes = said or (0, self.unlisted_bytes)
        lately, lately_bytes = self._lately(account)
        records, nbytes = counted + lately, counted_bytes + lately_bytes
        if nbytes < self.limit or not self.counts.loaded:
            return
        if said is None and self.unlisted_bytes:
            held = (
                f"has created {lately} task records taking {lately_bytes} bytes in the last "
                f"{self.lag:g} s, and may hold up to {self.unlisted_bytes} bytes of records "
                "besides: together"
            )
        else:
            held = f"keeps about {records} task records taking {nbytes} bytes,"
        raise Throttled(
            f"account {account!r} {held} its quota (KUBETASK_ACCOUNT_MAX_RECORD_BYTES="
            f"{self.limit}); delete finished tasks (DELETE /v1/tasks/{{id}}, or kubectl delete "
            "task) or wait for them to expire",
            RETRY_AFTER,
            "records",
        )
