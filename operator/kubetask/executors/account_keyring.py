"""Each account's processes have a session keyring of their own, not the platform's.

Why: a process's session keyring is inherited through fork and exec and kept through a change
of user, and every process holding it may read, search and add to it (a keyring's "possessor"
rights). Run as a systemd service, the platform has one: systemd gives each system service a
session keyring of its own (since its 2016 change "core: run each system service with a fresh
session keyring"), so every tenant's function held the dispatcher's: with
`KUBETASK_FUNCTION_USERS=accounts`, team-b's function read a key team-a's function had added
there (seen 2026-12-05, with the platform started in a session keyring of its own as systemd
starts it), and any key of the platform's in it was theirs to read.

How: a session keyring belongs to a thread's credentials, as a Landlock domain does. The
account's thread (`account_threads.py`) joins a new anonymous session keyring when it starts,
and the account's processes, started from it, inherit that one: shared by the account's
functions, as their `/tmp` is, and by no one else. It goes when the last of them ends. Keys a
tenant adds count against its account user's key quota (`/proc/sys/kernel/keys/maxkeys`), as
before. Where the kernel has no keys, there is nothing to share.
"""

from __future__ import annotations

import ctypes
import os
import platform

_libc = ctypes.CDLL(None, use_errno=True)
_KEYCTL = {"x86_64": 250, "aarch64": 219}
_GET_KEYRING_ID = 0
_JOIN_SESSION_KEYRING = 1
_SESSION_KEYRING = -3


def why_not() -> str | None:
    """Why an account's processes cannot be given a keyring of their own; None where they can."""
    keyctl = _KEYCTL.get(platform.machine())
    if keyctl is None:
        return f"no system call number for keyctl on {platform.machine()} here"
    if _libc.syscall(keyctl, _GET_KEYRING_ID, _SESSION_KEYRING, 0) < 0:
        return f"keyctl refused ({os.strerror(ctypes.get_errno())})"
    return None


def join_new_session_keyring() -> None:
    """Gives the calling thread, and all it starts from now on, a new anonymous session
    keyring."""
    if _libc.syscall(_KEYCTL[platform.machine()], _JOIN_SESSION_KEYRING, None) < 0:
        raise OSError(ctypes.get_errno(), "joining a new session keyring failed")
