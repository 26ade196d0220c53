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

All accounts' groups sit in the host's `kubetask` group, whose `pids.max` is
`KUBETASK_FUNCTIONS_MAX_PROCESSES`: by default three quarters of what the host can number
(the smaller of `kernel.pid_max` and `kernel.threads-max`). Each account's cap alone did not
bound them together: with `kernel.pid_max` 32,768 (this project's test machine), eight
accounts at their 4,096 would have held every process id of the host, and then neither the
platform nor an administrator's shell could start anything (arithmetic, not run). The quarter
left is the host's and the platform's.
"""

from __future__ import annotations

from pathlib import Path

from ..settings import env_count_or_share
from .cgroups import Hierarchy

SETTING = "KUBETASK_FUNCTIONS_MAX_PROCESSES"
DEFAULT = "75%"


def all_setting() -> int:
    """What all functions on this host may hold together; 0 for no cap."""
    return env_count_or_share(SETTING, DEFAULT, "processes", host_processes)


def host_processes() -> int:
    """How many processes and threads this host can number at once."""
    limits = []
    for name in ("pid_max", "threads-max"):
        try:
            limits.append(int(Path(f"/proc/sys/kernel/{name}").read_text()))
        except (OSError, ValueError):
            continue
    return min(limits, default=32768)


class AccountPids(Hierarchy):
    controller = "pids"

    def __init__(self, max_processes: int, all_processes: int = 0) -> None:
        """`max_processes`: each account's cap; `all_processes`: all accounts' together, 0
        for none."""
        super().__init__()
        self.max_processes = max_processes
        self.all_processes = all_processes

    def configure_base(self, base: Path) -> None:
        (base / "pids.max").write_text(str(self.all_processes or "max"))

    def configure_account(self, group: Path, account: str) -> None:
        (group / "pids.max").write_text(str(self.max_processes))
