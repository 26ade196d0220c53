"""`server` mode: warm instances that take invocations over HTTP on localhost, reused across
tasks — the custom-runtime model, for millisecond tasks where a process per task costs too much.

An instance is started with $PORT set, must answer `readinessPath` with 2xx when ready, and gets
each task as `POST invokePath` (JSON payload body; task id and attempt in headers). A 2xx reply is
success (its body is the result), anything else is a function error. Instances start lazily up
to `maxInstances`, each taking `concurrency` invocations at once, and stop after `idleSeconds`.
Stop or timeout of an invocation kills the instance when it serves nothing else, otherwise only
the request is abandoned (the instance cannot be told which of its invocations to drop).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..cancellation import cancel_and_wait
from ..models import TaskFunction
from .base import (
    Execution,
    Invocation,
    Lines,
    Outcome,
    decode_result,
    encode_payload,
    env_for,
    how_it_ended,
)
from .cgroups import Group, end_groups
from .cgroups import out_of_memory as groups_out_of_memory
from .function_users import FunctionUsers, RunAs
from .http1 import Http1Pool, InstanceUnreachable
from .instance_budget import InstanceBudget
from .instance_ports import InstancePorts, PortRules, listeners
from .parent_death import start_function
from .spawn import Child

# Readiness answers are read up to this size; their body is not used.
READINESS_BODY_LIMIT = 64 * 1024
# How long an instance that dropped an invocation's connection is given to be seen exiting.
EXIT_GRACE = 0.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(eq=False)
class Instance:
    name: str
    port: int
    proc: Child
    capacity: int
    # Its cgroups (`cgroups.py`): what it started ends with it.
    groups: list[Group] = field(default_factory=list)
    # What closes its port to other users (`instance_ports.py`), removed once it is gone.
    rules: PortRules | None = None
    inflight: set[Invocation] = field(default_factory=set)
    idle_since: float = 0.0
    dead: bool = False
    pump: asyncio.Task[None] | None = None
    last_line: str = ""  # what it said last, for an error when it will not start
    http: Http1Pool = field(init=False)

    def __post_init__(self) -> None:
        self.http = Http1Pool(self.port)

    async def terminate(self) -> None:
        self.dead = True
        self.http.close()
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        groups, self.groups = self.groups, []
        await end_groups(groups)
        rules, self.rules = self.rules, None
        if rules is not None:
            await rules.remove()


class InstancePool:
    """Instances of one function. Taking and returning a free instance never waits, so it is done
    without the lock; the lock serializes only the slow path (waiting for room, or starting an
    instance)."""

    def __init__(
        self,
        fn: TaskFunction,
        budget: InstanceBudget,
        pools: Iterable[InstancePool],
        user: RunAs | None,
        environment: dict[str, str],
        cgroups: Callable[[], list[Group]],
        ports: InstancePorts,
    ) -> None:
        self.fn = fn
        self.budget = budget
        self.user = user
        self.environment = environment  # what its instances' environments start from
        self.cgroups = cgroups  # new groups for each instance (`cgroups.py`)
        self.ports = ports
        self._pools = pools  # every function's, for room in the node's budget
        self.instances: list[Instance] = []
        self._changed = asyncio.Condition()
        self._waiting = 0
        self._starting = 0
        self._seq = 0

    @property
    def spec(self) -> Any:
        assert self.fn.spec.server is not None
        return self.fn.spec.server

    def _take_free(self, inv: Invocation) -> Instance | None:
        best: Instance | None = None
        for inst in self.instances:
            if not inst.dead and len(inst.inflight) < inst.capacity:
                if best is None or len(inst.inflight) < len(best.inflight):
                    best = inst
        if best is not None:
            best.inflight.add(inv)
        return best

    async def acquire(self, inv: Invocation) -> Instance:
        found = self._take_free(inv)
        if found is not None:
            return found
        async with self._changed:
            while True:
                found = self._take_free(inv)
                if found is not None:
                    return found
                live = sum(1 for i in self.instances if not i.dead)
                if live + self._starting < self.spec.maxInstances:
                    break
                self._waiting += 1
                try:
                    await self._changed.wait()
                finally:
                    self._waiting -= 1
            self._starting += 1
        try:
            await self.budget.room(self._pools, self)
            inst = await self._spawn(inv)
        finally:
            async with self._changed:
                self._starting -= 1
                self._changed.notify_all()
            self.budget.changed()
        async with self._changed:
            inst.inflight.add(inv)
            self.instances.append(inst)
            return inst

    def started(self) -> int:
        """Instances live or starting, as the node's budget counts them."""
        return self._starting + sum(1 for i in self.instances if not i.dead)

    async def release(self, inst: Instance, inv: Invocation) -> None:
        inst.inflight.discard(inv)
        if not inst.inflight:
            inst.idle_since = asyncio.get_running_loop().time()
            self.budget.changed()
        if inst.dead:
            self.instances = [i for i in self.instances if i is not inst]
            if not inst.inflight:  # what it left running goes with it
                await inst.terminate()
        if self._waiting:
            async with self._changed:
                self._changed.notify_all()

    async def _spawn(self, inv: Invocation) -> Instance:
        self._seq += 1
        port = _free_port()
        env = env_for(inv, self.environment)
        for key in ("KUBETASK_TASK_ID", "KUBETASK_ATTEMPT"):
            env.pop(key, None)
        env["PORT"] = str(port)
        cwd = self.fn.spec.workingDir
        rules = await self.ports.guard(port, self._uid())
        groups = self.cgroups()
        try:
            proc = await start_function(
                self.spec.command, env, cwd, self.user, groups, stdin=False, stderr_to_stdout=True
            )
        except BaseException:
            if rules is not None:
                await rules.remove()
            raise
        inst = Instance(
            f"{self.fn.name}-{self._seq}-pid{proc.pid}",
            port,
            proc,
            self.spec.concurrency,
            groups,
            rules,
        )
        # What it says while it starts goes to the task that started it: when it will not
        # start, that is the one place its author can read why.
        inst.inflight.add(inv)
        inst.pump = asyncio.create_task(self._pump_output(inst))
        try:
            await self._wait_ready(inst)
        except BaseException:
            await inst.terminate()
            raise
        return inst

    async def _wait_ready(self, inst: Instance) -> None:
        probe = inst.http.encode(b"GET", self.spec.readinessPath, {}, b"")
        deadline = asyncio.get_running_loop().time() + self.spec.startupTimeoutSeconds
        while asyncio.get_running_loop().time() < deadline:
            if inst.proc.returncode is not None:
                await _hear_out(inst, 1)
                raise RuntimeError(
                    f"instance exited with code {inst.proc.returncode} before ready"
                    + _last_words(inst)
                )
            with contextlib.suppress(InstanceUnreachable, TimeoutError):
                conn = await inst.http.connection()
                answer = conn.send(probe, READINESS_BODY_LIMIT)
                try:
                    status, _ = await asyncio.wait_for(asyncio.shield(answer), 1)
                except TimeoutError:
                    conn.cancel(answer)
                    raise
                if 200 <= status < 300:
                    self._own_port(inst)
                    return
            await asyncio.sleep(0.02)
        raise RuntimeError(
            f"instance not ready within {self.spec.startupTimeoutSeconds:g}s" + _last_words(inst)
        )

    def _uid(self) -> int:
        return os.geteuid() if self.user is None else self.user.uid

    def _own_port(self, inst: Instance) -> None:
        """The port an instance was given was free when chosen, and another user's process
        could have listened on it first: it would then be sent the account's payloads. Once
        its readiness is answered, only the instance's user may listen there."""
        others = listeners(inst.port) - {self._uid()}
        if others:
            raise RuntimeError(
                f"port {inst.port} was taken by another user's process (uid "
                f"{', '.join(map(str, sorted(others)))}) before the instance listened on it"
            )

    async def _pump_output(self, inst: Instance) -> None:
        """Instance output belongs to whatever it is serving; with several invocations in flight
        the lines cannot be told apart, so each of them gets them."""
        assert inst.proc.stdout is not None
        lines = Lines()
        while chunk := await inst.proc.stdout.read(65536):
            pace = next((i.pace for i in inst.inflight if i.pace is not None), None)
            if pace is not None and (wait := pace(chunk)) > 0:  # one function: one account
                await asyncio.sleep(wait)
            self._said(inst, lines.feed(chunk))
        self._said(inst, lines.rest())
        inst.dead = True

    @staticmethod
    def _said(inst: Instance, lines: list[str]) -> None:
        for text in lines:
            if text.strip():
                inst.last_line = text
            for inv in list(inst.inflight):
                inv.log("instance", text)

    async def reap_idle(self) -> None:
        now = asyncio.get_running_loop().time()
        async with self._changed:
            idle = [
                i
                for i in self.instances
                if not i.inflight and (i.dead or now - i.idle_since > self.spec.idleSeconds)
            ]
            self.instances = [i for i in self.instances if i not in idle]
        for inst in idle:
            await inst.terminate()

    async def close(self) -> None:
        async with self._changed:
            instances, self.instances = self.instances, []
        for inst in instances:
            await inst.terminate()

    async def retire(self, poll: float = 0.1) -> None:
        """Close once nothing runs on the instances: a pool replaced because its function
        changed lets the invocations it serves finish (none of them could run longer than
        its timeout)."""
        deadline = asyncio.get_running_loop().time() + self.fn.spec.timeoutSeconds + 5
        while any(inst.inflight for inst in self.instances):
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(poll)
        await self.close()


