"""`resources.limits.memory` on one host: each attempt and warm instance of a function that sets
it runs in a cgroup v1 `memory` group holding it to that limit, as its container would be on
Kubernetes.

Why: the limit was applied to pods only, so on one host a function's process could take all
the memory there was, pressing on every other account's tasks and on the platform until the
kernel's OOM killer acted (which then takes the function first: `parent_death.FIRST_TO_GO`).
Past its limit, the kernel kills the process inside its group, and the attempt fails saying
so (`out of memory: ...`), as a pod's container is `OOMKilled`. Swap counts too where the
kernel accounts it (`memory.memsw.limit_in_bytes`).

Where and how the groups are made, joined and ended is `cgroups.py`'s: the groups of the
`memory` hierarchy sit beside the `cpu` ones, `kubetask/<account>/<attempt or instance>`. A
tenant's user may join its own groups and change nothing of them, so it cannot raise its
limit. Without root or the v1 `memory` controller the limit is not applied, and the dispatcher
says so in its log. A function that sets none runs without a memory group, unless its
account's functions share a limit (`account_memory.py`): then every attempt has one, inside the
account's, to tell which limit the kernel killed it for.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from .. import quantities
from ..models import TaskFunction
from .account_memory import over_it
from .cgroups import Group, Hierarchy


def _written(fn: TaskFunction) -> str | None:
    resources = fn.spec.resources
    return None if resources is None else resources.limits.get("memory")


def memory_limit(fn: TaskFunction) -> int | None:
    """`resources.limits.memory` in bytes, if set."""
    limit = _written(fn)
    return None if limit is None else max(1, int(quantities.value(limit)))


def out_of_memory(fn: TaskFunction) -> str:
    """The error of an attempt the kernel killed for its limit, which it names as written."""
    return f"out of memory: over its limit of {_written(fn)} (resources.limits.memory)"


class MemoryGroup(Group):
    def __init__(self, path: Path, fn: TaskFunction, account_limit: int | None) -> None:
        super().__init__(path)
        self._fn = fn
        self._account_limit = account_limit

    def out_of_memory(self) -> str | None:
        killed, own = None, False
        with contextlib.suppress(OSError, ValueError):
            own = self._reached("memory") or self._reached("memory.memsw")
            for line in (self.path / "memory.oom_control").read_text().splitlines():
                name, _, count = line.partition(" ")
                if name == "oom_kill":
                    killed = int(count) > 0
        if killed is None:  # kernels before 4.13 count no kills: its own limit reached is the sign
            killed = own
        if not killed:
            return None
        # Killed at its own limit, or at its account's: its peak tells (`_reached`).
        if own or self._account_limit is None:
            return out_of_memory(self._fn)
        return over_it(self._account_limit)

    def _reached(self, counter: str) -> bool:
        """Whether the group's own limit was reached: its peak is the limit. Its failure count
        cannot say (with swap accounted, the kernel charges memory+swap first, and counts no
        failure of either: seen on 6.18)."""
        limit = self.path / f"{counter}.limit_in_bytes"
        if not limit.exists():
            return False
        peak = int((self.path / f"{counter}.max_usage_in_bytes").read_text())
        return peak >= int(limit.read_text())


def _limit(group: Path, limit: int) -> None:
    (group / "memory.limit_in_bytes").write_text(str(limit))
    swap = group / "memory.memsw.limit_in_bytes"
    if swap.exists():
        swap.write_text(str(limit))


class AttemptMemory(Hierarchy):
    controller = "memory"

    def __init__(self, account_limit: int | None = None) -> None:
        super().__init__()
        self.account_limit = account_limit

    def configure_account(self, group: Path, account: str) -> None:
        if self.account_limit is not None:
            _limit(group, self.account_limit)

    def limited(self, fn: TaskFunction, uid: int | None) -> MemoryGroup | None:
        """A new group for an attempt or instance of `fn` holding its processes to the
        function's limit, inside its account's; None where there are no groups, or no limit."""
        limit = memory_limit(fn)
        if limit is None and self.account_limit is None:
            return None
        group = self.group(fn.account, uid)
        if group is None:
            return None
        try:
            if limit is not None:
                _limit(group.path, limit)
        except OSError:
            with contextlib.suppress(OSError):
                group.path.rmdir()
            return None
        return MemoryGroup(group.path, fn, self.account_limit)
