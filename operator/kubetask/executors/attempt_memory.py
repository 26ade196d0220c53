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
says so in its log; a function that sets none runs without a memory group.
"""

from __future__ import annotations

import contextlib

from .. import quantities
from ..models import TaskFunction
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
    def killed_for_memory(self) -> bool:
        with contextlib.suppress(OSError, ValueError):
            for line in (self.path / "memory.oom_control").read_text().splitlines():
                name, _, count = line.partition(" ")
                if name == "oom_kill":
                    return int(count) > 0
            return int((self.path / "memory.failcnt").read_text()) > 0  # kernels before 4.13
        return False


class AttemptMemory(Hierarchy):
    controller = "memory"

    def limited(self, account: str, uid: int | None, limit: int) -> MemoryGroup | None:
        """A new group of `account` holding its processes to `limit` bytes; None where there
        are no groups."""
        group = self.group(account, uid)
        if group is None:
            return None
        try:
            (group.path / "memory.limit_in_bytes").write_text(str(limit))
            swap = group.path / "memory.memsw.limit_in_bytes"
            if swap.exists():
                swap.write_text(str(limit))
        except OSError:
            with contextlib.suppress(OSError):
                group.path.rmdir()
            return None
        return MemoryGroup(group.path)
