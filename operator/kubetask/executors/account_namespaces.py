"""A mount namespace for each account's functions, where /proc shows only their own processes
(`hidden_processes.py`), /tmp is their own (`account_scratch.py`) and so are their terminals
(`account_terminals.py`), and an IPC namespace, where
the System V shared memory, semaphores and message queues and the POSIX message queues they
make and find are their own.

Why IPC too: those objects are the host's otherwise. A tenant's function listed another
account's shared memory segments (their keys, sizes, owner and creator's pid in
`/proc/sysvipc/shm`), took a key first so that a neighbour's `shmget` of it failed with
`Permission denied`, and left segments that outlived its attempt with no end (seen
2026-12-05); a few thousand of them (`kernel.shmmni`) would have failed every `shmget` of the
host. In an IPC namespace of the account's own, what it makes ends when the namespace does.

Why one per account, not one per attempt: a namespace and its mounts cost about five times the
exec that enters one (measured 2026-12-04, 9 to 10 ms against 1 to 2), and every function of an
account shares its /tmp while its namespace lives, as a warm Lambda keeps its own.

How: a holder process is made with `unshare`, mounts what the account needs, and waits while
the dispatcher opens its namespace; then it is let go. A tenant's process enters by that
descriptor (`nsenter`, as root, before it becomes its account's user: `parent_death.py`). The
copy is a `slave` of the host's mounts: what the host mounts later still reaches functions
wherever the host's mounts propagate (`shared`, as systemd makes them).

A namespace lives while the dispatcher holds its descriptor or any process is in it. One not
handed out for `IDLE_SECONDS` is let go, and with it, once its last process ends, what its
/tmp held: memory an account that stopped running does not keep. Its next attempt gets a new
one. Nothing is left to sweep after a `kill -9`.

A function's process inherits the descriptors (passed to `nsenter`, which cannot close them):
they name the namespaces it is in, as its /proc/self/ns does, and without CAP_SYS_ADMIN nothing
can be done with them but look. `nsenter` cannot open the dispatcher's own descriptors by their
/proc path instead: the account's thread is in a Landlock domain (`account_threads.py`), which
may not look into a process outside it (seen: `Permission denied`, 2026-12-05).
"""

from __future__ import annotations

import asyncio
import os
import select
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

from . import account_scratch, account_terminals, hidden_processes

_NSENTER = shutil.which("nsenter")  # looked up once, not on every spawn
# How long making a namespace may take before it is given up.
_TIMEOUT = 10.0
IDLE_SECONDS = 600.0
# The user the namespace made at start, to learn whether this host can make them, belongs to.
_PROBE_UID = 65534


class AccountNamespace(NamedTuple):
    """Descriptors of an account's namespaces, which its processes inherit to enter them."""

    mount: int
    ipc: int


def enter(namespace: AccountNamespace) -> list[str]:
    """`nsenter`'s command line, to put before the rest of an argv: the process enters the
    account's namespaces (descriptors it inherits) and keeps the working directory it was
    started in, which entering a mount namespace would reset to its root."""
    assert _NSENTER is not None, "checked when the namespace was made"
    return [
        _NSENTER,
        f"--mount=/proc/self/fd/{namespace.mount}",
        f"--ipc=/proc/self/fd/{namespace.ipc}",
        "--wd=.",
        "--",
    ]


def _close(namespace: AccountNamespace) -> None:
    for fd in namespace:
        os.close(fd)


@dataclass
class _Held:
    namespace: AccountNamespace
    used: float


