"""Runtime settings shared by the gateway and dispatchers, read from KUBETASK_* variables."""

from __future__ import annotations

import math
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from . import per_account
from .fairness import FairnessSettings, parse_weights
from .known_settings import note
from .networks import DEFAULT_DENIED, Network, parse_networks


def env_str(name: str, default: str, takes: str = "text") -> str:
    note(name, default, takes)
    return os.environ.get(name) or default


N = TypeVar("N", int, float)


def env_float(
    name: str, default: float, low: float | None = None, high: float | None = None
) -> float:
    """`name` as a number, held to [low, high]: a setting out of range is refused at start,
    not found out later as a hot loop, a stall or a queue that never drains."""
    return _env_number(name, default, float, low, high)


def env_int(name: str, default: int, low: int | None = None, high: int | None = None) -> int:
    return _env_number(name, default, int, low, high)


def _env_number(name: str, default: N, parse: type[N], low: N | None, high: N | None) -> N:
    whole = parse is int
    span = f"from {low} to {high}" if low is not None and high is not None else ""
    span = span or (f"at least {low}" if low is not None else f"at most {high}" if high else "")
    note(name, default, ", ".join(filter(None, ("a whole number" if whole else "a number", span))))
    kind = "a whole number" if whole else "a finite number"
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected {kind}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name}={raw!r}: expected {kind}")
    if low is not None and value < low:
        raise ValueError(f"{name}={raw!r}: must be at least {low}")
    if high is not None and value > high:
        raise ValueError(f"{name}={raw!r}: must be at most {high}")
    return value


def share_of(raw: str, whole: int) -> int | None:
    """`raw` read as a share of `whole` such as `50%`; None where it is not written as one.
    Raises ValueError for a share outside (0, 100]."""
    if not raw.endswith("%"):
        return None
    share = float(raw[:-1])
    if not 0 < share <= 100:
        raise ValueError(raw)
    return int(whole * share / 100)


def env_count_or_share(name: str, default: str, what: str, whole: Callable[[], int]) -> int:
    """`name` as a count of `what`, a share of the host's `whole()` such as `75%` (at least
    one), or 0 for no cap."""
    note(name, default, f"a number of {what}, a share such as 75% of the host's, or 0")
    raw = (os.environ.get(name) or default).strip()
    try:
        shared = share_of(raw, whole())
        if shared is not None:
            return max(1, shared)
        value = int(raw)
        if value < 0:
            raise ValueError
        return value
    except ValueError:
        raise ValueError(
            f"{name}={raw!r}: expected a number of {what}, a share such as 75%, or 0"
        ) from None


