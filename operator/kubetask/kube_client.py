"""The official Kubernetes client, configured once: in a pod from its service account, elsewhere
from the kubeconfig. Its calls block, so callers run them in a worker thread."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from .models import API_GROUP, API_VERSION, TaskFunction

_lock = threading.Lock()
_loaded = False


def load() -> None:
    global _loaded
    with _lock:
        if _loaded:
            return
        # A kubeconfig that asks to skip TLS verification gets it; no warning per request.
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config()  # type: ignore[no-untyped-call]
        _loaded = True


async def function_owner(fn: TaskFunction) -> dict[str, Any] | None:
    """An owner reference to the function's TaskFunction object, if it is one (a function
    registered over HTTP alone is not): what kubetask creates for it goes when it goes."""

    def get() -> dict[str, Any] | None:
        load()
        try:
            obj: Any = client.CustomObjectsApi().get_namespaced_custom_object(
                API_GROUP, API_VERSION, fn.account, "taskfunctions", fn.name
            )
        except ApiException as err:
            if err.status in (403, 404):
                return None
            raise
        return {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": "TaskFunction",
            "name": fn.name,
            "uid": obj["metadata"]["uid"],
        }

    return await asyncio.to_thread(get)
