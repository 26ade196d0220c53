"""Each account's functions write to a /tmp of their own, of a bounded size, held in memory.

Why: run as its account's user, a tenant's function could still write wherever every user
may: /tmp and /var/tmp, on the disk that holds the JetStream store, and /dev/shm, a tmpfs
sized from the host's memory (half of it by default; all of it on this project's test
machine). One tenant filling the disk would fail every account's submissions; filling /dev/shm
took memory no OOM kill gives back (what a tmpfs holds outlives the process that wrote it).
Its home (`account_homes.py`) was on the same disk, unbounded. And /tmp was shared: a tenant
could create first a name a neighbour's function was about to use.

How: in its account's mount namespace (`account_namespaces.py`), /tmp is a tmpfs of
`KUBETASK_ACCOUNT_SCRATCH` bytes (512Mi, Lambda's default for its /tmp), owned by the account's
user and closed to every other; /var/tmp, /dev/shm and /run/lock, wherever the host lets every
user write there, are the same tmpfs mounted again, so one size bounds them all. HOME and
TMPDIR are /tmp. A write past the size fails with ENOSPC in that function alone. Its files
count one inode per 8 KiB of the size (a tmpfs's inodes are memory outside its size).

Memory, not disk: a tmpfs needs no device, filesystem or quota support from the host, and it
goes with the namespace, so nothing is left to sweep after a `kill -9`. The price: what every
account holds counts against the host's memory, up to the size each, for as long as its
namespace lives (recycled once idle). `KUBETASK_ACCOUNT_SCRATCH=0` keeps functions on the
host's /tmp and homes on its disk (`account_homes.py`), as before.
"""

from __future__ import annotations

import os
import shlex
import stat

from .. import quantities
from ..known_settings import note

SETTING = "KUBETASK_ACCOUNT_SCRATCH"
DEFAULT = "512Mi"
SMALLEST = 1 << 20
ROOT = "/tmp"
# Where a host usually lets every user write; those it does are this account's /tmp instead.
ALSO = ("/var/tmp", "/dev/shm", "/run/lock")
ENVIRONMENT = {"HOME": ROOT, "TMPDIR": ROOT}
BYTES_PER_INODE = 8192


def size_setting() -> int:
    """The size of each account's /tmp in bytes, 0 for none (a Kubernetes quantity)."""
    note(SETTING, DEFAULT, "a size such as 512Mi, or 0")
    raw = (os.environ.get(SETTING) or DEFAULT).strip()
    if raw in ("0", "off"):
        return 0
    try:
        size = int(quantities.value(raw))
    except ValueError:
        raise ValueError(f"{SETTING}={raw!r}: expected a size such as 512Mi, or 0") from None
    if not SMALLEST <= size <= quantities.MAX_VALUE:
        raise ValueError(f"{SETTING}={raw!r}: must be from 1Mi to {quantities.MAX}, or 0 for none")
    return size


def shadowed() -> tuple[str, ...]:
    """The host's directories a function of an account with its own /tmp cannot reach."""
    return (ROOT, *(d for d in ALSO if _every_user_writes(d)))


def mounts(uid: int, size: int, places: tuple[str, ...]) -> list[str]:
    """Shell commands that make, in a fresh mount namespace, the account's /tmp for `uid`, seen
    at each of `places` (`shadowed()`)."""
    inodes = max(1024, size // BYTES_PER_INODE)
    options = f"size={size},nr_inodes={inodes},mode=0700,uid={uid},gid={uid},nosuid,nodev"
    steps = [f"mount -t tmpfs -o {options} kubetask-scratch {ROOT}"]
    steps += [f"mount --bind {ROOT} {shlex.quote(d)}" for d in places if d != ROOT]
    return steps


def under(path: str, places: tuple[str, ...]) -> bool:
    path = os.path.normpath(path)
    return any(path == p or path.startswith(p + "/") for p in places)


def _every_user_writes(directory: str) -> bool:
    try:
        st = os.stat(directory)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and bool(st.st_mode & stat.S_IWOTH)
