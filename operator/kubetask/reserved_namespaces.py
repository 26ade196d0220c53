"""Namespaces where no account's pods run, whoever names them as an account.

Accounts are namespaces, and a function's pods may take any Secret of their namespace as
environment (`envFrom`) and run as any of its service accounts (`serviceAccountName`). In the
platform's own namespace those are the NATS users' passwords, the tokens and the operator's
cluster-wide role; in Kubernetes' own (names starting `kube-`, which Kubernetes reserves for
its system namespaces) they are the cluster's controllers'. A token for such an account is an
admin's slip, not a grant of all that: on Kubernetes the dispatchers create no pod there (the
attempt fails saying why) and the operator no warm Deployment or NetworkPolicy. Up front,
`kubetask tokens create` refuses a `kube-` account and the chart both kinds in `auth.tokens`;
the platform's namespace is known on the cluster only (the downward API, the operator's
`KUBETASK_NAMESPACE`), so a token for it made elsewhere works until a function would run.
"""

from __future__ import annotations

SYSTEM_PREFIX = "kube-"


class Reserved(Exception):
    pass


def is_system(account: str) -> bool:
    return account.startswith(SYSTEM_PREFIX)


def refusal(account: str, platform: str | None) -> str | None:
    """Why `account`'s pods may not run in its namespace; None when they may."""
    if platform is not None and account == platform:
        return (
            f"account {account!r} is the platform's own namespace: a function's pods there "
            "could read its Secrets and act as its service accounts, so none runs there"
        )
    if is_system(account):
        return (
            f"account {account!r} is a Kubernetes system namespace ({SYSTEM_PREFIX}*), "
            "where no function runs"
        )
    return None


def check(account: str, platform: str | None) -> None:
    """Raises `Reserved`, saying why, before anything is made in `account`'s namespace."""
    if (why := refusal(account, platform)) is not None:
        raise Reserved(why)
