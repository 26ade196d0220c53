"""A Landlock domain for each account's processes, so that none can connect to an abstract Unix
socket another account's process, or the host's, listens on.

Why: an abstract Unix socket (a name starting with a NUL byte) has no file, so no mode guards
it, and any process of the host's network namespace may connect to one. With
`KUBETASK_FUNCTION_USERS=accounts`, team-b's function connected to one that team-a's function
listened on (seen 2026-12-04). Landlock's abstract-socket scope (ABI 6, Linux 6.12) refuses a
connection from a process to a socket made outside the process's domain.

How: a Landlock domain belongs to a thread. `landlock_restrict_self` restricts the calling
thread, and every process that thread starts inherits the domain, through exec and the switch
to the account's user. Each account has a thread of its own, restricted when it starts, and
`spawn.py` starts the account's processes on it, as it starts the others on the loop's pool. An
account's processes share one domain, so they reach each other's sockets and no one else's.
Nothing is added per spawn. A thread not used for `IDLE_SECONDS` (its account's namespace's
idle time) is let go. The account's next process gets a new domain, and cannot reach a socket
that a process started before then listens on, as after a restart.

Where the kernel has no scopes (before Linux 6.12), the dispatcher warns at start and starts
processes as before.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

from . import account_namespaces

_libc = ctypes.CDLL(None, use_errno=True)
# The system call numbers of asm-generic, which x86-64 and arm64 share.
_CREATE_RULESET = 444
_RESTRICT_SELF = 446
_CREATE_RULESET_VERSION = 1
_SCOPE_ABSTRACT_UNIX_SOCKET = 1
_SCOPES_SINCE = 6  # the Landlock ABI that has scopes


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


def why_not() -> str | None:
    """Why this kernel cannot scope a domain's abstract sockets; None where it can."""
    abi = _libc.syscall(_CREATE_RULESET, None, 0, _CREATE_RULESET_VERSION)
    if abi < 0:
        return f"no Landlock on this kernel ({os.strerror(ctypes.get_errno())})"
    if abi < _SCOPES_SINCE:
        return f"this kernel's Landlock (ABI {abi}) has no scopes (ABI 6, Linux 6.12)"
    return None


def restrict_this_thread() -> None:
    """Puts the calling thread, and all it starts from now on, in a domain of its own that may
    not connect to abstract sockets made outside it. Needs no_new_privs or CAP_SYS_ADMIN: the
    dispatcher runs as root in accounts mode."""
    attr = _RulesetAttr(0, 0, _SCOPE_ABSTRACT_UNIX_SOCKET)
    ruleset = _libc.syscall(_CREATE_RULESET, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
    try:
        if _libc.syscall(_RESTRICT_SELF, ruleset, 0) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    finally:
        os.close(ruleset)


@dataclass
class _Held:
    thread: ThreadPoolExecutor
    used: float


class AccountScopes:
    """The thread each account's processes are started from."""

    def __init__(self, enabled: bool) -> None:
        """`enabled`: tenants' functions run as users of their own (accounts mode)."""
        self._why_not = why_not() if enabled else "functions run as the platform's user"
        self._threads: dict[int, _Held] = {}  # by account user id
        self._lock = threading.Lock()
        self._swept = time.monotonic()

    def why_not(self) -> str | None:
        return self._why_not

    def starter(self, uid: int) -> Executor | None:
        """Where to start a process of the account whose user is `uid`; None: anywhere."""
        if self._why_not is not None:
            return None
        now = time.monotonic()
        with self._lock:
            if now - self._swept > account_namespaces.IDLE_SECONDS / 10:
                self._sweep(now)
            held = self._threads.get(uid)
            if held is None:
                thread = ThreadPoolExecutor(
                    1, f"kubetask-account-{uid}", initializer=restrict_this_thread
                )
                held = self._threads[uid] = _Held(thread, now)
            held.used = now
            return held.thread

    def _sweep(self, now: float) -> None:
        self._swept = now
        for uid, held in list(self._threads.items()):
            if now - held.used > account_namespaces.IDLE_SECONDS:
                del self._threads[uid]
                held.thread.shutdown(wait=False)

    def close(self) -> None:
        with self._lock:
            for held in self._threads.values():
                held.thread.shutdown(wait=False)
            self._threads.clear()
