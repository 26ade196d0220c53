"""`server` functions on Kubernetes: invocations go to the function's warm pods (a Deployment
the operator keeps, `controllers/warm_pools.py`), each through its proxy sidecar
(`kt-runtime proxy`), which holds the function's per-instance concurrency and answers 429
beyond it.

A dispatcher finds the pods by their labels, and the proxy's token in their spec (it may read
pods; a tenant's other pods cannot invoke the proxy without it). It sends each invocation to the
pod with the fewest of its own in flight. With no pod at all, it wakes the Deployment from zero
itself (replicas 0 -> 1) rather than wait for the operator's next look, and uses a new pod as
soon as its proxy answers ready — before the kubelet's readiness probe would say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from .. import kube_client, reserved_namespaces
from ..models import TaskFunction
from .base import Execution, Invocation, Lines, Outcome, Placement, encode_payload
from .frames import ANSWER, CODE, STDERR, STDOUT, FrameReader
from .http1 import Http1Pool, InstanceUnreachable
from .pod_template import (
    FUNCTION_CONTAINER,
    PROXY_PORT,
    PROXY_TOKEN,
    SIDECAR_CONTAINER,
    warm_name,
)
from .server import answered, interrupted, invocation_headers

log = logging.getLogger("kubetask.executors.warm")

LIST_EVERY = 1.0  # how stale the list of a function's pods may be while it is used
WAITING_LIST_EVERY = 0.2  # while no pod can take an invocation
WAKE_EVERY = 2.0
PROBE_TIMEOUT = 1.0
# An invocation still running after this is recorded with its pod (`kubetask login`); shorter
# ones are not, which spares the task's record a write per invocation.
PLACE_AFTER = 0.25


@dataclass(eq=False)
class WarmPod:
    name: str
    ip: str
    node: str | None
    token: str
    ready: bool  # the kubelet says so, or its proxy answered /ready
    kubelet_ready: bool
    http: Http1Pool = field(init=False)
    inflight: int = 0

    def __post_init__(self) -> None:
        self.http = Http1Pool(PROXY_PORT, self.ip)


def _proxy_token(pod: Any) -> str | None:
    for c in pod.spec.init_containers or []:
        if c.name == SIDECAR_CONTAINER:
            for e in c.env or []:
                if e.name == PROXY_TOKEN:
                    return str(e.value)
    return None


class WarmPool:
    """The warm pods of one function, as this dispatcher sees them."""

    def __init__(self, fn: TaskFunction) -> None:
        self.fn = fn
        self.pods: dict[str, WarmPod] = {}
        self._listed_at = float("-inf")
        self._woken_at = float("-inf")
        self._listing: asyncio.Task[None] | None = None

    @property
    def capacity(self) -> int:
        assert self.fn.spec.server is not None
        return self.fn.spec.server.concurrency

    async def _list(self) -> None:
        selector = f"kubetask.io/warm=true,kubetask.io/function={self.fn.name}"

        def call() -> list[Any]:
            kube_client.load()
            found = client.CoreV1Api().list_namespaced_pod(self.fn.account, label_selector=selector)
            return list(found.items)

        listed = await asyncio.to_thread(call)
        seen: dict[str, WarmPod] = {}
        for pod in listed:
            ip, token = pod.status.pod_ip, _proxy_token(pod)
            if pod.metadata.deletion_timestamp is not None or not ip or token is None:
                continue  # going (it drains what it has), or not started yet
            ready = any(
                c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []
            )
            known = self.pods.get(pod.metadata.name)
            if known is not None and known.ip == ip:
                # Ready by its own answer before the kubelet said so; not ready once the kubelet
                # no longer says so (a server that crashed or hangs).
                known.ready = ready or (known.ready and not known.kubelet_ready)
                known.kubelet_ready = ready
                seen[known.name] = known
            else:
                name = pod.metadata.name
                seen[name] = WarmPod(name, ip, pod.spec.node_name, token, ready, ready)
        for name, gone in self.pods.items():
            if name not in seen:
                gone.http.close()
        self.pods = seen
        self._listed_at = asyncio.get_running_loop().time()

    async def refresh(self, every: float) -> None:
        """List the pods if the list is older than `every`; callers at the same moment share
        one listing."""
        if asyncio.get_running_loop().time() - self._listed_at < every:
            return
        if self._listing is None or self._listing.done():
            self._listing = asyncio.create_task(self._list())
        await asyncio.shield(self._listing)

    def _take(self) -> WarmPod | None:
        free = [p for p in self.pods.values() if p.ready and p.inflight < self.capacity]
        if not free:
            return None
        best = min(free, key=lambda p: p.inflight)
        best.inflight += 1
        return best

    async def acquire(self) -> WarmPod:
        server = self.fn.spec.server
        assert server is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + server.startupTimeoutSeconds
        await self.refresh(LIST_EVERY)
        while (pod := self._take()) is None:
            if not self.pods and loop.time() - self._woken_at >= WAKE_EVERY:
                self._woken_at = loop.time()
                await wake(self.fn)
            await asyncio.gather(*(self._probe(p) for p in self.pods.values() if not p.ready))
            if (pod := self._take()) is not None:
                return pod
            if loop.time() > deadline:
                raise RuntimeError(
                    f"no warm pod of {self.fn.name} could take it within"
                    f" {server.startupTimeoutSeconds:g}s ({len(self.pods)} running)"
                )
            await asyncio.sleep(0.05)
            await self.refresh(WAITING_LIST_EVERY)
        return pod

    async def _probe(self, pod: WarmPod) -> None:
        """A new pod is used as soon as its proxy says its server is ready."""
        request = pod.http.encode(b"GET", "/ready", {}, b"")
        with contextlib.suppress(InstanceUnreachable, TimeoutError):
            conn = await asyncio.wait_for(pod.http.connection(), PROBE_TIMEOUT)
            status, _ = await asyncio.wait_for(conn.send(request, 4096), PROBE_TIMEOUT)
            pod.ready = status == 200

    def release(self, pod: WarmPod) -> None:
        pod.inflight -= 1


async def wake(fn: TaskFunction) -> None:
    """Scale the function's Deployment from zero to one; the operator takes it from there."""
    name = warm_name(fn)

    def call() -> None:
        kube_client.load()
        apps = client.AppsV1Api()
        scale = apps.read_namespaced_deployment_scale(name, fn.account)
        if scale.spec is None or not scale.spec.replicas:
            apps.patch_namespaced_deployment_scale(name, fn.account, {"spec": {"replicas": 1}})
            log.info("woke %s/%s from zero", fn.account, fn.name)

    try:
        await asyncio.to_thread(call)
    except ApiException as err:  # not made yet by the operator: the next look finds it
        log.warning("cannot wake %s/%s: %s %s", fn.account, fn.name, err.status, err.reason)


