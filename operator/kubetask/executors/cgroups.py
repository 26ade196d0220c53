"""What the dispatcher's cgroups have in common, whichever controller (`account_cpu.py`,
`account_pids.py`, `attempt_memory.py`): each attempt and warm instance gets a group of its
own inside its account's, `kubetask/<account>/p<dispatcher pid>-<n>` under the dispatcher's
own group of that hierarchy, joined by the shell that starts its process before the function
runs (`parent_death.py`), so whatever it forks is born inside, and ended with it.

Ending a group kills everything still in it and removes it: a process that left its session
(`setsid`, a daemon) outlived its attempt, as it cannot on Kubernetes, where the pod ends it. A
dispatcher killed outright leaves its groups, and what escaped into them: the next one to start
on the host ends the groups of dispatchers no longer running (named for their process).

A function run as its account's user may write its own groups' `cgroup.procs` and nothing else
of a hierarchy: the kernel lets a process move only processes of its own user, and only into a
group whose `cgroup.procs` it may write, so a tenant can neither leave its account's groups,
nor change their limits, nor move anyone else. Only cgroup v1 is handled (see
`account_cpu.py`).

Nor may it look at another account's: every user of a host may read a cgroup hierarchy, and a
tenant's function listed `kubetask/` (the names of the accounts running on the host, which are
a tenant's business) and read another account's `pids.current` and `tasks` (seen). So
`kubetask/` may be passed through but not listed (`0711`), and an account's group only by its
own user's group (`0710`, the account's user's group id is its user id), which is all its
processes need to join their groups.
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

from .orphans import owner_gone

log = logging.getLogger(__name__)

# How many times an ending group is emptied before it is left to be removed later: each round
# kills what is in it, and only what was forked since the round before can be left.
END_ROUNDS = 100
END_PAUSE = 0.01


def own_group(mountinfo: str, cgroups: str, controller: str) -> Path | None:
    """Where this process's group of the v1 `controller` hierarchy (of the v2 one, for "") is,
    from /proc/self/mountinfo and /proc/self/cgroup; None without one."""
    mount = None
    for line in mountinfo.splitlines():
        fields = line.split(" - ", 1)
        if len(fields) != 2:
            continue
        kind, _, options = [*fields[1].split(" "), "", ""][:3]
        if controller:
            wanted = kind == "cgroup" and controller in options.split(",")
        else:
            wanted = kind == "cgroup2"
        if wanted:
            root, point = line.split(" ")[3:5]
            mount = (root, point)
            break
    if mount is None:
        return None
    for line in cgroups.splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            root, point = mount
            inside = path[len(root) :] if path.startswith(root) and root != "/" else path
            return Path(point) / inside.lstrip("/")
    return None


class Group:
    """One attempt's or warm instance's group of one hierarchy, inside its account's."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.procs = str(path / "cgroup.procs")  # what its first process joins

    def out_of_memory(self) -> str | None:
        """Why the kernel killed a process of the group for memory, None if it did not (only
        a `memory` group can say: `attempt_memory.py`); read before the group ends."""
        return None

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


def end_orphans(base: Path) -> None:
    """Ends the groups of dispatchers no longer running: what escaped into them would run on
    for ever, outside every budget. Then removes the accounts' groups left empty (the kernel
    refuses to remove one with groups or processes in it); a dispatcher finding its account's
    gone makes it again."""
    for group in base.glob("*/p*-*"):
        named = _GROUP_NAME.fullmatch(group.name)
        if named is None or not group.is_dir() or not owner_gone(int(named.group(1))):
            continue
        Group(group).end_now()
    for account in base.iterdir():
        if account.is_dir():
            with contextlib.suppress(OSError):
                account.rmdir()


def out_of_memory(groups: list[Group]) -> str | None:
    """Why the kernel killed a process of an attempt's or instance's `groups` for memory, if
    it did; read before they end."""
    return next((why for g in groups if (why := g.out_of_memory())), None)


