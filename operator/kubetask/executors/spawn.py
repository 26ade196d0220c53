"""Starting executor processes from a large dispatcher without copying it.

asyncio's subprocesses on uvloop (the dispatcher's loop) are forked: the kernel copies the
dispatcher's page tables for every child and throws them away at exec. A dispatcher serving
10,000 functions holds ~350 MB, and a burst over them spent half of all CPU in that copy (perf:
`copy_page_range` under `_Fork`, `unmap_page_range` under `execve`); forking a 350 MB process
took 39 ms a spawn in a microbenchmark. `subprocess.Popen` without a `preexec_fn` uses vfork,
which copies nothing; so children start through it (on a worker thread, so the loop never
waits on the kernel), their pipes are read and written through the loop's readiness callbacks
with each fd owned and closed here, exactly once (with uvloop's pipe transports instead,
children started from the worker thread met closed descriptors: EBADF in Popen, EINVAL on
reads, and the dispatcher aborted), and their exit is watched through a pidfd.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, cast

# As asyncio's own subprocess streams: a longer line than this is an error for `readline`.
STREAM_LIMIT = 2**16
# What an abandoned pipe may still hand over: a full pipe's worth, with room.
ABANDON_DRAIN = 2**20


@dataclass(eq=False)
class Child:
    """The parts of `asyncio.subprocess.Process` the executors use."""

    pid: int
    stdout: asyncio.StreamReader
    stderr: asyncio.StreamReader | None
    _stdin: int | None
    _exited: asyncio.Future[int]
    _pipes: list[_Pipe]

    @property
    def returncode(self) -> int | None:
        """As Popen's: negative for a signal; None while it runs."""
        return self._exited.result() if self._exited.done() else None

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def abandon_output(self) -> None:
        """Stop reading its output, as if it had ended: for pipes still held open, after it
        exited, by a process that left its session (and so outlived it). What the pipes hold
        already (up to ABANDON_DRAIN each) is still read: output read slowly (an account's
        pace, `dispatch/log_pacing.py`) may still be waiting there, its last lines among it."""
        for pipe in self._pipes:
            pipe.end(drain=ABANDON_DRAIN)

    async def feed(self, data: bytes) -> None:
        """Write `data` to its stdin and close it. A child that exits or closes its stdin
        without reading it all is not an error."""
        fd, self._stdin = self._stdin, None
        if fd is None:
            return
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        try:
            while view:
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    writable = loop.create_future()
                    loop.add_writer(fd, writable.set_result, None)
                    try:
                        await writable
                    finally:
                        loop.remove_writer(fd)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            os.close(fd)


async def spawn(
    argv: Sequence[str],
    env: dict[str, str],
    cwd: str | None,
    preexec: Callable[[], None] | None,
    stdin: bool,
    stderr_to_stdout: bool,
    keep_fds: Sequence[int] = (),
    starter: Executor | None = None,
) -> Child:
    """Start `argv` in a session of its own with stdout (and stderr, or stderr folded into
    stdout) piped to the loop and, with `stdin`, a pipe to write to; otherwise stdin is
    /dev/null; of the loop's other descriptors it gets `keep_fds` only; started from a thread
    of `starter` where given (`account_threads.py`), else of the loop's pool. Raises what
    exec raised (FileNotFoundError, PermissionError, ...)."""
    loop = asyncio.get_running_loop()
    in_r, in_w = os.pipe() if stdin else (subprocess.DEVNULL, -1)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe() if not stderr_to_stdout else (-1, subprocess.STDOUT)
    theirs = [fd for fd in (in_r, out_w, err_w) if fd >= 0]  # closed once the child has them
    ours = [fd for fd in (in_w, out_r, err_r) if fd >= 0]  # closed by their reader and writer

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            list(argv),
            stdin=in_r,
            stdout=out_w,
            stderr=err_w,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=preexec,
            pass_fds=tuple(keep_fds),
        )

    def close(fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)

    starting = loop.run_in_executor(starter, start)
    try:
        popen = await asyncio.shield(starting)
    except asyncio.CancelledError:
        # The thread starts it anyway: stop and reap it rather than leave it running.
        starting.add_done_callback(functools.partial(_stop_started, loop, theirs + ours))
        raise
    except BaseException:
        close(theirs + ours)
        raise
    close(theirs)
    for fd in ours:
        os.set_blocking(fd, False)
    pipes = [_Pipe(loop, fd) for fd in (out_r, err_r) if fd >= 0]
    return Child(
        popen.pid,
        pipes[0].reader,
        pipes[1].reader if len(pipes) > 1 else None,
        in_w if in_w >= 0 else None,
        _watch_exit(loop, popen),
        pipes,
    )


