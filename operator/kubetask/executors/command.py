"""`command` mode: one process per attempt — payload on stdin, result on stdout, stderr as logs,
exit code as outcome. The process gets its own session so stop and timeout kill its children
too, and an attempt ends when its process does: what it left running is killed with it
(`spawn.py`), and where the dispatcher makes cgroups, so is what left the session
(`cgroups.py`). Past its memory limit there, it fails as out of memory (`attempt_memory.py`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

from .base import (
    Execution,
    Invocation,
    Lines,
    Outcome,
    Tail,
    decode_result,
    encode_payload,
    env_for,
    how_it_ended,
)
from .cgroups import Group, end_groups
from .cgroups import out_of_memory as groups_out_of_memory
from .function_users import FunctionUsers
from .parent_death import start_function
from .spawn import Child

KILL_GRACE_SECONDS = 0.5
# How long output still in flight is read after the process exited.
OUTPUT_GRACE_SECONDS = 1.0


class CommandExecution:
    def __init__(self, inv: Invocation, proc: Child, groups: list[Group]) -> None:
        self.inv = inv
        self.proc = proc
        self.groups = groups
        self.instance: str | None = f"pid-{proc.pid}"
        self._killed = False
        self._ending = False  # its process group is being ended
        self._stdout_tail = Tail()
        self._stderr_tail = Tail()

    async def _read_stdout(self) -> tuple[bytes, bool]:
        """The result, or that it is too big: then the process is ended at once, since the
        attempt has failed whatever it prints next. Before, it was read to its end: a task
        printing without end kept its dispatcher reading (and other accounts' tasks waiting
        to start) until its timeout."""
        assert self.proc.stdout is not None
        limit = self.inv.max_result_bytes
        chunks: list[bytes] = []
        size = 0
        while chunk := await self.proc.stdout.read(65536):
            self._stdout_tail.add(chunk)
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif not self._ending:
                await self._end_group()
        return b"".join(chunks), size > limit

    async def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        lines = Lines()
        while chunk := await self.proc.stderr.read(65536):
            if self.inv.pace is not None and (wait := self.inv.pace(chunk)) > 0:
                await asyncio.sleep(wait)
            self._stderr_tail.add(chunk)
            for line in lines.feed(chunk):
                self.inv.log("stderr", line)
        for line in lines.rest():
            self.inv.log("stderr", line)

    async def _feed_stdin(self) -> None:
        await self.proc.feed(encode_payload(self.inv.payload))

    def _failed(self, error: str, code: int | None, **flags: bool) -> Outcome:
        """A failed attempt, with what it printed last as evidence."""
        return Outcome(
            False,
            error=error,
            exit_code=code,
            instance=self.instance,
            stdout_tail=self._stdout_tail.text(),
            stderr_tail=self._stderr_tail.text(),
            **flags,
        )

    async def wait(self) -> Outcome:
        """The timeout runs until the process exits (one that closed its output and went on
        was not timed before), then its output is read to the end, briefly."""
        io = asyncio.gather(self._feed_stdin(), self._read_stdout(), self._pump_stderr())
        timed_out = False
        try:
            code = await asyncio.wait_for(self.proc.wait(), self.inv.timeout)
        except TimeoutError:
            timed_out = True
            await self.kill()
            code = await self.proc.wait()
        out_of_memory = groups_out_of_memory(self.groups)
        await end_groups(self.groups)  # what left the session, and holds the output open
        try:
            _, (stdout, too_big), _ = await asyncio.wait_for(
                asyncio.shield(io), OUTPUT_GRACE_SECONDS
            )
        except TimeoutError:
            self.proc.abandon_output()  # held open by something that left its session
            _, (stdout, too_big), _ = await io
        if timed_out:
            return self._failed(f"timed out after {self.inv.timeout:g}s", code, timed_out=True)
        if self._killed:
            return self._failed("stopped", code, killed=True)
        if too_big:
            return self._failed(f"result exceeds {self.inv.max_result_bytes} bytes", code)
        if out_of_memory:
            return self._failed(out_of_memory, code)
        if code != 0:
            return self._failed(how_it_ended(code), code)
        return Outcome(True, result=decode_result(stdout), exit_code=0, instance=self.instance)

    async def kill(self) -> None:
        self._killed = True
        await self._end_group()

    async def _end_group(self) -> None:
        """SIGTERM to the whole process group, SIGKILL after a short grace."""
        self._ending = True
        if self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(self.proc.wait()), KILL_GRACE_SECONDS)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)


class CommandExecutor:
    def __init__(self, users: FunctionUsers) -> None:
        self.users = users

    async def start(self, inv: Invocation) -> Execution:
        spec = inv.function.spec
        assert spec.command is not None
        user = self.users.user_for(inv.function)
        env = env_for(inv, self.users.environment(user))
        groups = self.users.cgroups(inv.function, user)
        proc = await start_function(
            spec.command, env, spec.workingDir, user, groups, stdin=True, stderr_to_stdout=False
        )
        return CommandExecution(inv, proc, groups)

    async def close(self) -> None:
        return None
