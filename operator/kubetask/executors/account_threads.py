"""The thread each account's processes are started from, restricted in what it, and so every
process it starts, may do.

Why a thread: a Landlock domain, a seccomp filter and a session keyring belong to a thread, and
every process the thread starts inherits them, through exec and the switch to the account's
user; the first two can never be taken off. Restricting the dispatcher's own threads would
restrict the platform; restricting each spawned child would add work to every start. Each
account has a thread of its own, restricted once when it starts, and `spawn.py` starts the
account's processes on it, as it starts the others on the loop's pool. Nothing is added per
spawn.

What it is restricted to, or given:
- `abstract_socket_scope.py`: no connecting to another account's abstract Unix sockets;
- `system_call_filter.py`: no user namespaces, kernel AIO or io_uring;
- `account_keyring.py`: a session keyring of the account's own, not the platform's.

A thread not used for `IDLE_SECONDS` (its account's namespace's idle time) is let go. The
account's next process gets a new Landlock domain, and cannot reach a socket that a process
started before then listens on, as after a restart.

Where the kernel lacks one (Landlock's scopes came in Linux 6.12), the dispatcher warns at start,
and without all three starts processes as before.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

from . import abstract_socket_scope, account_keyring, account_namespaces, system_call_filter


@dataclass
class _Held:
    thread: ThreadPoolExecutor
    used: float


class AccountThreads:
    """The thread each account's processes are started from."""

    def __init__(self, enabled: bool, user_namespaces: bool = False) -> None:
        """`enabled`: tenants' functions run as users of their own (accounts mode);
        `user_namespaces`: they may make user namespaces (the rest of the filter holds)."""
        off = "functions run as the platform's user"
        self._why_not_scope = abstract_socket_scope.why_not() if enabled else off
        self._why_not_filter = system_call_filter.why_not() if enabled else off
        self._why_not_keyring = account_keyring.why_not() if enabled else off
        self._restrictions: list[Callable[[], None]] = []
        if self._why_not_scope is None:
            self._restrictions.append(abstract_socket_scope.restrict_this_thread)
        if self._why_not_filter is None:
            self._restrictions.append(
                functools.partial(system_call_filter.filter_this_thread, user_namespaces)
            )
        if self._why_not_keyring is None:
            self._restrictions.append(account_keyring.join_new_session_keyring)
        self._threads: dict[int, _Held] = {}  # by account user id
        self._lock = threading.Lock()
        self._swept = time.monotonic()

    def why_not_scope(self) -> str | None:
        """Why an account's processes may reach others' abstract sockets; None: they may not."""
        return self._why_not_scope

    def why_not_filter(self) -> str | None:
        """Why an account's processes are not held to `system_call_filter.py`; None: they are."""
        return self._why_not_filter

    def why_not_keyring(self) -> str | None:
        """Why an account's processes hold the platform's session keyring; None: they do not."""
        return self._why_not_keyring

    def _restrict(self) -> None:
        for restrict in self._restrictions:
            restrict()

    def starter(self, uid: int) -> Executor | None:
        """Where to start a process of the account whose user is `uid`; None: anywhere."""
        if not self._restrictions:
            return None
        now = time.monotonic()
        with self._lock:
            if now - self._swept > account_namespaces.IDLE_SECONDS / 10:
                self._sweep(now)
            held = self._threads.get(uid)
            if held is None:
                thread = ThreadPoolExecutor(
                    1, f"kubetask-account-{uid}", initializer=self._restrict
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
