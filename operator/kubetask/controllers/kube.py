"""The few Kubernetes API calls the operator makes itself (kopf covers the rest), through the
official client (`kube_client.py`) in a worker thread."""

from __future__ import annotations

import asyncio
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from ..kube_client import load as _load
from ..models import API_GROUP, API_VERSION


async def patch_status(plural: str, namespace: Any, name: str, status: dict[str, Any]) -> None:
    def call() -> None:
        _load()
        client.CustomObjectsApi().patch_namespaced_custom_object_status(
            API_GROUP, API_VERSION, namespace, plural, name, {"status": status}
        )

    await asyncio.to_thread(call)


async def apply_deployment(namespace: Any, body: dict[str, Any]) -> None:
    """Create the Deployment, or bring its template in line (replicas are left to the scaler)."""

    def call() -> None:
        _load()
        apps = client.AppsV1Api()
        name = body["metadata"]["name"]
        try:
            current = apps.read_namespaced_deployment(name, namespace)
        except ApiException as err:
            if err.status != 404:
                raise
            apps.create_namespaced_deployment(namespace, body)  # type: ignore[arg-type]
            return
        api = client.ApiClient()
        desired = body["spec"]["template"]
        actual = api.sanitize_for_serialization(current.spec.template)  # type: ignore[no-untyped-call]
        if differs(desired, actual):
            apps.patch_namespaced_deployment(name, namespace, {"spec": {"template": desired}})

    await asyncio.to_thread(call)


def differs(desired: Any, actual: Any) -> bool:
    """Whether `desired` sets anything `actual` lacks (server-side defaults are ignored)."""
    if isinstance(desired, dict):
        return not isinstance(actual, dict) or any(
            differs(v, actual.get(k)) for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (
            not isinstance(actual, list)
            or len(desired) != len(actual)
            or any(differs(d, a) for d, a in zip(desired, actual, strict=False))
        )
    return bool(desired != actual)


async def get_replicas(namespace: Any, name: str) -> int | None:
    def call() -> int | None:
        _load()
        try:
            scale = client.AppsV1Api().read_namespaced_deployment_scale(name, namespace)
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return int(scale.spec.replicas or 0) if scale.spec is not None else 0

    return await asyncio.to_thread(call)


async def set_replicas(namespace: Any, name: str, replicas: int) -> None:
    def call() -> None:
        _load()
        client.AppsV1Api().patch_namespaced_deployment_scale(
            name, namespace, {"spec": {"replicas": replicas}}
        )

    await asyncio.to_thread(call)
