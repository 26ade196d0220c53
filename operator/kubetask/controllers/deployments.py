"""The Deployments the operator owns — the gateway and the dispatchers — and the scaler that
sets the dispatchers' replicas from the backlog of every function's consumer, and never below
the number of partitions with work (each partition is consumed by one dispatcher at a time, so
that many replicas can all be busy).

Scaling up is immediate; scaling down waits `cooldown` seconds after the last change, so a
backlog that dips for a moment does not make replicas flap.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from .. import names as kt_names
from .. import queues
from ..dispatch.pod_identity import POD_ENV
from ..plane import DataPlane
from . import operator_metrics
from .context import OperatorConfig
from .kube import apply_deployment, get_replicas, set_replicas

log = logging.getLogger("kubetask.operator.scaler")


METRICS_PORT = 9090
RUNTIME_PORT = 9091
DISPATCHER_ARGS = ["dispatcher", "--metrics-host", "0.0.0.0", "--metrics-port", str(METRICS_PORT)]


def names(cfg: OperatorConfig) -> tuple[str, str]:
    return f"{cfg.release}-gateway", f"{cfg.release}-dispatcher"


def _nats_user(cfg: OperatorConfig, component: str) -> list[dict[str, Any]]:
    """The component's NATS user, its password from the chart's Secret; a dispatcher also gets
    the destinations user it publishes subject destinations as."""

    def secret(key: str) -> dict[str, Any]:
        return {"secretKeyRef": {"name": cfg.nats_users_secret, "key": key}}

    env: list[dict[str, Any]] = [
        {"name": "KUBETASK_NATS_USER", "value": component},
        {"name": "KUBETASK_NATS_PASSWORD", "valueFrom": secret(component)},
    ]
    # Not a NATS user: the token that reads every series of /metrics, generated beside them.
    env.append({"name": "KUBETASK_METRICS_TOKEN", "valueFrom": secret("metrics")})
    if component == "dispatcher":
        env += [
            {"name": "KUBETASK_DESTINATIONS_NATS_USER", "value": "destinations"},
            {"name": "KUBETASK_DESTINATIONS_NATS_PASSWORD", "valueFrom": secret("destinations")},
        ]
    return env


def _deployment(
    cfg: OperatorConfig, name: str, component: str, args: list[str], replicas: int, nats_url: str
) -> dict[str, Any]:
    labels = {"app.kubernetes.io/instance": cfg.release, "app.kubernetes.io/component": component}
    container: dict[str, Any] = {
        "name": component,
        "image": cfg.image,
        "args": args,
        "env": [
            {"name": "KUBETASK_NATS_URL", "value": nats_url},
            {"name": "KUBETASK_STREAM_REPLICAS", "value": str(cfg.stream_replicas)},
            *_nats_user(cfg, component),
        ],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    if cfg.config_map:  # `env` above wins over a setting of the same name there
        container["envFrom"] = [{"configMapRef": {"name": cfg.config_map}}]
    pod: dict[str, Any] = {
        "serviceAccountName": f"{cfg.release}-dataplane",
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
        "containers": [container],
    }
    if component == "dispatcher":
        container["ports"] = [{"name": "metrics", "containerPort": METRICS_PORT}]
        container["env"].append({"name": "KUBETASK_EXECUTOR", "value": cfg.executor})
        if cfg.executor == "kubernetes":
            # Jobs run the platform's image as their sidecar (and for functions naming none),
            # and their sidecars call this pod back at its address (`runtime_server.py`).
            container["ports"].append({"name": "runtime", "containerPort": RUNTIME_PORT})
            container["env"] += [
                {"name": "KUBETASK_IMAGE", "value": cfg.image},
                {"name": "KUBETASK_RUNTIME_PORT", "value": str(RUNTIME_PORT)},
                {
                    "name": "KUBETASK_POD_IP",
                    "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
                },
            ]
            pod["serviceAccountName"] = f"{cfg.release}-dispatcher"
            pod["automountServiceAccountToken"] = True
        # Recorded on every attempt it runs (`dispatch/pod_identity.py`): `kubetask login`.
        container["env"] += [
            {"name": POD_ENV["pod"], "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {
                "name": POD_ENV["namespace"],
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
            },
            {"name": POD_ENV["container"], "value": component},
            {"name": POD_ENV["node"], "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        ]
    if component == "gateway":
        container["ports"] = [{"name": "http", "containerPort": 8080}]
        # Ready once NATS is reachable and the task index has caught up (`gateway/indexing.py`).
        container["readinessProbe"] = {
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": 2,
        }
        container["volumeMounts"] = [
            {"name": "tokens", "mountPath": "/etc/kubetask", "readOnly": True},
            {"name": "index", "mountPath": "/var/lib/kubetask"},
        ]
        # The task index outlives a container restart (a pod moved elsewhere rebuilds it).
        container["env"].append(
            {"name": "KUBETASK_INDEX_PATH", "value": "/var/lib/kubetask/index/tasks.sqlite3"}
        )
        pod["volumes"] = [
            {"name": "tokens", "secret": {"secretName": cfg.tokens_secret}},
            {"name": "index", "emptyDir": {}},
        ]
    template_meta: dict[str, Any] = {"labels": labels}
    if cfg.config_checksum:
        template_meta["annotations"] = {"kubetask.io/config-checksum": cfg.config_checksum}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": template_meta, "spec": pod},
        },
    }


async def ensure_deployments(cfg: OperatorConfig, nats_url: str) -> None:
    gateway, dispatcher = names(cfg)
    await apply_deployment(
        cfg.namespace,
        _deployment(
            cfg,
            gateway,
            "gateway",
            [
                "gateway",
                "--host",
                "0.0.0.0",
                "--port",
                "8080",
                "--tokens",
                "/etc/kubetask/tokens.json",
            ],
            cfg.gateway_replicas,
            nats_url,
        ),
    )
    await apply_deployment(
        cfg.namespace,
        _deployment(cfg, dispatcher, "dispatcher", DISPATCHER_ARGS, cfg.dispatcher_min, nats_url),
    )


def desired_replicas(cfg: OperatorConfig, backlog: int, busy_partitions: int = 0) -> int:
    wanted = max(math.ceil(backlog / max(cfg.target_backlog, 1)), busy_partitions)
    return max(cfg.dispatcher_min, min(cfg.dispatcher_max, wanted))


async def total_backlog(plane: DataPlane) -> tuple[int, int]:
    """(tasks waiting or running, partitions of partitioned functions that have any)."""
    total = busy = 0
    for fn in list(plane.registry.functions.values()):
        for queue in kt_names.queues_of(fn):
            try:
                waiting, running = await queues.queue_backlog(plane.js, queue)
            except Exception:
                continue  # queue not there (yet)
            total += waiting + running
            busy += queue.partition is not None and waiting + running > 0
    return total, busy


async def scale_forever(cfg: OperatorConfig, plane: DataPlane) -> None:
    _, dispatcher = names(cfg)
    last_change = 0.0
    while True:
        try:
            backlog, busy_partitions = await total_backlog(plane)
            want = desired_replicas(cfg, backlog, busy_partitions)
            operator_metrics.BACKLOG.set(backlog)
            operator_metrics.DISPATCHERS_WANTED.set(want)
            have = await get_replicas(cfg.namespace, dispatcher)
            now = time.monotonic()
            if have is not None and want != have:
                if want > have or now - last_change >= cfg.cooldown:
                    await set_replicas(cfg.namespace, dispatcher, want)
                    last_change = now
                    log.info(
                        "dispatchers %d -> %d (backlog %d, %d partitions with work)",
                        have,
                        want,
                        backlog,
                        busy_partitions,
                    )
        except Exception:
            log.exception("scaling pass failed")
        await asyncio.sleep(cfg.scale_interval)
