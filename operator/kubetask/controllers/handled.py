"""Counts each run of an operator handler by its outcome (`kubetask_operator_handled_total`).

Why: the operator's work was visible only in its log and in the objects' events, one object at
a time; a cluster's administrator could not see that TaskFunctions were being retried by the
hundred (throttled, or waiting for a function to be registered) without reading every event.
Kopf keeps a handler's id from the function it wraps (`__wrapped__`), so progress stored in
the objects' annotations by an operator without this still matches.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import kopf

from .operator_metrics import HANDLED

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def handled(kind: str) -> Callable[[F], F]:
    def wrap(handler: F) -> F:
        @functools.wraps(handler)
        async def counted(*args: Any, **kwargs: Any) -> Any:
            try:
                result = await handler(*args, **kwargs)
            except kopf.TemporaryError:
                HANDLED.labels(kind, "retried").inc()
                raise
            except Exception:
                HANDLED.labels(kind, "failed").inc()
                raise
            HANDLED.labels(kind, "done").inc()
            return result

        return counted  # type: ignore[return-value]

    return wrap
