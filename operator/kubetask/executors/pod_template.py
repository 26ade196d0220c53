"""The pod a function's attempt runs in on Kubernetes: the function's container — its image,
unchanged, its command started by the runtime's entry — beside the runtime sidecar, which the
platform injects (`runtime-sidecar/`).

What a function may set is the validated subset in `TaskFunctionSpec` (image, pull policy,
resources, env/envFrom, working directory, service account, node selector, tolerations).
Everything else is the platform's: no host namespaces, volumes or privileges, no privilege
escalation, the runtime's default seccomp profile, no service-account token unless the function
names an account, no service links.
"""

from __future__ import annotations

from typing import Any

from ..models import TaskFunction

RUNTIME_DIR = "/kt"
RUNTIME_VOLUME = "kt-runtime"
RUNTIME_BINARY = "/usr/local/bin/kt-runtime"  # in kubetask's image (e2e/build_images.py)
FUNCTION_CONTAINER = "function"
SIDECAR_CONTAINER = "kt-runtime"
PLATFORM_UID = 10001


def _downward(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def sidecar(image: str, env: list[dict[str, Any]]) -> dict[str, Any]:
    """A native sidecar (an init container that keeps running): started before the function's
    container, stopped after it."""
    return {
        "name": SIDECAR_CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "restartPolicy": "Always",
        "command": [RUNTIME_BINARY, "sidecar"],
        "env": [
            *env,
            _downward("KUBETASK_POD_NAME", "metadata.name"),
            _downward("KUBETASK_POD_NAMESPACE", "metadata.namespace"),
            _downward("KUBETASK_NODE_NAME", "spec.nodeName"),
        ],
        "volumeMounts": [{"name": RUNTIME_VOLUME, "mountPath": RUNTIME_DIR}],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": {
            "runAsUser": PLATFORM_UID,
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
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
        "securityContext": {"allowPrivilegeEscalation": False},
    }
    if spec.workingDir:
        container["workingDir"] = spec.workingDir
    if spec.envFrom:
        container["envFrom"] = [e.model_dump(exclude_none=True) for e in spec.envFrom]
    if spec.resources is not None:
        container["resources"] = spec.resources.model_dump(exclude_defaults=True)
    return container


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
