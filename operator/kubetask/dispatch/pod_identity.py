"""Where a dispatcher runs, as recorded on each attempt: on Kubernetes its pod, namespace,
container and node, from the downward API (the operator sets these variables on the dispatcher
Deployment), so `kubetask login`, `describe` and `kubectl get tasks -o wide` can name the pod
running a task. Outside Kubernetes they are unset and only the host is recorded."""

from __future__ import annotations

import os

from ..models import ExecutorRef

POD_ENV = {
    "pod": "KUBETASK_POD_NAME",
    "namespace": "KUBETASK_POD_NAMESPACE",
    "container": "KUBETASK_CONTAINER_NAME",
    "node": "KUBETASK_NODE_NAME",
}


def namespace() -> str | None:
    """The dispatcher's own namespace on Kubernetes: the platform's (`reserved_namespaces.py`)."""
    return os.environ.get(POD_ENV["namespace"]) or None


def executor_ref(dispatcher_id: str, host: str) -> ExecutorRef:
    found = {field: os.environ.get(name) or None for field, name in POD_ENV.items()}
    return ExecutorRef(backend="local", dispatcher=dispatcher_id, host=host, **found)
