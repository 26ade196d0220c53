"""A tenant's function finds its own account's processes in /proc, and no one else's.

Why: run as its account's user (`function_users.py`), a function could still list every
process of the host in /proc and read its command line and state: another account's function
with whatever arguments its tenant gave it, the platform's own processes. Their environment
and files were already closed to it (another user's), their command lines were not.

How: in its account's mount namespace (`account_namespaces.py`), /proc is a new mount of the
same process namespace with `hidepid=invisible`: there a process lists only the processes of
its own user.

Not a PID namespace: there the function would be process 1, which the kernel shields from
every signal it has no handler for, so `stop`'s SIGTERM would reach nothing; and its pids
would not be the host's, which the rest of the dispatcher (cgroups, ports) counts in.

Linux gives each mount of proc options of its own since 5.8. Before, every mount of a process
namespace's proc shares one set, so this mount would hide every process from every user of
the host: on an older kernel it is not made, and the dispatcher says so.
"""

from __future__ import annotations

import platform
import re

MOUNT = "mount -t proc -o hidepid=invisible,nosuid,nodev,noexec proc /proc"
_FIRST_KERNEL = (5, 8)


def why_not() -> str | None:
    """Why /proc cannot be mounted with options of its own on this kernel; None if it can."""
    found = re.match(r"(\d+)\.(\d+)", platform.release())
    if found is None or (int(found[1]), int(found[2])) < _FIRST_KERNEL:
        return (
            f"Linux {platform.release()} gives every mount of /proc the same options "
            "(5.8 is the first that does not)"
        )
    return None