def env_switch(name: str, default: bool) -> bool:
    note(name, default, "on or off")
    raw = (os.environ.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw not in ("on", "off", "true", "false", "1", "0"):
        raise ValueError(f"{name}={raw!r}: expected on or off")
    return raw in ("on", "true", "1")


EXECUTORS = ("local", "kubernetes")
NETWORKS = "CIDRs separated by commas, or none"
WEIGHTS = "account=<weight>,... (a number each)"
# The least bytes a history stream (logs, audit trail) may be held to.
HISTORY_MIN = 1 << 20


def env_choice(name: str, choices: tuple[str, ...]) -> str:
    """One of `choices`, the first by default."""
    note(name, choices[0], "one of " + ", ".join(choices))
    raw = (os.environ.get(name) or choices[0]).strip().lower()
    if raw not in choices:
        raise ValueError(f"{name}={raw!r}: expected one of {', '.join(choices)}")
    return raw


def env_secret(name: str) -> str | None:
    """A secret from `NAME`, or from the file named by `NAME_FILE` (a mounted Secret)."""
    note(name, None, f"a secret, or the file holding it named by {name}_FILE", secret=True)
    path = os.environ.get(name + "_FILE")
    if path:
        with open(path) as f:
            return f.read().strip()
    return os.environ.get(name) or None


def _open_file_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


@dataclass(frozen=True)
class Settings:
    nats_url: str = field(
        default_factory=lambda: env_str("KUBETASK_NATS_URL", "nats://127.0.0.1:4222", "a NATS URL")
    )
    # This component's NATS user (`nats_auth.PERMISSIONS`); none when NATS has no users.
    nats_user: str | None = field(
        default_factory=lambda: env_str("KUBETASK_NATS_USER", "", "a NATS user") or None
    )
    nats_password: str | None = field(
        default_factory=lambda: env_secret("KUBETASK_NATS_PASSWORD"), repr=False
    )
    # The user subject destinations are published as (dispatchers only): it may publish nowhere
    # but the accounts' `out.` namespaces.
    destinations_user: str | None = field(
        default_factory=lambda: (
            env_str("KUBETASK_DESTINATIONS_NATS_USER", "", "a NATS user") or None
        )
    )
    destinations_password: str | None = field(
        default_factory=lambda: env_secret("KUBETASK_DESTINATIONS_NATS_PASSWORD"), repr=False
    )
    # Reads every series of every component's /metrics (`metrics.py`); without it a dispatcher
    # shows only the platform's series, and the gateway each account its own.
    metrics_token: str | None = field(
        default_factory=lambda: env_secret("KUBETASK_METRICS_TOKEN"), repr=False
    )
    # How long a claimed message may go without a heartbeat before JetStream hands it to another
    # dispatcher; dispatchers heartbeat at a third of it, so this bounds crash recovery time.
    ack_wait: float = field(default_factory=lambda: env_float("KUBETASK_ACK_WAIT", 30.0, 1, 3600))
    # The gateway's task index (`gateway/index.py`): a SQLite file kept across restarts, so a
    # restart replays only what changed; empty, it is kept in memory and rebuilt at each start.
    index_path: str = field(
        default_factory=lambda: env_str("KUBETASK_INDEX_PATH", "", "a file; empty: in memory")
    )
    # Task records, logs and events are kept this long (must exceed the longest task + queue age).
    retention_seconds: float = field(
        default_factory=lambda: env_float("KUBETASK_RETENTION_SECONDS", 7 * 86400, 1)
    )
    # Accounts that keep their history for less (`history.py`): `account=seconds,...`.
    account_retention: dict[str, float] = field(
        default_factory=lambda: per_account.from_env(
            "KUBETASK_ACCOUNT_RETENTION", 10 * 365 * 86400, "seconds"
        )
    )
    # Records, audit trail and logs stored S2-compressed.
    history_compression: bool = field(
        default_factory=lambda: env_switch("KUBETASK_HISTORY_COMPRESSION", True)
    )
    # How long an HTTP request may take to reach the gateway whole, headers and body, from its
    # first byte; past it the gateway answers 408 and closes (`gateway/server.py`).
    request_timeout: float = field(
        default_factory=lambda: env_float("KUBETASK_REQUEST_TIMEOUT", 30.0, 1, 3600)
    )
    # Connections a gateway keeps open at once; past them a new one is answered 503 and closed,
    # before the process runs out of file descriptors for NATS and its index. The default is
    # 10,000, or half the process's open-file limit where that is lower.
    max_connections: int = field(
        default_factory=lambda: env_int(
            "KUBETASK_MAX_CONNECTIONS", min(10_000, _open_file_limit() // 2), 1, 1_000_000
        )
    )
    # Bytes a request's line and headers may take; past them the gateway answers 431 and
    # closes. The HTTP parser holds a header whole until it ends, so without a bound one client
    # could send a header of gigabytes into the gateway's memory (`gateway/server.py`).
    max_header_bytes: int = field(
        default_factory=lambda: env_int("KUBETASK_MAX_HEADER_BYTES", 64 * 1024, 1024, 1 << 24)
    )
    max_payload_bytes: int = field(
        default_factory=lambda: env_int("KUBETASK_MAX_PAYLOAD", 256 * 1024, 1)
    )
    max_result_bytes: int = field(
        default_factory=lambda: env_int("KUBETASK_MAX_RESULT", 256 * 1024, 1)
    )
    # A page of `GET /v1/tasks` ends before the record that would take it past this (`index.py`).
    page_max_bytes: int = field(
        default_factory=lambda: env_int("KUBETASK_PAGE_MAX_BYTES", 4 * 1024 * 1024, 1)
    )
    # A queue (stream) holding this many tasks refuses new ones (429) rather than drop old ones.
    queue_max_msgs: int = field(
        default_factory=lambda: env_int("KUBETASK_QUEUE_MAX_MSGS", 1_000_000, 1)
    )
    # Back-pressure per account (`gateway/throttle.py`); 0 switches a limit off. Tasks one
    # account may keep waiting in one queue, and tasks it may submit per second.
    account_max_backlog: int = field(
        default_factory=lambda: env_int("KUBETASK_ACCOUNT_MAX_BACKLOG", 100_000, 0)
    )
    # Functions one account may register, and streams of their own (dedicated queues and
    # partitions) they may hold together: each is a stream in the nats-server all accounts share.
    account_max_functions: int = field(
        default_factory=lambda: env_int("KUBETASK_ACCOUNT_MAX_FUNCTIONS", 10_000, 1)
    )
    account_max_own_queues: int = field(
        default_factory=lambda: env_int("KUBETASK_ACCOUNT_MAX_OWN_QUEUES", 256, 0)
    )
    # Bytes an account's functions and AsyncConfigs may take as stored (`quotas.py`).
    account_max_registered_bytes: int = field(
        default_factory=lambda: env_int("KUBETASK_ACCOUNT_MAX_REGISTERED_BYTES", 16 << 20, 1)
    )
    # Output one attempt may log, in characters a second and at once (`dispatch/log_budget.py`);
    # past it lines are dropped and counted.
    log_rate: float = field(
        default_factory=lambda: env_float("KUBETASK_LOG_RATE", 1 << 20, 1, 1 << 30)
    )
    log_burst: float = field(
        default_factory=lambda: env_float("KUBETASK_LOG_BURST", 8 << 20, 1024, 1 << 34)
    )
    # Output of one account's tasks a dispatcher reads, a second and at once, counted as above
    # (`dispatch/log_pacing.py`); past it their output waits to be read.
    account_log_rate: float = field(
        default_factory=lambda: env_float("KUBETASK_ACCOUNT_LOG_RATE", 256 << 10, 1, 1 << 30)
    )
    account_log_burst: float = field(
        default_factory=lambda: env_float("KUBETASK_ACCOUNT_LOG_BURST", 512 << 10, 1024, 1 << 34)
    )
    # And of every account's together, shared equally by those printing.
    dispatcher_log_rate: float = field(
        default_factory=lambda: env_float("KUBETASK_DISPATCHER_LOG_RATE", 1 << 20, 1, 1 << 34)
    )
    # Bytes all tasks' logs may take on disk together; past them the oldest lines go first, so a
    # flood of logs never takes the space records and queues need (`jetstream.py`).
    logs_max_bytes: int = field(
        default_factory=lambda: env_int("KUBETASK_LOGS_MAX_BYTES", 4 << 30, HISTORY_MIN, 1 << 50)
    )
    # Bytes of task records one account may keep as stored; past them its submissions are
    # refused (`gateway/record_quota.py`), so one tenant cannot fill the store every account
    # writes to.
    account_max_record_bytes: int = field(
        default_factory=lambda: env_int("KUBETASK_ACCOUNT_MAX_RECORD_BYTES", 1 << 30, 64 << 10)
    )
    # Bytes of log lines, and of audit trail, one account may keep as written (before
    # compression); past them its own oldest go first (`gateway/history_quota.py`), so one
    # tenant cannot push the others' history out of the streams all accounts share.
    account_max_log_bytes: int = field(
        default_factory=lambda: env_int("KUBETASK_ACCOUNT_MAX_LOG_BYTES", 1 << 30, 64 << 10)
    )
    account_max_events_bytes: int = field(
        default_factory=lambda: env_int("KUBETASK_ACCOUNT_MAX_EVENTS_BYTES", 1 << 30, 64 << 10)
    )
    # Bytes JetStream may store (its `max_file_store`; 0: not known here): past 90% of them the
    # gateway refuses submissions, so accepted tasks keep room to finish (`gateway/store_room.py`).
    store_max_bytes: int = field(
        default_factory=lambda: env_int("KUBETASK_STORE_MAX_BYTES", 0, 0, 1 << 60)
    )
    # Bytes the audit trail (every revision of every record, `events.py`) may take on disk; past
    # them the oldest revisions go first, as log lines do.
    events_max_bytes: int = field(
        default_factory=lambda: env_int("KUBETASK_EVENTS_MAX_BYTES", 2 << 30, HISTORY_MIN, 1 << 50)
    )
    # Log reads (`logs`, `logs -f`) one account may have open at once (`gateway/log_streams.py`).
    account_max_log_streams: int = field(
        default_factory=lambda: env_int("KUBETASK_ACCOUNT_MAX_LOG_STREAMS", 100, 1)
    )
    account_max_rate: float = field(
        default_factory=lambda: env_float("KUBETASK_ACCOUNT_MAX_RATE", 0.0, 0)
    )
    # Changes of an account's functions and AsyncConfigs a second, and at once
    # (`gateway/change_rate.py`); 0: no limit.
    account_max_changes: float = field(
        default_factory=lambda: env_float("KUBETASK_ACCOUNT_MAX_CHANGES", 20.0, 0)
    )
    account_changes_burst: int = field(
        default_factory=lambda: env_int("KUBETASK_ACCOUNT_CHANGES_BURST", 200, 1)
    )
    # Accounts whose back-pressure limits are their own rather than the two above (a paid tier,
    # a known batch account): `account=limit,...`, 0 lifting that limit for the account.
    account_backlog_limits: dict[str, float] = field(
        default_factory=lambda: per_account.from_env(
            "KUBETASK_ACCOUNT_BACKLOG_LIMITS", 1e12, "number of tasks", zero=True, whole=True
        )
    )
    account_rate_limits: dict[str, float] = field(
        default_factory=lambda: per_account.from_env(
            "KUBETASK_ACCOUNT_RATE_LIMITS", 1e9, "tasks a second", zero=True
        )
    )
    # Attempts an account's functions may run at once, all together, split over the live
    # dispatchers (`dispatch/account_concurrency.py`); 0: no limit. The second: accounts with
    # limits of their own.
    account_max_concurrency: int = field(
        default_factory=lambda: env_int("KUBETASK_ACCOUNT_MAX_CONCURRENCY", 1000, 0)
    )
    account_concurrency_limits: dict[str, float] = field(
        default_factory=lambda: per_account.from_env(
            "KUBETASK_ACCOUNT_CONCURRENCY_LIMITS", 1e9, "attempts at once", zero=True, whole=True
        )
    )
    # Functions that may share one queue (stream): its consumer limit; past it, registering
    # another function there is a 409 (nats-server 2.15 would stop at 1,000). Each function is
    # a durable consumer, and a burst across 10,000 of them in one account's stream ran at a
    # few tasks a second: nats-server rewrote every busy consumer's state file, and with that
    # state in memory walked every consumer of the stream on each acknowledgement
    # (bench/README.md, docs/decisions.md "Still costly").
    queue_max_functions: int = field(
        default_factory=lambda: env_int("KUBETASK_QUEUE_MAX_FUNCTIONS", 10_000, 1)
    )
    # Accounts whose `auto` functions start in the stream small accounts share (`KT_QM`) rather
    # than in a stream of the account's own: names separated by commas, or `*` for all. Read
    # when a function is registered; the placement is recorded with the function's route.
    small_accounts: frozenset[str] = field(
        default_factory=lambda: per_account.parse_accounts(
            "KUBETASK_SMALL_ACCOUNTS", os.environ.get("KUBETASK_SMALL_ACCOUNTS", "")
        )
    )
    # What runs `command` functions: `local` processes beside the dispatcher, or `kubernetes`,
    # a Job per attempt with the runtime sidecar (`executors/kubernetes_jobs.py`).
    executor: str = field(default_factory=lambda: env_choice("KUBETASK_EXECUTOR", EXECUTORS))
    # Copies JetStream keeps of every stream and bucket: 3 on a three-node NATS cluster (the
    # chart sets it with `nats.cluster.enabled`), so losing one server loses no task.
    stream_replicas: int = field(
        default_factory=lambda: env_int("KUBETASK_STREAM_REPLICAS", 1, 1, 5)
    )
    # A function's pull request that ends empty is followed by a longer one, up to this; once
    # one this long ends empty the function dozes: no request open, its queue subject watched
    # (`dispatch/pull.py`).
    pull_idle_expires: float = field(
        default_factory=lambda: env_float("KUBETASK_PULL_IDLE_EXPIRES", 80.0, 1)
    )
    # nats-server removes a function's consumer once no dispatcher has asked it for tasks, and
    # none it delivered was acknowledged or kept alive, for this long; 0 keeps consumers for
    # ever. The first task after that re-creates it (`queues.revive_consumer`). Consumers of
    # the small accounts' stream are kept: their count is that stream's room.
    consumer_idle: float = field(
        default_factory=lambda: env_float("KUBETASK_CONSUMER_IDLE", 120.0, 0)
    )
    # A dispatcher that stops renewing its partition leases loses them after this long.
    lease_ttl: float = field(default_factory=lambda: env_float("KUBETASK_LEASE_TTL", 10.0, 1))
    # JetStream's publish de-duplication window; task-id de-duplication does not depend on it.
    dedup_window: float = field(
        default_factory=lambda: env_float("KUBETASK_DEDUP_WINDOW", 120.0, 1)
    )
    # A task still Pending this long after acceptance lost its publish; it is republished.
    sweep_grace: float = field(default_factory=lambda: env_float("KUBETASK_SWEEP_GRACE", 10.0, 1))
    # Networks no webhook destination may reach (`dispatch/webhooks.py`): CIDRs separated by
    # commas, or `none`.
    webhook_denied_networks: tuple[Network, ...] = field(
        default_factory=lambda: parse_networks(
            "KUBETASK_WEBHOOK_DENIED_NETWORKS",
            env_str("KUBETASK_WEBHOOK_DENIED_NETWORKS", DEFAULT_DENIED, NETWORKS),
        )
    )
    # Fair sharing across accounts (`fairness.py`): while several accounts have work, each keeps
    # at most its weighted share of these many attempts in flight in a dispatcher, and of these
    # many submissions in progress in a gateway.
    fairness: bool = field(default_factory=lambda: env_switch("KUBETASK_FAIRNESS", True))
    account_weights: dict[str, float] = field(
        default_factory=lambda: parse_weights(env_str("KUBETASK_ACCOUNT_WEIGHTS", "", WEIGHTS))
    )
    dispatch_fair_slots: int = field(
        default_factory=lambda: env_int("KUBETASK_DISPATCH_FAIR_SLOTS", 32, 1)
    )
    # An attempt counts against its account's share in a dispatcher for this many seconds at
    # most (`dispatch/share_lending.py`).
    dispatch_lend_after: float = field(
        default_factory=lambda: env_float("KUBETASK_DISPATCH_LEND_AFTER", 1.0, 0.05, 3600.0)
    )
    gateway_fair_slots: int = field(
        default_factory=lambda: env_int("KUBETASK_GATEWAY_FAIR_SLOTS", 8, 1)
    )

    def small_account(self, account: str) -> bool:
        return account in self.small_accounts or "*" in self.small_accounts

    def backlog_limit(self, account: str) -> int:
        """Tasks `account` may keep waiting in a queue; 0: no limit."""
        return int(self.account_backlog_limits.get(account, self.account_max_backlog))

    def concurrency_limit(self, account: str) -> int:
        """Attempts `account`'s functions may run at once in all; 0: no limit."""
        return int(self.account_concurrency_limits.get(account, self.account_max_concurrency))

    def rate_limit(self, account: str) -> float:
        """Tasks `account` may submit a second; 0: no limit."""
        return self.account_rate_limits.get(account, self.account_max_rate)

    def fair_share(
        self, slots: int, least_per_account: int = 1, lend_after: float | None = None
    ) -> FairnessSettings:
        return FairnessSettings(
            self.fairness,
            slots,
            least_per_account=least_per_account,
            weights=self.account_weights,
            lend_after=lend_after,
        )
