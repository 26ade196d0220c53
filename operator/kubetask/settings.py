"""Runtime settings shared by the gateway and dispatchers, read from KUBETASK_* variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def env_str(name: str, default: str) -> str:
    return os.environ.get(name) or default


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw else default


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw else default


@dataclass(frozen=True)
class Settings:
    nats_url: str = field(
        default_factory=lambda: env_str("KUBETASK_NATS_URL", "nats://127.0.0.1:4222")
    )
    # How long a claimed message may go without a heartbeat before JetStream hands it to another
    # dispatcher; dispatchers heartbeat at a third of it, so this bounds crash recovery time.
    ack_wait: float = field(default_factory=lambda: env_float("KUBETASK_ACK_WAIT", 30.0))
    # Task records, logs and events are kept this long (must exceed the longest task + queue age).
    retention_seconds: float = field(
        default_factory=lambda: env_float("KUBETASK_RETENTION_SECONDS", 7 * 86400)
    )
    max_payload_bytes: int = field(
        default_factory=lambda: env_int("KUBETASK_MAX_PAYLOAD", 256 * 1024)
    )
    max_result_bytes: int = field(
        default_factory=lambda: env_int("KUBETASK_MAX_RESULT", 256 * 1024)
    )
    # A queue (stream) holding this many tasks refuses new ones (429) rather than drop old ones.
    queue_max_msgs: int = field(
        default_factory=lambda: env_int("KUBETASK_QUEUE_MAX_MSGS", 1_000_000)
    )
    # JetStream's publish de-duplication window; task-id de-duplication does not depend on it.
    dedup_window: float = field(default_factory=lambda: env_float("KUBETASK_DEDUP_WINDOW", 120.0))
    # A task still Pending this long after acceptance lost its publish; it is republished.
    sweep_grace: float = field(default_factory=lambda: env_float("KUBETASK_SWEEP_GRACE", 10.0))
