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
`kubetask/<account>/<attempt or instance>` (account names are DNS labels, so one path
component). A process is placed by the shell that starts it, before the function runs, so
whatever it forks is born inside (`parent_death.py`). For a function run as its account's user,
that user is given write access to its group's `cgroup.procs` and nothing else: the kernel lets
a process move only processes of its own user, and only into a group whose `cgroup.procs` it
may write, so a tenant can neither leave its account's groups, nor change its weight, nor move
anyone else.

Each attempt and each warm instance has a group of its own inside its account's (together they
weigh what the account does), so that what it started is found when it ends: a process that
left its session (`setsid`, a daemon) outlived its attempt, as it cannot on Kubernetes, where
the pod ends it. Ending a group kills everything still in it and removes it (`Group.end`). A
dispatcher killed outright leaves its groups, and what escaped into them: the next one to start
on the host ends the groups of dispatchers no longer running (named for their process).

Not everywhere: the dispatcher must be root, and the host must mount the v1 `cpu` controller
(as this project's test machines do). Under cgroup v2 alone, by its rules (not tried here:
no machine of this project has only v2), a group can only be made where the dispatcher's own
has been delegated to it, which is not done here; the dispatcher says in
its log which it is, and without groups the cores are shared per process, as before. On
Kubernetes each attempt and instance is a pod with a CPU request of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)

SHARES_PER_WEIGHT = 1024
# The kernel's range for cpu.shares.
MIN_SHARES, MAX_SHARES = 2, 262144
# How many times an ending group is emptied before it is left to be removed later: each round
# kills what is in it, and only what was forked since the round before can be left.
END_ROUNDS = 100
END_PAUSE = 0.01


def cpu_hierarchy(mountinfo: str, cgroups: str) -> Path | None:
    """Where this process's group of the v1 `cpu` controller is, from /proc/self/mountinfo
    and /proc/self/cgroup; None without one."""
    mount = None
    for line in mountinfo.splitlines():
        fields = line.split(" - ", 1)
        if len(fields) != 2:
            continue
        kind, _, options = [*fields[1].split(" "), "", ""][:3]
        if kind == "cgroup" and "cpu" in options.split(","):
            root, point = line.split(" ")[3:5]
            mount = (root, point)
            break
    if mount is None:
        return None
    for line in cgroups.splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            root, point = mount
            inside = path[len(root) :] if path.startswith(root) and root != "/" else path
            return Path(point) / inside.lstrip("/")
    return None


class Group:
    """One attempt's or warm instance's group, inside its account's."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.procs = str(path / "cgroup.procs")  # what its first process joins

    async def end(self) -> int:
        """Kills whatever still runs in the group, and removes it; returns how many were
        killed. A killed process leaves the group at once (a zombie is not listed)."""
        killed = 0
        for _ in range(END_ROUNDS):
            done, n = self._round()
            killed += n
            if done:
                return killed
            await asyncio.sleep(END_PAUSE)
        log.warning("%s still holds processes after %d rounds of killing", self.path, END_ROUNDS)
        return killed

    def end_now(self) -> None:
        """`end`, for a dispatcher starting, before it serves anything."""
        for _ in range(END_ROUNDS):
            if self._round()[0]:
                return
            time.sleep(END_PAUSE)

    def _round(self) -> tuple[bool, int]:
        """Kills the group's processes; whether it was empty (and is now removed) or gone."""
        pids = self._members()
        if pids is None:
            return True, 0
        if not pids:
            with contextlib.suppress(OSError):
                self.path.rmdir()
            return True, 0
        killed = 0
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        return False, killed

    def _members(self) -> list[int] | None:
        """The processes in the group (a read of cgroupfs, answered from memory), or None
        once it is gone."""
        try:
            return [int(pid) for pid in Path(self.procs).read_text().split()]
        except OSError:
            return None


_GROUP_NAME = re.compile(r"p([0-9]+)-[0-9]+")


def _end_orphans(base: Path) -> None:
    """Ends the groups of dispatchers no longer running: what escaped into them would run on
    for ever, outside every budget. Then removes the accounts' groups left empty (the kernel
    refuses to remove one with groups or processes in it); a dispatcher finding its account's
    gone makes it again."""
    for group in base.glob("*/p*-*"):
        named = _GROUP_NAME.fullmatch(group.name)
        if named is None or not group.is_dir():
            continue
        try:
            os.kill(int(named.group(1)), 0)
            continue  # its dispatcher runs (or the number went to another process)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        Group(group).end_now()
    for account in base.iterdir():
        if account.is_dir():
            with contextlib.suppress(OSError):
                account.rmdir()


class AccountCpu:
    def __init__(self, weights: dict[str, float], enabled: bool = True) -> None:
        self.weights = weights
        self.enabled = enabled
        self._base: Path | None = None
        self._why_not: str | None = None
        self._groups: dict[str, Path] = {}
        self._failed: set[str] = set()
        self._names = itertools.count()

    def why_not(self) -> str | None:
        """Why accounts' processes are not grouped; None if they are."""
        self._open()
        return self._why_not

    def _open(self) -> Path | None:
        if self._base is not None or self._why_not is not None:
            return self._base
        if not self.enabled:
            self._why_not = "KUBETASK_ACCOUNT_CPU=off"
        elif os.geteuid() != 0:
            self._why_not = "only root can make cgroups"
        else:
            try:
                own = cpu_hierarchy(
                    Path("/proc/self/mountinfo").read_text(), Path("/proc/self/cgroup").read_text()
                )
                if own is None:
                    self._why_not = "no cgroup v1 cpu controller is mounted"
                else:
                    base = own / "kubetask"
                    base.mkdir(exist_ok=True)
                    shares = SHARES_PER_WEIGHT * (os.cpu_count() or 1)
                    (base / "cpu.shares").write_text(str(min(MAX_SHARES, shares)))
                    self._base = base
                    _end_orphans(base)
            except OSError as err:
                self._why_not = f"cannot make a cpu cgroup: {err}"
        return self._base

    def group(self, account: str, uid: int | None) -> Group | None:
        """A new group for one attempt or instance of `account`, inside the account's (made on
        first use); with `uid`, one that user may join. None where there are no groups."""
        base = self._open()
        if base is None:
            return None
        parent = self._groups.get(account)
        if parent is None or not parent.is_dir():  # another dispatcher on the host may remove it
            parent = base / account
            try:
                parent.mkdir(exist_ok=True)
                shares = int(SHARES_PER_WEIGHT * self.weights.get(account, 1.0))
                (parent / "cpu.shares").write_text(str(min(MAX_SHARES, max(MIN_SHARES, shares))))
            except OSError as err:
                if account not in self._failed:  # said once, not at every spawn
                    self._failed.add(account)
                    log.warning("account %s: no cpu cgroup (%s), shared per process", account, err)
                return None
            self._failed.discard(account)
            self._groups[account] = parent
        # Named for this dispatcher's process, so neighbours on the host never share one.
        path = parent / f"p{os.getpid()}-{next(self._names)}"
        try:
            path.mkdir()
            if uid is not None:
                os.chown(path / "cgroup.procs", uid, uid)
        except OSError:
            with contextlib.suppress(OSError):
                path.rmdir()
            return None  # the account's removed meanwhile: made again at the next spawn
        return Group(path)

    def close(self) -> None:
        """Remove the accounts' groups nothing runs in any more (a neighbour dispatcher's
        still do)."""
        for group in self._groups.values():
            try:
                group.rmdir()
            except OSError:
                pass
        self._groups.clear()
