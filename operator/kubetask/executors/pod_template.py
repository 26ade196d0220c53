"""The pod a function's attempt runs in on Kubernetes: the function's container — its image,
unchanged, its command started by the runtime's entry — beside the runtime sidecar, which the
platform injects (`runtime-sidecar/`).

What a function may set is the validated subset in `TaskFunctionSpec` (image, pull policy,
resources, env/envFrom, working directory, service account, node selector, tolerations).
Everything else is the platform's: no host namespaces, volumes or privileges, no privilege
escalation, no raw sockets, the runtime's default seccomp profile, no service-account token
unless the function names an account, no service links.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from ..models import TaskFunction

RUNTIME_DIR = "/kt"
RUNTIME_VOLUME = "kt-runtime"
RUNTIME_BINARY = "/usr/local/bin/kt-runtime"  # in kubetask's image (e2e/build_images.py)
FUNCTION_CONTAINER = "function"
SIDECAR_CONTAINER = "kt-runtime"
PLATFORM_UID = 10001
PROXY_PORT = 8079  # the warm pod's sidecar, which dispatchers invoke
APP_PORT = 8080  # the function's own server, on the pod's localhost ($PORT)
PROXY_TOKEN = "KUBETASK_PROXY_TOKEN"


def _downward(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _platform_security() -> dict[str, Any]:
    return {
        "runAsUser": PLATFORM_UID,
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }


def sidecar(image: str, env: list[dict[str, Any]], mode: str = "sidecar") -> dict[str, Any]:
    """A native sidecar (an init container that keeps running): started before the function's
    container, stopped after it."""
    return {
        "name": SIDECAR_CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "restartPolicy": "Always",
        "command": [RUNTIME_BINARY, mode],
        "env": [
            *env,
            _downward("KUBETASK_POD_NAME", "metadata.name"),
            _downward("KUBETASK_POD_NAMESPACE", "metadata.namespace"),
            _downward("KUBETASK_NODE_NAME", "spec.nodeName"),
        ],
        "volumeMounts": [{"name": RUNTIME_VOLUME, "mountPath": RUNTIME_DIR}],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": _platform_security(),
    }


def function_container(
    fn: TaskFunction, command: list[str], env: dict[str, str], default_image: str
) -> dict[str, Any]:
    spec = fn.spec
    container: dict[str, Any] = {
        "name": FUNCTION_CONTAINER,
        "image": spec.image or default_image,
        "imagePullPolicy": spec.imagePullPolicy or "IfNotPresent",
        "command": [f"{RUNTIME_DIR}/bin/kt-runtime", "entry", "--", *command],
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "volumeMounts": [{"name": RUNTIME_VOLUME, "mountPath": RUNTIME_DIR}],
        # The function's image keeps its user (root, often) and the runtime's other default
        # capabilities, which images that chown or switch users at start need. Not NET_RAW:
        # with it a process writes any frame it likes on the node's bridge, every pod's, so a
        # tenant could answer ARP and DNS for a neighbour's pod or the cluster's resolver and
        # take its traffic, around every NetworkPolicy.
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["NET_RAW"]},
        },
    }
    if spec.workingDir:
        container["workingDir"] = spec.workingDir
    if spec.envFrom:
        container["envFrom"] = [e.model_dump(exclude_none=True) for e in spec.envFrom]
    if spec.resources is not None:
        container["resources"] = spec.resources.model_dump(exclude_defaults=True)
    return container


def installing(sidecar: dict[str, Any]) -> dict[str, Any]:
    """The sidecar puts the runtime into the shared volume in its postStart hook, which the
    kubelet completes before it starts the next container: the function's container then finds
    it. A copy by the sidecar's own process could lose that race, and an init container that
    copies it first cost a container start (about a second on the test node)."""
    sidecar["lifecycle"] = {"postStart": {"exec": {"command": [RUNTIME_BINARY, "install"]}}}
    return sidecar


def pod_spec(
    fn: TaskFunction, containers: list[dict[str, Any]], sidecar: dict[str, Any]
) -> dict[str, Any]:
    spec = fn.spec
    pod: dict[str, Any] = {
        "initContainers": [sidecar],
        "containers": containers,
        "volumes": [{"name": RUNTIME_VOLUME, "emptyDir": {}}],
        "automountServiceAccountToken": spec.serviceAccountName is not None,
        "enableServiceLinks": False,
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "terminationGracePeriodSeconds": 10,
    }
    if spec.serviceAccountName:
        pod["serviceAccountName"] = spec.serviceAccountName
    if spec.nodeSelector:
        pod["nodeSelector"] = dict(spec.nodeSelector)
    if spec.tolerations:
        pod["tolerations"] = [t.model_dump(exclude_none=True) for t in spec.tolerations]
    return pod


def warm_labels(fn: TaskFunction) -> dict[str, str]:
    return {
        "app.kubernetes.io/managed-by": "kubetask",
        "kubetask.io/account": fn.account,
        "kubetask.io/function": fn.name,
        "kubetask.io/warm": "true",
    }


def warm_name(fn: TaskFunction) -> str:
    """Its Deployment's name, a DNS label. A function's name may be 63 characters, and cut to
    fit, two names alike in their first 60 made one Deployment: one function's tasks were sent
    to the other's pods, or found none. Past the limit the name ends in a hash of it."""
    name = f"kt-{fn.name}"
    if len(name) <= 63:
        return name
    return f"{name[:50].rstrip('-')}-{hashlib.sha256(fn.name.encode()).hexdigest()[:12]}"


