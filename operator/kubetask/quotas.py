"""What one account may keep registered: every gateway, dispatcher and the operator mirror every
account's functions and AsyncConfigs in memory, and nats-server keeps them too, so an account's
registrations are bounded in bytes as well as in number.

A request body may be 256 KiB, and nothing bounded a function's command lines and environment or
an AsyncConfig's annotations below that, nor the number of AsyncConfigs (one may name a function
that does not exist yet). Two hundred functions of 250 KB raised the gateway's and the
dispatcher's memory by ~50 MB each and nats-server's by 68 MB; at the 10,000 functions an
account may register, that would be ~2.5 GB in every process (extrapolated), from one tenant.
Hence `KUBETASK_ACCOUNT_MAX_REGISTERED_BYTES` (16 MiB: an ordinary function is 470-600 bytes
stored, ten thousand of them ~6 MB), and as many AsyncConfigs as functions
(`KUBETASK_ACCOUNT_MAX_FUNCTIONS`; a function takes one). As for the other quotas, only what
grows is refused: an account over a quota since it was lowered keeps what it has, and may update
an object so long as it does not grow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .registry import Registry


class Limits(Protocol):
    @property
    def account_max_functions(self) -> int: ...

    @property
    def account_max_registered_bytes(self) -> int: ...


class OverQuota(Exception):
    """A registration the account has no room for (409 in the API, a condition on Kubernetes)."""


def check_bytes(registry: Registry, kind: str, account: str, name: str, data: bytes) -> None:
    before = registry.object_bytes(kind, account, name)
    total = registry.account_bytes(account) - before + len(data)
    limit = registry.limits.account_max_registered_bytes
    if len(data) > before and total > limit:
        raise OverQuota(
            f"account {account!r} would store {total} bytes of functions and AsyncConfigs, over "
            f"its {limit} (KUBETASK_ACCOUNT_MAX_REGISTERED_BYTES); this {kind} takes "
            f"{len(data)}: make it smaller or delete others first"
        )


def check_config(registry: Registry, account: str, name: str, data: bytes) -> None:
    limit = registry.limits.account_max_functions
    new = registry.object_bytes("config", account, name) == 0
    if new and registry.config_count(account) >= limit:
        raise OverQuota(
            f"account {account!r} already has {limit} AsyncConfigs, as many as it may have "
            "functions (KUBETASK_ACCOUNT_MAX_FUNCTIONS); delete one first"
        )
    check_bytes(registry, "config", account, name, data)
