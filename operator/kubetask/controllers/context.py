"""What every handler shares: the data-plane connection and the operator's configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf

from ..gateway.change_rate import ChangesThrottled
from ..plane import DataPlane
from ..settings import env_float, env_int, env_str


def _from_env(kind: Any, name: str, default: Any, *bounds: Any) -> Any:
    return field(default_factory=lambda: kind(f"KUBETASK_{name}", default, *bounds))


@dataclass(frozen=True)
class OperatorConfig:
    """Set by the Helm chart through environment variables (charts/kubetask/templates)."""

    namespace: str = _from_env(env_str, "NAMESPACE", "kubetask")
    release: str = _from_env(env_str, "RELEASE", "kubetask")
    image: str = _from_env(env_str, "IMAGE", "kubetask:dev")
    tokens_secret: str = _from_env(env_str, "TOKENS_SECRET", "kubetask-tokens")
    # Where the Deployments it creates find their NATS passwords (`nats_auth.py`).
    nats_users_secret: str = _from_env(env_str, "NATS_USERS_SECRET", "kubetask-nats-users")
    gateway_replicas: int = _from_env(env_int, "GATEWAY_REPLICAS", 1, 1)
    # The chart's platform settings (`config` in values.yaml), given to the gateway and the
    # dispatchers as environment; empty outside the chart.
    config_map: str = _from_env(env_str, "CONFIG_MAP", "")
    # Its content's checksum, on the pods it configures: a change rolls them.
    config_checksum: str = _from_env(env_str, "CONFIG_CHECKSUM", "")
    # Passed on to the gateway and the dispatchers: every component creates streams alike.
    stream_replicas: int = _from_env(env_int, "STREAM_REPLICAS", 1, 1, 5)
    # What runs `command` functions (settings.py EXECUTORS); `kubernetes` also gives the
    # dispatchers the service account that may manage Jobs and the address sidecars call.
    executor: str = _from_env(env_str, "EXECUTOR", "local")
    dispatcher_min: int = _from_env(env_int, "DISPATCHER_MIN", 1, 1)
    dispatcher_max: int = _from_env(env_int, "DISPATCHER_MAX", 10, 1)
    target_backlog: int = _from_env(env_int, "DISPATCHER_TARGET_BACKLOG", 100, 1)
    cooldown: float = _from_env(env_float, "DISPATCHER_COOLDOWN", 60.0, 0)
    scale_interval: float = _from_env(env_float, "SCALE_INTERVAL", 5.0, 0.1)


def plane_of(memo: Any) -> DataPlane:
    plane: DataPlane = memo.plane
    return plane


def set_status(patch: Any, status: Any, desired: dict[str, Any]) -> None:
    """Patch only what differs: an identical status write still bumps the object's
    resourceVersion (its managedFields move), which a restarted operator must not do."""
    for key, value in desired.items():
        if status.get(key) != value:
            patch.status[key] = value


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


def pace_change(memo: Any, body: Any, account: str) -> None:
    """Counts a change of `account`'s registrations against its change rate
    (`gateway/change_rate.py`). Past it the handler is retried when the account may change
    again, the object's events say why, and its `observedGeneration` stays behind until then:
    the API server has taken the object, so it is applied later rather than refused."""
    try:
        memo.changes.take(account)
    except ChangesThrottled as err:
        kopf.info(body, reason="Throttled", message=f"{err}; applied in {err.retry_after}s")
        raise kopf.TemporaryError(f"throttled: {err}", delay=err.retry_after) from None
