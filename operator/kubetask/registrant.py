"""Who registered a function, as the gateway saw it: the platform's own annotation on the
object, set on every registration whatever the request said, so a tenant cannot claim an
admin's trust. `executors/function_users.py` runs a function with its registrant's rights."""

from __future__ import annotations

from .models import TaskFunction

ANNOTATION = "kubetask.io/registered-by"
ADMIN = "admin"
ACCOUNT = "account"


def mark(fn: TaskFunction, admin: bool) -> None:
    fn.metadata.annotations[ANNOTATION] = ADMIN if admin else ACCOUNT


def registered_by(fn: TaskFunction) -> str:
    """ADMIN or ACCOUNT; a function with no mark (registered by the operator from a
    TaskFunction object, or before there was one) is its account's."""
    return ADMIN if fn.metadata.annotations.get(ANNOTATION) == ADMIN else ACCOUNT
