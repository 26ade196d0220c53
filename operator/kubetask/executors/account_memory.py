"""At most `KUBETASK_ACCOUNT_MAX_MEMORY` bytes of memory for all of an account's functions on
one host: a limit on the account's cgroup v1 `memory` group, inside which each attempt and
warm instance has its own (`attempt_memory.py`).

Why: a function's own limit (`resources.limits.memory`) bounds one attempt, and a function
need not set one. An account running many attempts could take the host's memory; the OOM
killer then takes the largest function process of the host, which may be a neighbour's one
large job rather than any of the hundred that caused it. And what an account keeps in its
/tmp (`account_scratch.py`) is memory too, charged to the account's group once the attempt
that wrote it has ended. With the limit, the kernel reclaims and, failing that, kills inside
the account's group only: its neighbours keep theirs.

Off by default (`0`), as a rate limit is: a host's operator knows how many accounts share it.
A size (`8Gi`) or a share of the host's memory (`50%`). On a host without the v1 `memory`
controller, or a dispatcher not run as root, it is not applied, and the dispatcher says so.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import quantities
from ..known_settings import note
from ..settings import share_of

SETTING = "KUBETASK_ACCOUNT_MAX_MEMORY"


def limit_setting(meminfo: str | None = None) -> int | None:
    """The most bytes an account's functions may hold on this host; None for no limit."""
    note(SETTING, "0", "a size such as 8Gi, a share of the host's memory such as 50%, or 0")
    raw = (os.environ.get(SETTING) or "0").strip()
    if raw in ("0", "off"):
        return None
    try:
        if raw.endswith("%"):
            return share_of(raw, _host_memory(meminfo))
        size = int(quantities.value(raw))
    except ValueError:
        raise ValueError(
            f"{SETTING}={raw!r}: expected a size such as 8Gi, a share such as 50%, or 0"
        ) from None
    if not 1 << 20 <= size <= quantities.MAX_VALUE:
        raise ValueError(f"{SETTING}={raw!r}: must be from 1Mi to {quantities.MAX}, or 0 for none")
    return size


def over_it(limit: int) -> str:
    """The error of an attempt the kernel killed for its account's limit."""
    return (
        f"out of memory: its account's functions are over their limit of {limit} bytes "
        f"on this host ({SETTING})"
    )


def _host_memory(meminfo: str | None) -> int:
    text = meminfo if meminfo is not None else Path("/proc/meminfo").read_text()
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise ValueError("no MemTotal in /proc/meminfo")
