"""A CPU cgroup for each account, so the kernel shares the cores by account, not by process.

Why: the kernel gives each runnable process its turn, so an account running 64 CPU-bound
attempts left a neighbour's one warm instance about 1/65 of the cores: a no-op took 80 ms (p99
284) instead of 3, and the neighbour's next tasks waited seconds to be dispatched
(`bench/busy_neighbour.py`, 2026-12-02). With every process of an account's functions in a
group of its own, each account with work competes as one entity, weighted by its
`KUBETASK_ACCOUNT_WEIGHTS` weight (`cpu.shares` 1024 per unit), whatever number of processes it
runs. The accounts' groups sit in one `kubetask` group weighing 1024 per core, as the kubelet
weighs the group of all its pods, against 1024 for each busy thread of the platform's own
processes, which stay where they are: tenants' work cannot crowd out the dispatcher that must
start and stop it. The groups only weigh: an account alone may still use every core.

Where: under the dispatcher's own group of the cgroup v1 `cpu` hierarchy, in
`kubetask/<account>`, and each attempt and warm instance in a group of its own inside it
(together they weigh what the account does): how these groups are made, joined, guarded from
tenants and ended is `cgroups.py`'s.

Not everywhere: the dispatcher must be root, and the host must mount the v1 `cpu` controller
(as this project's test machines do). Under cgroup v2 alone, by its rules (not tried here:
no machine of this project has only v2), a group can only be made where the dispatcher's own
has been delegated to it, which is not done here; the dispatcher says in
its log which it is, and without groups the cores are shared per process, as before. On
Kubernetes each attempt and instance is a pod with a CPU request of its own.
"""

from __future__ import annotations

import os
from pathlib import Path

from .cgroups import Hierarchy

SHARES_PER_WEIGHT = 1024
# The kernel's range for cpu.shares.
MIN_SHARES, MAX_SHARES = 2, 262144


class AccountCpu(Hierarchy):
    controller = "cpu"

    def __init__(self, weights: dict[str, float], enabled: bool = True) -> None:
        super().__init__(enabled, off="KUBETASK_ACCOUNT_CPU=off")
        self.weights = weights

    def configure_base(self, base: Path) -> None:
        shares = SHARES_PER_WEIGHT * (os.cpu_count() or 1)
        (base / "cpu.shares").write_text(str(min(MAX_SHARES, shares)))

    def configure_account(self, group: Path, account: str) -> None:
        shares = int(SHARES_PER_WEIGHT * self.weights.get(account, 1.0))
        (group / "cpu.shares").write_text(str(min(MAX_SHARES, max(MIN_SHARES, shares))))
