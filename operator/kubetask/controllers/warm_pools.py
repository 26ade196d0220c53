"""The warm pods of `server` functions on Kubernetes (the kubernetes executor): a Deployment
per function in its namespace (`executors/pod_template.py` `warm_deployment`), kept in line with
the function, and its replicas kept at what the demand needs.

Demand is the function's tasks waiting and running (its consumer's counts); replicas follow it
as ceil(demand / per-instance concurrency), up to `maxInstances`. Up at once (a dispatcher even
wakes a Deployment from zero itself, `executors/warm_pods.py`); down only once the current count
has not been needed for the function's `idleSeconds`, so a backlog that dips for a moment does
not make pods flap — and to zero the same way. Scale-down never cuts an invocation short: the
pod the ReplicaSet picks drains first (its preStop hook, `kt-runtime drain`); what arrives
meanwhile is answered "busy" and goes to another pod, with no attempt spent.

A Deployment whose function is gone (or is no longer a server) is deleted; one owned by its
TaskFunction goes with it anyway.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from .. import kube_client, queues, reserved_namespaces
from ..executors.pod_template import PROXY_TOKEN, SIDECAR_CONTAINER, warm_deployment, warm_name
from ..models import TaskFunction
from ..plane import DataPlane
from .context import OperatorConfig
from .kube import apply_deployment, set_replicas

log = logging.getLogger("kubetask.operator.warm")

INTERVAL = 1.0
SELECTOR = "kubetask.io/warm=true"


@dataclass
class Seen:
    replicas: int
    token: str | None  # the proxy's, kept across updates so dispatchers' copies stay valid


@dataclass
class Pool:
    applied: Any = None  # the function as last applied to its Deployment
    needed_at: float = 0.0  # when the current replicas were last all needed


def wanted(fn: TaskFunction, demand: int) -> int:
    server = fn.spec.server
    assert server is not None
    return min(server.maxInstances, math.ceil(demand / server.concurrency))


def next_replicas(fn: TaskFunction, pool: Pool, have: int, demand: int, now: float) -> int:
    """Up at once; down once `have` has not been needed for the function's idle time."""
    server = fn.spec.server
    assert server is not None
    want = wanted(fn, demand)
    if want >= have:
        pool.needed_at = now
        return want
    if now - pool.needed_at >= server.idleSeconds:
        pool.needed_at = now
        return want
    return have


async def _deployments() -> dict[tuple[str, str], Seen]:
    def call() -> dict[tuple[str, str], Seen]:
        kube_client.load()
        found = client.AppsV1Api().list_deployment_for_all_namespaces(label_selector=SELECTOR)
        seen = {}
        items: list[Any] = list(found.items)
        for d in items:
            token = None
            for c in d.spec.template.spec.init_containers or []:
                if c.name == SIDECAR_CONTAINER:
                    token = next((e.value for e in c.env or [] if e.name == PROXY_TOKEN), None)
            seen[(d.metadata.namespace, d.metadata.name)] = Seen(d.spec.replicas or 0, token)
        return seen

    return await asyncio.to_thread(call)


async def _delete(namespace: str, name: str) -> None:
    def call() -> None:
        kube_client.load()
        try:
            client.AppsV1Api().delete_namespaced_deployment(name, namespace)
        except ApiException as err:
            if err.status != 404:
                raise

    await asyncio.to_thread(call)


class WarmPools:
    def __init__(self, cfg: OperatorConfig, plane: DataPlane) -> None:
        self.cfg = cfg
        self.plane = plane
        self.pools: dict[tuple[str, str], Pool] = {}
        self.refused: set[tuple[str, str]] = set()

    async def pass_once(self) -> None:
        seen = await _deployments()
        now = time.monotonic()
        servers = {
            (fn.account, warm_name(fn)): fn
            for fn in list(self.plane.registry.functions.values())
            if fn.spec.server is not None and self._allowed(fn)
        }
        for key, fn in servers.items():
            try:
                await self._keep(key, fn, seen.get(key), now)
            except Exception as err:
                log.warning("warm pods of %s/%s: %s", fn.account, fn.name, err)
        for namespace, name in seen:
            if (namespace, name) not in servers:
                log.info("deleting warm pods of %s/%s: no such server function", namespace, name)
                await _delete(namespace, name)
                self.pools.pop((namespace, name), None)

    def _allowed(self, fn: TaskFunction) -> bool:
        """No warm pods in a reserved namespace (`reserved_namespaces.py`); said once."""
        why = reserved_namespaces.refusal(fn.account, self.cfg.namespace)
        if why is not None and (fn.account, fn.name) not in self.refused:
            self.refused.add((fn.account, fn.name))
            log.warning("no warm pods for %s/%s: %s", fn.account, fn.name, why)
        return why is None

    async def _keep(
        self, key: tuple[str, str], fn: TaskFunction, found: Seen | None, now: float
    ) -> None:
        pool = self.pools.setdefault(key, Pool(needed_at=now))
        if found is None or pool.applied != fn.spec:
            token = (found and found.token) or secrets.token_urlsafe(32)
            owner = await kube_client.function_owner(fn)
            await apply_deployment(fn.account, warm_deployment(fn, self.cfg.image, token, owner))
            pool.applied = fn.spec
        have = found.replicas if found is not None else 0
        waiting, running = await queues.backlog(self.plane.js, fn)
        replicas = next_replicas(fn, pool, have, waiting + running, now)
        if replicas != have:
            log.info(
                "warm pods of %s/%s: %d -> %d (%d waiting, %d running)",
                fn.account,
                fn.name,
                have,
                replicas,
                waiting,
                running,
            )
            await set_replicas(fn.account, key[1], replicas)


async def keep_forever(cfg: OperatorConfig, plane: DataPlane) -> None:
    pools = WarmPools(cfg, plane)
    while True:
        try:
            await pools.pass_once()
        except Exception:
            log.exception("warm pools pass failed")
        await asyncio.sleep(INTERVAL)