async def _ending(inst: Instance) -> str | None:
    """How the instance ended, if closing the connection was its exit (a crash, `os._exit`):
    "connection closed" alone sent its author looking in the wrong place. None if it lives on."""
    try:
        code = await asyncio.wait_for(inst.proc.wait(), EXIT_GRACE)
    except TimeoutError:
        return None
    await _hear_out(inst, EXIT_GRACE)
    return how_it_ended(code)


async def _hear_out(inst: Instance, patience: float) -> None:
    """Let the reader of an instance that exited take in its last words, for `patience` at
    most (what it left running may hold its output open)."""
    if inst.pump is not None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(inst.pump), patience)


def _last_words(inst: Instance) -> str:
    return f"; its last output: {inst.last_line[:300]}" if inst.last_line else ""


def invocation_headers(inv: Invocation) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Kubetask-Task-Id": inv.task_id,
        "X-Kubetask-Attempt": str(inv.attempt),
        "X-Kubetask-Account": inv.account,
    }


def answered(status: int, body: bytes, inv: Invocation, instance: str | None) -> Outcome:
    """An instance's answer to an invocation: 2xx is the result, 429 and 503 are "busy" (no
    attempt spent), anything else is the function's error."""
    if len(body) > inv.max_result_bytes:
        return Outcome(
            False,
            error=f"result exceeds {inv.max_result_bytes} bytes",
            exit_code=status,
            instance=instance,
        )
    if status in (429, 503):
        return Outcome(
            False, error=f"busy (HTTP {status})", exit_code=status, instance=instance, busy=True
        )
    if not 200 <= status < 300:
        return Outcome(
            False,
            error=f"HTTP {status}: {body[:500].decode(errors='replace')}",
            exit_code=status,
            instance=instance,
        )
    return Outcome(True, result=decode_result(body), exit_code=status, instance=instance)


