"""AsyncConfig: validated, bound to its function, and published to the registry the dispatchers
read for every task — so a change reaches running dispatchers without a restart."""

from __future__ import annotations

from typing import Any

import kopf

from ..dispatch.destinations import config_problem
from ..models import AsyncConfig, AsyncConfigSpec, ObjectMeta
from ..quotas import OverQuota
from ..registry import ConfigConflict
from .context import condition, pace_change, plane_of, set_status
from .handled import handled

RESOURCE = ("kubetask.io", "v1alpha1", "asyncconfigs")


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
@handled("AsyncConfig")
async def reconcile(
    name: str,
    namespace: Any,
    spec: Any,
    meta: Any,
    status: Any,
    memo: Any,
    patch: kopf.Patch,
    body: Any,
    reason: str,
    **_: Any,
) -> None:
    plane = plane_of(memo)
    try:
        cfg = AsyncConfig(
            metadata=ObjectMeta(name=name, namespace=namespace),
            spec=AsyncConfigSpec.model_validate(dict(spec)),
        )
        problem = config_problem(cfg, denied_networks=plane.settings.webhook_denied_networks)
        if problem is not None:
            raise ValueError(problem)
    except ValueError as err:
        # Never registered, so no dispatcher delivers anywhere it names.
        patch.status.update(
            ready=False,
            conditions=condition("False", "InvalidSpec", str(err), status.get("conditions")),
        )
        raise kopf.PermanentError(f"invalid spec: {err}") from err
    stored = plane.registry.configs.get((namespace, name))
    if (stored is None or stored.spec != cfg.spec) and reason != kopf.Reason.RESUME:
        pace_change(memo, body, namespace)
    try:
        await plane.registry.put_async_config(cfg)
    except (ConfigConflict, OverQuota) as err:
        why = "Conflict" if isinstance(err, ConfigConflict) else "OverQuota"
        patch.status.update(
            ready=False,
            conditions=condition("False", why, str(err), status.get("conditions")),
        )
        raise kopf.TemporaryError(str(err), delay=30) from err
    bound = plane.registry.function(namespace, cfg.spec.function) is not None
    message = (
        f"applies to function {cfg.spec.function}"
        if bound
        else f"function {cfg.spec.function} does not exist (yet)"
    )
    set_status(
        patch,
        status,
        {
            "ready": bound,
            "observedGeneration": meta.get("generation"),
            "conditions": condition(
                "True" if bound else "False",
                "Bound" if bound else "FunctionMissing",
                message,
                status.get("conditions"),
            ),
        },
    )
    if not bound:
        raise kopf.TemporaryError(message, delay=10)


@kopf.on.delete(*RESOURCE)
@handled("AsyncConfig")
async def remove(name: str, namespace: Any, memo: Any, body: Any, **_: Any) -> None:
    registry = plane_of(memo).registry
    if (namespace, name) in registry.configs:
        pace_change(memo, body, namespace)
    await registry.delete_async_config(namespace, name)
