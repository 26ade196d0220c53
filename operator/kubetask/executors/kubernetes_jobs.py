"""`command` functions on Kubernetes: a Job per attempt, in the function's namespace (its
account), running the function's image with the runtime sidecar beside it (`pod_template.py`).

The Job does nothing on its own account: `backoffLimit: 0` (retries are kubetask's, decided by
the dispatcher like any failed attempt), `activeDeadlineSeconds` from the function's timeout
plus the time a pod may take to start (a backstop: the dispatcher enforces the timeout itself),
a TTL after it finishes (its pod's logs stay for `kubectl logs` that long), labels naming
account, function, task and attempt, and the TaskFunction as owner where it is a Kubernetes
object, so deleting a function deletes its Jobs.

The attempt's state comes from the sidecar (`runtime_server.py`): where it runs, output, exit.
Kubernetes is asked only while the pod has not started, to fail at once on what will never
start (an image that is not there, a missing Secret) instead of waiting out the start timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from .. import kube_client, reserved_namespaces
from ..models import TaskFunction
from ..settings import env_float, env_int, env_str
from .base import Execution, Invocation, Outcome, decode_result, env_for
from .pod_template import function_container, installing, pod_spec, sidecar
from .runtime_server import RuntimeAttempt, RuntimeServer

log = logging.getLogger("kubetask.executors.jobs")

# A container waiting for one of these will not start by waiting longer.
NEVER_STARTS = {
    "ErrImageNeverPull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
}
STARTING = (None, "ContainerCreating", "PodInitializing")
# A pod that has not started its function is looked at this often: a normal start needs no
# look (the sidecar says when it runs), and 20 Jobs starting at once, polled every second,
# made 20 pod listings a second on a node already busy starting them.
POLL_START = 2.0
KILL_GRACE_SECONDS = 2
OWNER_TTL = 30.0


class JobRefused(Exception):
    """The API server's answer, for a person: accounts are namespaces, and one that does not
    exist on the cluster is the usual reason."""

    def __init__(self, namespace: str, err: ApiException) -> None:
        try:
            message = json.loads(err.body or "{}").get("message") or err.reason
        except ValueError:
            message = err.reason
        if err.status == 404 and "namespaces" in str(message):
            message = (
                f"account {namespace!r} has no namespace on this cluster (accounts are "
                f"namespaces): kubectl create namespace {namespace}"
            )
        super().__init__(f"the Job was refused: {err.status} {message}")


def _pod_ip() -> str:
    return os.environ.get("KUBETASK_POD_IP") or socket.gethostbyname(socket.gethostname())


@dataclass(frozen=True)
class JobSettings:
    # The image of the sidecar, and of a function that names none.
    image: str = field(
        default_factory=lambda: env_str(
            "KUBETASK_IMAGE", "docker.io/kubetask/kubetask:dev", "an image"
        )
    )
    # Where sidecars call this dispatcher back (its pod's address on Kubernetes).
    port: int = field(default_factory=lambda: env_int("KUBETASK_RUNTIME_PORT", 9091, 1, 65535))
    # Empty: the pod's IP, looked up when first needed (reading the settings asks no DNS).
    address: str = field(
        default_factory=lambda: env_str("KUBETASK_RUNTIME_ADDRESS", "", "an address")
    )
    ttl: int = field(default_factory=lambda: env_int("KUBETASK_JOB_TTL_SECONDS", 600, 0))
    # A pod that has not started its function by then fails the attempt (image pulls included).
    start_timeout: float = field(
        default_factory=lambda: env_float("KUBETASK_POD_START_TIMEOUT", 300.0, 1)
    )
    # A sidecar heartbeats every 5 s; silent this long, its attempt is lost (node gone).
    lost_after: float = field(
        default_factory=lambda: env_float("KUBETASK_RUNTIME_LOST_AFTER", 30.0, 1)
    )


def task_hash(task_id: str) -> str:
    """Task ids may be longer than a label value or hold characters a name may not."""
    return hashlib.sha256(task_id.encode()).hexdigest()[:16]


def job_name(inv: Invocation) -> str:
    return f"{inv.function.name[:30].rstrip('-')}-{task_hash(inv.task_id)[:12]}-{inv.attempt}"


def labels(inv: Invocation) -> dict[str, str]:
    found = {
        "app.kubernetes.io/managed-by": "kubetask",
        "kubetask.io/account": inv.account,
        "kubetask.io/function": inv.function.name,
        "kubetask.io/task-hash": task_hash(inv.task_id),
        "kubetask.io/attempt": str(inv.attempt),
    }
    tid = inv.task_id
    if len(tid) <= 63 and tid[-1].isalnum():  # also a valid label value: selectable by id
        found["kubetask.io/task"] = tid
    return found


class JobExecution:
    def __init__(self, ex: JobExecutor, inv: Invocation, attempt: RuntimeAttempt) -> None:
        self._ex = ex
        self.inv = inv
        self._attempt = attempt
        self.name = job_name(inv)
        self.instance: str | None = self.name
        self._stopped: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        attempt.placed.add_done_callback(self._placed)

    def _placed(self, placed: asyncio.Future[Any]) -> None:
        if placed.cancelled():
            return
        where = placed.result()
        self.instance = where.pod
        if self.inv.placed is not None:
            self.inv.placed(where)

    def _failed(self, error: str, code: int | None = None, **flags: bool) -> Outcome:
        a = self._attempt
        return Outcome(
            False,
            error=error,
            exit_code=code,
            instance=self.instance,
            stdout_tail=a.stdout_tail.text(),
            stderr_tail=a.stderr_tail.text(),
            **flags,
        )

    async def wait(self) -> Outcome:
        try:
            return await self._follow()
        finally:
            self._ex.runtime.forget(self._attempt)

    async def _until(self, timeout: float, *futures: asyncio.Future[Any]) -> None:
        """Until one of `futures` or a stop, or the timeout (which cancels none of them: a
        shield per wait would pile callbacks on a day-long attempt's futures)."""
        await asyncio.wait(
            [*futures, self._stopped], timeout=max(timeout, 0), return_when=asyncio.FIRST_COMPLETED
        )

    async def _follow(self) -> Outcome:
        loop = asyncio.get_running_loop()
        a, settings = self._attempt, self._ex.settings
        start_by = loop.time() + settings.start_timeout
        while not a.running.done():
            await self._until(min(POLL_START, start_by - loop.time()), a.running)
            if self._stopped.done():
                return self._failed("stopped", killed=True)
            if a.running.done():
                break
            problem = await self._ex.pod_problem(self.inv.account, self.name)
            if loop.time() >= start_by or (problem and problem[0] in NEVER_STARTS):
                await self._ex.delete(self.inv.account, self.name, self._pod())
                why = f": {problem[0]}: {problem[1]}" if problem else ""
                return self._failed(
                    f"its pod did not start within {settings.start_timeout:g}s{why}"
                    if not problem or problem[0] not in NEVER_STARTS
                    else f"its pod cannot start{why}"
                )
        end_by = loop.time() + self.inv.timeout
        while not a.exited.done():
            wait = min(end_by - loop.time(), settings.lost_after / 3)
            await self._until(wait, a.exited, a.overflowed)
            if self._stopped.done():
                return self._failed("stopped", killed=True)
            if a.exited.done():
                break
            if a.overflowed.done():  # failed whatever it prints next: not read to its end
                await self._ex.delete(self.inv.account, self.name, self._pod())
                return self._failed(f"result exceeds {self.inv.max_result_bytes} bytes")
            if loop.time() >= end_by:
                await self._ex.delete(self.inv.account, self.name, self._pod())
                return self._failed(f"timed out after {self.inv.timeout:g}s", timed_out=True)
            if loop.time() - a.contact > settings.lost_after:
                await self._ex.delete(self.inv.account, self.name, self._pod())
                return self._failed(
                    f"lost its pod: no word from its sidecar for {settings.lost_after:g}s"
                )
        code = a.exited.result()
        if a.terminated:
            return self._failed("its pod was stopped (deleted or evicted) while it ran", code)
        if a.too_big:
            return self._failed(f"result exceeds {self.inv.max_result_bytes} bytes", code)
        if code != 0:
            reason = f"killed by signal {code - 128}" if code > 128 else f"exited with code {code}"
            return self._failed(reason, code)
        return Outcome(
            True, result=decode_result(bytes(a.stdout)), exit_code=0, instance=self.instance
        )

    def _pod(self) -> str | None:
        placed = self._attempt.placed
        return placed.result().pod if placed.done() else None

    async def kill(self) -> None:
        if not self._stopped.done():
            self._stopped.set_result(None)
        await self._ex.delete(self.inv.account, self.name, self._pod())


class JobExecutor:
    def __init__(self, settings: JobSettings | None = None, platform: str | None = None) -> None:
        """`platform`: the platform's namespace, where no Job is made."""
        self.settings = settings or JobSettings()
        self.platform = platform
        self.runtime = RuntimeServer("0.0.0.0", self.settings.port)
        self._owners: dict[tuple[str, str], tuple[float, dict[str, Any] | None]] = {}

    @property
    def url(self) -> str:
        return f"http://{self.settings.address or _pod_ip()}:{self.runtime.port}"

    async def start(self, inv: Invocation) -> Execution:
        reserved_namespaces.check(inv.account, self.platform)
        await self.runtime.start()
        attempt = self.runtime.open(inv, job_name(inv))
        try:
            if inv.attempt > 1:  # an earlier attempt's pod may outlive its dispatcher
                await self._delete_earlier(inv)
            body = self.job(inv, attempt.token, await self._owner(inv.function))
            await asyncio.to_thread(self._create, inv.account, body)
        except BaseException:
            self.runtime.forget(attempt)
            raise
        return JobExecution(self, inv, attempt)

    def job(self, inv: Invocation, token: str, owner: dict[str, Any] | None) -> dict[str, Any]:
        fn = inv.function
        assert fn.spec.command is not None
        runtime_env = [
            {"name": "KUBETASK_RUNTIME_URL", "value": self.url},
            {"name": "KUBETASK_RUNTIME_TOKEN", "value": token},
        ]
        container = function_container(fn, fn.spec.command, env_for(inv, {}), self.settings.image)
        meta: dict[str, Any] = {
            "name": job_name(inv),
            "namespace": inv.account,
            "labels": labels(inv),
            "annotations": {"kubetask.io/task-id": inv.task_id},
        }
        if owner is not None:
            meta["ownerReferences"] = [owner]
        deadline = math.ceil(inv.timeout + self.settings.start_timeout)
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": meta,
            "spec": {
                "backoffLimit": 0,
                "activeDeadlineSeconds": deadline,
                "ttlSecondsAfterFinished": self.settings.ttl,
                "template": {
                    "metadata": {"labels": labels(inv)},
                    "spec": {
                        **pod_spec(
                            fn, [container], installing(sidecar(self.settings.image, runtime_env))
                        ),
                        "restartPolicy": "Never",
                    },
                },
            },
        }

    def _create(self, namespace: str, body: dict[str, Any]) -> None:
        kube_client.load()
        try:
            client.BatchV1Api().create_namespaced_job(namespace, body)  # type: ignore[arg-type]
        except ApiException as err:
            raise JobRefused(namespace, err) from None

    async def _owner(self, fn: TaskFunction) -> dict[str, Any] | None:
        """The function's TaskFunction object as owner, if it is one (a function registered
        over HTTP alone is not); looked up at most every OWNER_TTL seconds."""
        key = (fn.account, fn.name)
        now = asyncio.get_running_loop().time()
        cached = self._owners.get(key)
        if cached is not None and now - cached[0] < OWNER_TTL:
            return cached[1]

        owner = await kube_client.function_owner(fn)
        self._owners[key] = (now, owner)
        return owner

    async def _delete_earlier(self, inv: Invocation) -> None:
        selector = (
            f"kubetask.io/task-hash={task_hash(inv.task_id)},kubetask.io/attempt!={inv.attempt}"
        )

        def call() -> None:
            kube_client.load()
            client.BatchV1Api().delete_collection_namespaced_job(
                inv.account, label_selector=selector, propagation_policy="Background"
            )

        await asyncio.to_thread(call)

    async def delete(self, namespace: str, name: str, pod: str | None) -> None:
        """Stop an attempt: its Job goes, and its pod at once (SIGTERM, then SIGKILL after a
        short grace) rather than after the pod's own grace period."""

        def call() -> None:
            kube_client.load()
            with contextlib.suppress(ApiException):
                client.BatchV1Api().delete_namespaced_job(
                    name, namespace, propagation_policy="Background"
                )
            if pod is not None:
                with contextlib.suppress(ApiException):
                    client.CoreV1Api().delete_namespaced_pod(
                        pod, namespace, grace_period_seconds=KILL_GRACE_SECONDS
                    )

        try:
            await asyncio.to_thread(call)
        except Exception as err:  # the Job's TTL and deadline still end it
            log.warning("could not delete job %s/%s: %s", namespace, name, err)

    async def pod_problem(self, namespace: str, job: str) -> tuple[str, str] | None:
        """Why the Job's pod is not running yet, as (reason, message), if it says."""

        def call() -> tuple[str, str] | None:
            kube_client.load()
            pods = client.CoreV1Api().list_namespaced_pod(
                namespace, label_selector=f"job-name={job}"
            )
            for pod in pods.items:
                status = pod.status
                if status is None:
                    continue
                statuses = [
                    *(status.init_container_statuses or []),
                    *(status.container_statuses or []),
                ]
                for cs in statuses:
                    waiting = cs.state and cs.state.waiting
                    if waiting and waiting.reason not in STARTING:
                        return str(waiting.reason), str(waiting.message or "")
                for cond in status.conditions or []:
                    if cond.type == "PodScheduled" and cond.status == "False":
                        return str(cond.reason or "Unschedulable"), str(cond.message or "")
            return None

        try:
            return await asyncio.to_thread(call)
        except Exception as err:
            log.warning("could not read the pod of job %s/%s: %s", namespace, job, err)
            return None

    async def close(self) -> None:
        await self.runtime.close()