def interrupted(reason: str | None, inv: Invocation, instance: str | None) -> Outcome | None:
    """The outcome of an invocation cut short by its timeout or a stop; None if it was not."""
    if reason == "timeout":
        return Outcome(
            False, error=f"timed out after {inv.timeout:g}s", timed_out=True, instance=instance
        )
    if reason == "stop":
        return Outcome(False, error="stopped", killed=True, instance=instance)
    return None


class ServerExecution:
    """One invocation. Stop and timeout interrupt it by closing its connection; no task of its
    own runs beside the dispatcher's."""

    def __init__(self, pool: InstancePool, inst: Instance, inv: Invocation) -> None:
        self.pool = pool
        self.inst = inst
        self.inv = inv
        self.instance: str | None = inst.name
        self._interrupted: str | None = None  # "timeout" or "stop"
        self._cancel: Callable[[], None] | None = None  # abandons the request in flight

    async def wait(self) -> Outcome:
        timer = asyncio.get_running_loop().call_later(self.inv.timeout, self._interrupt, "timeout")
        try:
            return await self._invoke()
        finally:
            timer.cancel()
            self._cancel = None
            await self.pool.release(self.inst, self.inv)

    async def _invoke(self) -> Outcome:
        spec = self.pool.spec
        http = self.inst.http
        request = http.encode(
            b"POST", spec.invokePath, invocation_headers(self.inv), encode_payload(self.inv.payload)
        )
        try:
            conn = await http.connection()
            if self._interrupted:
                conn.abort()
                raise InstanceUnreachable("interrupted")
            answer = conn.send(request, self.inv.max_result_bytes)
            self._cancel = lambda: conn.cancel(answer)
            try:
                status, body = await answer
            except asyncio.CancelledError:
                conn.cancel(answer)
                raise
        except InstanceUnreachable as err:
            return await self._unreachable(err)
        return answered(status, body, self.inv, self.instance)

    async def _unreachable(self, err: InstanceUnreachable) -> Outcome:
        if self._interrupted == "timeout":
            await self._abandon()
        cut = interrupted(self._interrupted, self.inv, self.instance)
        if cut is not None:
            return cut
        self.inst.dead = True
        out_of_memory = groups_out_of_memory(self.inst.groups)
        if out_of_memory:
            return Outcome(False, error=out_of_memory, instance=self.instance)
        ended = await _ending(self.inst)
        if ended is not None:
            error = f"instance {ended} while serving it{_last_words(self.inst)}"
            return Outcome(False, error=error, instance=self.instance)
        return Outcome(False, error=f"instance unreachable: {err}", instance=self.instance)

    def _interrupt(self, reason: str) -> None:
        if self._interrupted is None:
            self._interrupted = reason
        if self._cancel is not None:
            self._cancel()

    async def _abandon(self) -> None:
        """The instance cannot be told to drop one invocation: kill it if it serves no other."""
        if self.inst.inflight <= {self.inv}:
            await self.inst.terminate()

    async def kill(self) -> None:
        self._interrupt("stop")
        await self._abandon()


