"""Starting executor processes (`executors/spawn.py`) on the tests' loop (uvloop, as deployed):
many at once, payloads larger than a pipe holds, output on both streams, exit codes and
signals as Popen reports them, and every descriptor closed afterwards."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from kubetask.executors.parent_death import spawn_argv
from kubetask.executors.spawn import STREAM_LIMIT, spawn

ENV = {"PATH": os.environ["PATH"]}
ECHO = "import sys; data = sys.stdin.buffer.read(); sys.stderr.write('got\\n'); sys.stdout.buffer.write(data[::-1])"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def run(command: list[str], payload: bytes) -> tuple[int, bytes, bytes]:
    argv, preexec, env, *_ = spawn_argv(command, ENV, None)
    child = await spawn(argv, env, None, preexec, stdin=True, stderr_to_stdout=False)
    assert child.stderr is not None
    _, out, err = await asyncio.gather(
        child.feed(payload), child.stdout.read(), child.stderr.read()
    )
    return await child.wait(), out, err


async def test_a_child_printing_faster_than_it_is_read_waits_on_its_pipe() -> None:
    """Its pipe was read whatever its stream held: a task printing as fast as it could grew
    the dispatcher's memory without end, and each read of the stream moved all it held."""
    argv, preexec, env, *_ = spawn_argv(["yes", "y" * 60], ENV, None)
    child = await spawn(argv, env, None, preexec, stdin=False, stderr_to_stdout=True)
    try:
        await asyncio.sleep(0.5)  # nothing read: `yes` could have printed hundreds of MB
        held = len(child.stdout._buffer)
        assert 0 < held <= 2 * STREAM_LIMIT + 65536, held
        read = 0
        while read < 10 * held:  # and reading goes on where it stopped
            read += len(await child.stdout.read(65536))
        assert len(child.stdout._buffer) <= 2 * STREAM_LIMIT + 65536
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.abandon_output()
        assert await child.wait() == -signal.SIGKILL


async def test_output_abandoned_after_its_child_exited_still_gives_what_its_pipe_held() -> None:
    """Output read slowly (an account's pace) may still be in the pipe when its child exits;
    abandoning it after the grace closed the pipe with its last 64 KiB, last lines among them."""
    script = "import sys\nfor _ in range(3000): sys.stdout.write('.' * 99 + chr(10))\nprint('last')"
    argv, preexec, env, *_ = spawn_argv([sys.executable, "-c", script], ENV, None)
    child = await spawn(argv, env, None, preexec, stdin=False, stderr_to_stdout=True)
    got = bytearray()
    exited = asyncio.ensure_future(child.wait())
    while not exited.done():  # slowly: the child waits on its pipe until its last write
        got += await child.stdout.read(16384)
        await asyncio.sleep(0.01)
    assert await exited == 0
    child.abandon_output()
    got += await child.stdout.read()
    assert got.endswith(b"last\n") and len(got) == 3000 * 100 + 5, len(got)


async def test_many_children_at_once_each_get_their_payload_back() -> None:
    before = open_fds()
    payloads = [os.urandom(200_000 + i) for i in range(40)]  # more than a pipe's 64 KiB
    results = await asyncio.gather(*(run([sys.executable, "-c", ECHO], p) for p in payloads))
    for payload, (code, out, err) in zip(payloads, results, strict=True):
        assert code == 0 and out == payload[::-1] and err == b"got\n"
    assert open_fds() == before


async def test_exit_codes_signals_and_a_child_that_reads_nothing() -> None:
    before = open_fds()
    code, out, _ = await run(["sh", "-c", "echo partial; exit 3"], os.urandom(300_000))
    assert code == 3 and out == b"partial\n"
    code, _, _ = await run(["sh", "-c", "kill -TERM $$"], b"")
    assert code == -15
    argv, preexec, env, *_ = spawn_argv(["sh", "-c", "echo both 1>&2; echo out"], ENV, None)
    child = await spawn(argv, env, None, preexec, stdin=False, stderr_to_stdout=True)
    assert child.stderr is None and child.returncode is None
    assert sorted((await child.stdout.read()).split()) == [b"both", b"out"]
    assert await child.wait() == 0 and child.returncode == 0
    assert open_fds() == before
