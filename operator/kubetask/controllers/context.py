"""What every handler shares: the data-plane connection and the operator's configuration."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..plane import DataPlane


@dataclass(frozen=True)
class OperatorConfig:
    namespace: str = field(default_factory=lambda: os.environ.get("KUBETASK_NAMESPACE", "kubetask"))
    release: str = field(default_factory=lambda: os.environ.get("KUBETASK_RELEASE", "kubetask"))
    image: str = field(default_factory=lambda: os.environ.get("KUBETASK_IMAGE", "kubetask:dev"))
    tokens_secret: str = field(
        default_factory=lambda: os.environ.get("KUBETASK_TOKENS_SECRET", "kubetask-tokens")
    )
    gateway_replicas: int = field(
        default_factory=lambda: int(os.environ.get("KUBETASK_GATEWAY_REPLICAS", "1"))
    )
    dispatcher_min: int = field(
        default_factory=lambda: int(os.environ.get("KUBETASK_DISPATCHER_MIN", "1"))
    )
    dispatcher_max: int = field(
        default_factory=lambda: int(os.environ.get("KUBETASK_DISPATCHER_MAX", "10"))
    )
    target_backlog: int = field(
        default_factory=lambda: int(os.environ.get("KUBETASK_DISPATCHER_TARGET_BACKLOG", "100"))
    )
    cooldown: float = field(
        default_factory=lambda: float(os.environ.get("KUBETASK_DISPATCHER_COOLDOWN", "60"))
    )
    scale_interval: float = field(
        default_factory=lambda: float(os.environ.get("KUBETASK_SCALE_INTERVAL", "5"))
    )


def plane_of(memo: Any) -> DataPlane:
    plane: DataPlane = memo.plane
    return plane


def condition(
    status: str,
    reason: str,
    message: str,
    previous: list[dict[str, Any]] | None,
    type_: str = "Ready",
) -> list[dict[str, Any]]:
    """A Ready condition, keeping lastTransitionTime when nothing changed (so a re-reconcile
    writes an identical status and the API server records no change)."""
    for old in previous or []:
        if old.get("type") == type_ and old.get("status") == status and old.get("reason") == reason:
            if old.get("message") == message:
                return [old]
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return [
        {
            "type": type_,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": now,
        }
    ]