class AccountNamespaces:
    def __init__(self, enabled: bool, scratch: int) -> None:
        """`enabled`: tenants' functions run as users of their own (nothing to hide from the
        platform's user otherwise); `scratch`: the size of each account's /tmp, 0 for none."""
        self._enabled = enabled
        self._scratch = scratch
        self._hide = False
        self._terminals = False
        self._why_not_terminals: str | None = None
        # The host's directories its /tmp stands at, looked up once with the host.
        self.shadowed: tuple[str, ...] = ()
        self._checked = False
        self._why_not: str | None = None
        self._held: dict[int, _Held] = {}
        self._making = threading.Lock()  # made in threads: two attempts must not make two
        self._swept = time.monotonic()

    def why_not_hidden(self) -> str | None:
        """Why tenants' functions see every process of the host; None where they do not."""
        self._check()
        if self._why_not is not None:
            return self._why_not
        return None if self._hide else hidden_processes.why_not()

    def why_not_scratch(self) -> str | None:
        """Why tenants' functions write to the host's /tmp; None where each account has its own."""
        self._check()
        if self._why_not is not None:
            return self._why_not
        return None if self._scratch else f"{account_scratch.SETTING}=0"

    def why_not_ipc(self) -> str | None:
        """Why tenants' functions share the host's IPC objects; None where each account has
        its own."""
        self._check()
        return self._why_not

    def why_not_terminals(self) -> str | None:
        """Why tenants' functions open the host's terminals; None where each account has its
        own."""
        self._check()
        return self._why_not or self._why_not_terminals

    def scratch(self) -> bool:
        return self.why_not_scratch() is None

    async def get(self, uid: int) -> AccountNamespace | None:
        """The namespaces `uid`'s processes enter, made on first use; None
        where there are none. Raises OSError where one could not be made (the host could at
        start): run without it, a tenant's function would have the host's /tmp as its home."""
        self._check()
        if self._why_not is not None:
            return None
        now = time.monotonic()
        if now - self._swept > IDLE_SECONDS / 10:
            self._sweep(now)
        held = self._held.get(uid)
        if held is None:
            held = await asyncio.to_thread(self._made, uid)
        held.used = now
        return held.namespace

    def get_now(self, uid: int) -> AccountNamespace | None:
        """`get`, for code that is not on the event loop."""
        self._check()
        return None if self._why_not is not None else self._made(uid).namespace

    def close(self) -> None:
        with self._making:
            for held in self._held.values():
                _close(held.namespace)
            self._held.clear()

    def _made(self, uid: int) -> _Held:
        with self._making:
            held = self._held.get(uid)
            if held is None:
                namespace, why = self._make(uid)
                if namespace is None:
                    raise OSError(f"could not make the namespaces of uid {uid}: {why}")
                held = self._held[uid] = _Held(namespace, time.monotonic())
            return held

    def _sweep(self, now: float) -> None:
        """Lets go of namespaces not handed out for IDLE_SECONDS. One just handed out has
        just been stamped, so none is let go while a spawn is passing it on."""
        self._swept = now
        for uid, held in list(self._held.items()):
            if now - held.used > IDLE_SECONDS:
                del self._held[uid]
                _close(held.namespace)

    def _check(self) -> None:
        """Once: whether this host can make them, by making one."""
        if self._checked:
            return
        self._checked = True
        if not self._enabled:
            self._why_not = "functions run as the platform's user"
            return
        self._hide = hidden_processes.why_not() is None
        tools = {t: shutil.which(t) for t in ("unshare", "mount", "sh")} | {"nsenter": _NSENTER}
        missing = [t for t, path in tools.items() if path is None]
        if missing:
            self._why_not = f"no {', '.join(missing)} on this host's PATH (util-linux)"
            return
        self.shadowed = account_scratch.shadowed() if self._scratch else ()
        # Terminals of its own are tried first, and left out where devpts takes no new
        # instance (a container may not mount one), rather than losing the namespace.
        self._terminals = True
        namespace, why_terminals = self._make(_PROBE_UID)
        if namespace is None:
            self._terminals = False
            self._why_not_terminals = f"could not mount a devpts instance: {why_terminals}"
            namespace, why = self._make(_PROBE_UID)
        if namespace is None:
            self._why_not = f"could not make mount and IPC namespaces: {why}"
        else:
            _close(namespace)

    def _make(self, uid: int) -> tuple[AccountNamespace | None, str]:
        steps = [hidden_processes.MOUNT] if self._hide else []
        if self._terminals:
            steps += account_terminals.MOUNTS
        if self._scratch:
            steps += account_scratch.mounts(uid, self._scratch, self.shadowed)
        # The holder mounts in a namespace of its own, says so, and waits on its stdin while
        # the namespace is opened through it; then it is let go.
        script = " && ".join([*steps, "echo ready", "read _"])
        holder = subprocess.Popen(
            ["unshare", "--mount", "--ipc", "--propagation", "slave", "--", "sh", "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert holder.stdin is not None and holder.stdout is not None
        fds: list[int] = []
        opened: OSError | None = None
        try:
            ready, _, _ = select.select([holder.stdout], [], [], _TIMEOUT)
            if ready and holder.stdout.readline() == b"ready\n":
                # Still our unreaped child, blocked on its stdin: the pid is its own.
                for kind in ("mnt", "ipc"):
                    fds.append(os.open(f"/proc/{holder.pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC))
        except OSError as err:
            opened = err
            for fd in fds:
                os.close(fd)
            fds = []
        finally:
            try:  # closes its stdin: it ends
                _, err_out = holder.communicate(timeout=_TIMEOUT)
            except subprocess.TimeoutExpired:
                holder.kill()
                _, err_out = holder.communicate()
        said = err_out.decode(errors="replace").strip() or f"exit status {holder.returncode}"
        return (AccountNamespace(*fds) if fds else None), str(opened or said)
