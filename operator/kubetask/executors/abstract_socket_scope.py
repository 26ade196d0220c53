"""A Landlock domain that keeps an account's processes from connecting to an abstract Unix
socket another account's process, or the host's, listens on.

Why: an abstract Unix socket (a name starting with a NUL byte) has no file, so no mode guards
it, and any process of the host's network namespace may connect to one. With
`KUBETASK_FUNCTION_USERS=accounts`, team-b's function connected to one that team-a's function
listened on (seen 2026-12-04). Landlock's abstract-socket scope (ABI 6, Linux 6.12) refuses a
connection from a process to a socket made outside the process's domain.

How: a Landlock domain belongs to a thread, and every process the thread starts inherits it,
through exec and the switch to the account's user. The account's thread (`account_threads.py`)
is restricted once, so an account's processes share one domain: they reach each other's
sockets and no one else's.
"""

from __future__ import annotations

import ctypes
import os

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