def _stop_started(
    loop: asyncio.AbstractEventLoop, fds: list[int], started: asyncio.Future[Any]
) -> None:
    for fd in fds:
        os.close(fd)
    if started.cancelled() or started.exception() is not None:
        return
    popen = started.result()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, signal.SIGKILL)
    _watch_exit(loop, popen)


def _watch_exit(
    loop: asyncio.AbstractEventLoop, popen: subprocess.Popen[bytes]
) -> asyncio.Future[int]:
    """A future of the exit code, reaped only by us: a pidfd becomes readable when the child
    exits. Where there is none (Linux < 5.3) a thread waits instead, and what the child
    started is not ended with it (after the reap, its group id may be someone else's)."""
    exited: asyncio.Future[int] = loop.create_future()

    def done(code: int) -> None:
        if not exited.done():
            exited.set_result(code)

    try:
        pidfd = os.pidfd_open(popen.pid)
    except OSError:
        waiter = threading.Thread(
            target=lambda: loop.call_soon_threadsafe(done, popen.wait()), daemon=True
        )
        waiter.start()
        return exited

    def reap() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        # Whatever it started goes with it, as a container's processes go with the container:
        # one left holding its output would keep the attempt open, and would run outside every
        # budget. Killed before the reap, while the exited leader still holds its group's id,
        # so the id cannot have been given to anyone else.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)
        done(popen.wait())

    loop.add_reader(pidfd, reap)
    return exited


class _Pipe:
    """A stream fed from `fd` as it becomes readable; at its end the fd is closed.

    It stops reading while its stream holds more than twice STREAM_LIMIT unread (the stream
    pauses it as it would a transport), so a child printing faster than its output is used
    waits on its pipe. Before, the pipe was read whatever the stream held: a task printing as
    fast as it could grew the dispatcher's memory without end, and each read of the stream
    moved all it held, which kept the dispatcher's core busy for seconds at a time and made
    every account's tasks wait to start."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self.reader = asyncio.StreamReader(limit=STREAM_LIMIT, loop=loop)
        self._loop = loop
        self._fd = fd
        self._paused = False
        self.reader.set_transport(cast(asyncio.ReadTransport, self))
        loop.add_reader(fd, self._readable)

    def pause_reading(self) -> None:
        if self._fd >= 0 and not self._paused:
            self._paused = True
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if self._fd >= 0 and self._paused:
            self._paused = False
            self._loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        except OSError as err:
            self.reader.set_exception(err)
            data = b""
        if data:
            self.reader.feed_data(data)
            return
        self.end()

    def end(self, drain: int = 0) -> None:
        """Closes the pipe, once what it holds, up to `drain` bytes, is taken into the stream."""
        if self._fd < 0:
            return
        self._loop.remove_reader(self._fd)
        taken = 0
        while taken < drain:
            try:
                data = os.read(self._fd, 65536)
            except OSError:  # BlockingIOError: nothing more is there now
                break
            if not data:
                break
            self.reader.feed_data(data)
            taken += len(data)
        os.close(self._fd)
        self._fd = -1
        self.reader.feed_eof()