class WarmExecution:
    """One invocation through a pod's proxy. Stop and timeout abandon it by closing its
    connection, which the proxy passes on to the function's server."""

    def __init__(self, pool: WarmPool, pod: WarmPod, inv: Invocation) -> None:
        self.pool = pool
        self.pod = pod
        self.inv = inv
        self.instance: str | None = pod.name
        self._interrupted: str | None = None
        self._cancel: Callable[[], None] | None = None

    async def wait(self) -> Outcome:
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.inv.timeout, self._interrupt, "timeout")
        placing = loop.call_later(PLACE_AFTER, self._place)
        try:
            return await self._invoke()
        finally:
            timer.cancel()
            placing.cancel()
            self.pool.release(self.pod)

    def _place(self) -> None:
        if self.inv.placed is not None:
            pod = self.pod
            self.inv.placed(Placement(pod.name, self.inv.account, pod.node, FUNCTION_CONTAINER))

    async def _invoke(self) -> Outcome:
        headers = invocation_headers(self.inv)
        headers["Authorization"] = f"Bearer {self.pod.token}"
        http = self.pod.http
        request = http.encode(b"POST", "/invoke", headers, encode_payload(self.inv.payload))
        frames = FrameReader()
        refusal = bytearray()  # the proxy's own 4xx/5xx (busy, draining) is plain text
        found: list[tuple[int, bytes]] = []
        out, err = Lines(), Lines()

        def chunk(status: int, data: bytes) -> None:
            """An accepted invocation is answered in frames: what the server printed while it
            ran (its task's log, as it comes), then the server's status and body. Past its
            account's pace the answer is not read for a while; the proxy holds 1,024 frames
            an invocation meanwhile and drops (and counts) what comes past them."""
            if status != 200:
                refusal.extend(data[: 4096 - len(refusal)])
                return
            printed = bytearray()
            for kind, frame in frames.feed(data):
                if kind in (STDOUT, STDERR):
                    printed += frame
                    said = (out if kind == STDOUT else err).feed(frame)
                elif kind == ANSWER and len(frame) >= CODE.size:
                    said = out.rest() + err.rest()
                    found.append((CODE.unpack_from(frame)[0], frame[CODE.size :]))
                else:
                    said = []
                for line in said:
                    self.inv.log("instance", line)
            if printed and self.inv.pace is not None:
                wait = self.inv.pace(bytes(printed))
                if wait > 0 and not found:
                    conn.pause(wait)

        try:
            conn = await http.connection()
            if self._interrupted:
                conn.abort()
                raise InstanceUnreachable("interrupted")
            answer = conn.send(request, self.inv.max_result_bytes, chunk)
            self._cancel = lambda: conn.cancel(answer)
            try:
                status, _ = await answer
            except asyncio.CancelledError:
                conn.cancel(answer)
                raise
        except InstanceUnreachable as err:
            cut = interrupted(self._interrupted, self.inv, self.instance)
            if cut is not None:
                return cut
            self.pod.ready = False  # listed again before it is used again
            return Outcome(False, error=f"warm pod unreachable: {err}", instance=self.instance)
        if status != 200:
            return answered(status, bytes(refusal), self.inv, self.instance)
        if not found:
            return Outcome(False, error="the pod's proxy gave no answer", instance=self.instance)
        status, body = found[0]
        if status == 502:  # the proxy could not reach the function's server
            return Outcome(False, error=body[:500].decode(errors="replace"), instance=self.instance)
        return answered(status, body, self.inv, self.instance)

    def _interrupt(self, reason: str) -> None:
        if self._interrupted is None:
            self._interrupted = reason
        if self._cancel is not None:
            self._cancel()

    async def kill(self) -> None:
        self._interrupt("stop")


class WarmPodExecutor:
    def __init__(self, platform: str | None = None) -> None:
        """`platform`: the platform's namespace, where no warm pod is woken or asked."""
        self._pools: dict[tuple[str, str], WarmPool] = {}
        self.platform = platform

    def pool_for(self, fn: TaskFunction) -> WarmPool:
        pool = self._pools.get((fn.account, fn.name))
        if pool is None:
            pool = self._pools[(fn.account, fn.name)] = WarmPool(fn)
        pool.fn = fn
        return pool

    async def start(self, inv: Invocation) -> Execution:
        reserved_namespaces.check(inv.account, self.platform)
        pool = self.pool_for(inv.function)
        return WarmExecution(pool, await pool.acquire(), inv)

    async def close(self) -> None:
        for pool in self._pools.values():
            for pod in pool.pods.values():
                pod.http.close()
