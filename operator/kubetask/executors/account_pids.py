"""At most `KUBETASK_ACCOUNT_MAX_PROCESSES` processes per account on one host, whatever user
its functions run as: a cgroup v1 `pids` group for each account (`pids.max`), each attempt and
warm instance in a group of its own inside it (`cgroups.py`), counted together.

Why: the cap was the kernel's per-user process limit (RLIMIT_NPROC), which holds only for
functions run as their account's own user (`KUBETASK_FUNCTION_USERS=accounts`). Run as the
platform's user, the default, and as root, which that limit does not bind, a task's fork bomb
could take every process the host allows, and then no dispatcher could start a task, and no
NATS or gateway thread could start either. A tenant's user may join its own groups and change
nothing of them, so it cannot raise its cap. Without root or the v1 `pids` controller the cap
is the per-user limit alone, and the dispatcher says so in its log.
"""

from __future__ import annotations

from pathlib import Path

from .cgroups import Hierarchy


class AccountPids(Hierarchy):
    controller = "pids"

    def __init__(self, max_processes: int) -> None:
        super().__init__()
        self.max_processes = max_processes

    def configure_account(self, group: Path, account: str) -> None:
        (group / "pids.max").write_text(str(self.max_processes))