def _runtime(fn: TaskFunction) -> tuple[Any, ...]:
    """What an instance is started from: a change here needs new instances."""
    spec = fn.spec
    return (spec.server, spec.env, spec.workingDir)


class ServerExecutor:
    def __init__(self, max_instances: int, users: FunctionUsers) -> None:
        self._pools: dict[tuple[str, str], InstancePool] = {}
        self.users = users
        self.budget = InstanceBudget(max_instances)
        self._reaper: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(5)
            for pool in list(self._pools.values()):
                await pool.reap_idle()

    def pool_for(self, fn: TaskFunction) -> InstancePool:
        key = (fn.account, fn.name)
        pool = self._pools.get(key)
        user = self.users.user_for(fn)
        if pool is not None and _runtime(pool.fn) == _runtime(fn) and pool.user == user:
            pool.fn = fn  # queue mode, limits, timeout: the instances themselves are the same
        else:
            environment = self.users.environment(user)  # may fail: before the old pool goes
            if pool is not None:
                retired = asyncio.create_task(pool.retire())
                self._retiring.add(retired)
                retired.add_done_callback(self._retiring.discard)
            cgroups = functools.partial(self.users.cgroups, fn, user)
            pool = InstancePool(
                fn,
                self.budget,
                self._pools.values(),
                user,
                environment,
                cgroups,
                self.users.ports,
            )
            self._pools[key] = pool
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_forever())
        return pool

    async def start(self, inv: Invocation) -> Execution:
        pool = self.pool_for(inv.function)
        inst = await pool.acquire(inv)
        return ServerExecution(pool, inst, inv)

    async def close(self) -> None:
        await cancel_and_wait(self._reaper)
        for pool in self._pools.values():
            await pool.close()