async def end_groups(groups: list[Group]) -> None:
    for group in groups:
        await group.end()


_names = itertools.count()


def new_group(parent: Path, uid: int | None) -> Group | None:
    """A new group inside `parent`; with `uid`, one that user may join. Named for this
    dispatcher's process, so neighbours on the host never share one. None if it cannot be
    made (the parent removed meanwhile: made again at the next spawn)."""
    path = parent / f"p{os.getpid()}-{next(_names)}"
    try:
        path.mkdir()
        if uid is not None:
            os.chown(path / "cgroup.procs", uid, uid)
    except OSError:
        with contextlib.suppress(OSError):
            path.rmdir()
        return None
    return Group(path)


class Hierarchy:
    """The dispatcher's `kubetask` group in one v1 hierarchy, and its accounts' groups there.
    Subclasses say what a group of theirs holds (`configure_base`, `configure_account`)."""

    controller = ""

    def __init__(self, enabled: bool = True, off: str = "") -> None:
        self.enabled = enabled
        self._off = off  # the setting that turned it off, for `why_not`
        self._base: Path | None = None
        self._why_not: str | None = None
        self._accounts: dict[str, Path] = {}
        self._failed: set[str] = set()
        self._reachable: set[str] = set()  # accounts whose group only their user may enter

    def configure_base(self, base: Path) -> None:
        """Called once the dispatcher's `kubetask` group exists."""

    def configure_account(self, group: Path, account: str) -> None:
        """Called when an account's group is made."""

    def why_not(self) -> str | None:
        """Why groups of this hierarchy are not made; None if they are."""
        self._open()
        return self._why_not

    def _open(self) -> Path | None:
        if self._base is not None or self._why_not is not None:
            return self._base
        if not self.enabled:
            self._why_not = self._off
        elif os.geteuid() != 0:
            self._why_not = "only root can make cgroups"
        else:
            try:
                own = own_group(
                    Path("/proc/self/mountinfo").read_text(),
                    Path("/proc/self/cgroup").read_text(),
                    self.controller,
                )
                if own is None:
                    self._why_not = f"no cgroup v1 {self.controller} controller is mounted"
                else:
                    base = own / "kubetask"
                    base.mkdir(exist_ok=True)
                    base.chmod(0o711)
                    self.configure_base(base)
                    self._base = base
                    end_orphans(base)
            except OSError as err:
                self._why_not = f"cannot make a {self.controller} cgroup: {err}"
        return self._base

    def group(self, account: str, uid: int | None) -> Group | None:
        """A new group for one attempt or instance of `account`, inside the account's (made on
        first use); with `uid`, one that user may join. None where there are no groups."""
        base = self._open()
        if base is None:
            return None
        parent = self._accounts.get(account)
        if parent is None or not parent.is_dir():  # another dispatcher on the host may remove it
            parent = base / account
            try:
                parent.mkdir(exist_ok=True)
                self.configure_account(parent, account)
            except OSError as err:
                if account not in self._failed:  # said once, not at every spawn
                    self._failed.add(account)
                    log.warning("account %s: no %s cgroup (%s)", account, self.controller, err)
                return None
            self._failed.discard(account)
            self._reachable.discard(account)  # made again: opened to its user again below
            self._accounts[account] = parent
        if uid is not None and account not in self._reachable:
            try:
                os.chown(parent, 0, uid)
                parent.chmod(0o710)
            except OSError as err:
                log.warning(
                    "account %s: its %s cgroup stays open (%s)", account, self.controller, err
                )
            else:
                self._reachable.add(account)
        return new_group(parent, uid)

    def close(self) -> None:
        """Remove the accounts' groups nothing runs in any more (a neighbour dispatcher's
        still do)."""
        for group in self._accounts.values():
            with contextlib.suppress(OSError):
                group.rmdir()
        self._accounts.clear()
        self._reachable.clear()