def warm_deployment(
    fn: TaskFunction, default_image: str, token: str, owner: dict[str, Any] | None
) -> dict[str, Any]:
    """A `server` function's warm pods: its server started with $PORT by `kt-runtime serve`
    (which gives its output to the proxy, and keeps it from being PID 1, which ignores a SIGTERM
    it never handled), behind the proxy sidecar (`kt-runtime proxy`), drained before it is
    stopped (`kt-runtime drain`). Replicas are the operator's to set
    (`controllers/warm_pools.py`), from zero."""
    server = fn.spec.server
    assert server is not None
    env = {e.name: e.value for e in fn.spec.env}
    env.update(
        {"PORT": str(APP_PORT), "KUBETASK_ACCOUNT": fn.account, "KUBETASK_FUNCTION": fn.name}
    )
    app = function_container(fn, [], env, default_image)
    app["command"] = [f"{RUNTIME_DIR}/bin/kt-runtime", "serve", "--", *server.command]
    app["lifecycle"] = {
        "preStop": {"exec": {"command": [f"{RUNTIME_DIR}/bin/kt-runtime", "drain"]}}
    }
    proxy = sidecar(
        default_image,
        [
            {"name": PROXY_TOKEN, "value": token},
            {"name": "KUBETASK_CONCURRENCY", "value": str(server.concurrency)},
            {"name": "KUBETASK_APP_PORT", "value": str(APP_PORT)},
            {"name": "KUBETASK_PROXY_PORT", "value": str(PROXY_PORT)},
            {"name": "KUBETASK_INVOKE_PATH", "value": server.invokePath},
            {"name": "KUBETASK_READINESS_PATH", "value": server.readinessPath},
        ],
        mode="proxy",
    )
    proxy["ports"] = [{"name": "invoke", "containerPort": PROXY_PORT}]
    proxy["readinessProbe"] = {
        "httpGet": {"path": "/ready", "port": PROXY_PORT},
        "periodSeconds": 1,
        "failureThreshold": 1,
    }
    pod = pod_spec(fn, [app], installing(proxy))
    # Long enough for the longest invocation to end while the pod drains.
    pod["terminationGracePeriodSeconds"] = math.ceil(fn.spec.timeoutSeconds) + 30
    labels = warm_labels(fn)
    meta: dict[str, Any] = {"name": warm_name(fn), "namespace": fn.account, "labels": labels}
    if owner is not None:
        meta["ownerReferences"] = [owner]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": labels},
            "strategy": {"type": "RollingUpdate"},
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }
