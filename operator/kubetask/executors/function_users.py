"""Which operating-system user a function's processes run as on a local node.

With `KUBETASK_FUNCTION_USERS=accounts` (the platform run as root), a function runs with
the rights of whoever registered it. An admin's functions run as the platform's own user, as
Celery's tasks run as its worker's: an admin can do anything the platform can anyway. A
tenant's functions run as a user of their account's own, with no supplementary groups, no way
to gain privileges (no_new_privs: setuid programs such as `sudo` give nothing) and a umask of
077, so they cannot read the data directory (the admin token in `client.json`, every tenant's
payloads in the JetStream store), signal the platform's processes, or read or signal another
account's.

The default, `platform`, runs every function as the platform's user, as before: a tenant's
function can then read what the platform can. It stays the default because a user of its own
cannot run what lives where only the platform's user may look (an interpreter under a 0700
home directory, a script in a private temporary directory), and a platform not run as root
cannot switch users at all. The dispatcher says which it is in its log when it starts.

An account's user id is a hash of its name into [2**24, 2**31): stable across restarts and
dispatchers without any state to share, above the ranges distributions and user namespaces
hand out, and below 2**31 where some tools print ids as negative. Two accounts may share one
by chance (1 in 2.1 billion for a pair; 2.3% that any two of 10,000 accounts do): the price of
having nothing to allocate, written down in docs/security.md.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import resource
from dataclasses import dataclass, field
from pathlib import Path

from ..fairness import parse_weights
from ..models import TaskFunction
from ..networks import Network
from ..registrant import ADMIN, registered_by
from ..settings import WEIGHTS, env_choice, env_int, env_str, env_switch
from . import account_pids, account_scratch, function_egress, host_services, platform_ports
from .account_connection_cap import AccountConnectionCap, most_setting
from .account_connection_cap import all_setting as connections_all_setting
from .account_connections import AccountConnections
from .account_cpu import AccountCpu
from .account_homes import AccountHomes
from .account_memory import limit_setting
from .account_namespaces import AccountNamespace, AccountNamespaces
from .account_packets import AccountPackets
from .account_pids import AccountPids
from .account_sockets import AccountSockets
from .account_sockets import all_setting as sockets_all_setting
from .account_sockets import most_setting as sockets_most_setting
from .account_threads import AccountThreads
from .attempt_memory import AttemptMemory
from .base import base_environment
from .cgroups import Group
from .firewall import AccountRules, HostRules
from .function_egress import SETTING as DENIED_NETWORKS
from .function_egress import denied_networks
from .instance_ports import InstancePorts
from .platform_ports import SETTING as PLATFORM_PORTS
from .platform_ports import local_nats_ports, parse

log = logging.getLogger(__name__)
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_PR_SET_NO_NEW_PRIVS = 38
_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000

FIRST_UID = 1 << 24
UID_SPAN = (1 << 31) - FIRST_UID
LAST_UID = FIRST_UID + UID_SPAN - 1
TENANTS = f"{FIRST_UID}-{LAST_UID}"  # as `iptables -m owner` takes them

MODES = ("platform", "accounts")
OPEN_FILES = 1024  # Lambda's limit, which functions written for it live within


def open_files_setting() -> int:
    """`KUBETASK_FUNCTION_MAX_OPEN_FILES`, no more than the dispatcher's own hard limit: a
    tenant's shell may lower a limit, never raise one."""
    wanted = env_int("KUBETASK_FUNCTION_MAX_OPEN_FILES", OPEN_FILES, low=16)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)


# What a variable of a tenant's function is called while it crosses from root to its user.
HELD = "KT_HELD_"


def account_uid(account: str) -> int:
    digest = hashlib.sha256(account.encode()).digest()
    return FIRST_UID + int.from_bytes(digest[:8], "big") % UID_SPAN


@dataclass(frozen=True)
class RunAs:
    """An account's user, and the most processes (threads included) it may have at once: the
    kernel counts them per user (RLIMIT_NPROC), so the cap covers every function of the
    account, and a fork bomb in one stops there instead of taking the machine's process table.
    Root is exempt from the count, which is why only an account's own user can be capped.
    `namespaces`, where there are any, hold the namespaces its processes enter first
    (`account_namespaces.py`); `firewall`, the rules its account's connections are held to
    (`account_connections.py`, `account_connection_cap.py`); `threads`, the thread its
    processes are started from (`account_threads.py`).

    `max_open_files` is each process's descriptor limit, soft and hard, so a tenant cannot
    raise it. Inherited, it was the dispatcher's hard limit (a systemd service's is 524,288),
    and a handful of a tenant's processes could take the host's whole open-file table
    (`fs.file-max`), past which every other user's `open` fails. Root, the platform's user in
    accounts mode, is exempt from that table's limit; tenants are not."""

    uid: int
    max_processes: int
    namespaces: AccountNamespaces | None = field(default=None, compare=False, repr=False)
    firewall: tuple[AccountRules, ...] = field(default=(), compare=False, repr=False)
    threads: AccountThreads | None = field(default=None, compare=False, repr=False)
    max_open_files: int = OPEN_FILES

    def unreachable(self) -> tuple[str, ...]:
        """The host's directories its processes find something else at: their own /tmp."""
        if self.namespaces is None or not self.namespaces.scratch():
            return ()
        return self.namespaces.shadowed

    def setpriv_options(self) -> list[str]:
        uid = self.uid
        return [f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs"]

    def hand_over(self, env: dict[str, str]) -> tuple[dict[str, str], str]:
        """The environment to start `setpriv` with, and the shell that gives the function its
        own back once it runs as this user.

        `setpriv` runs as root until it switches users, and is an ordinary program: its loader
        honours `LD_PRELOAD`, `LD_LIBRARY_PATH`, `LD_DEBUG_OUTPUT`, `GLIBC_TUNABLES`..., and
        its locale `LOCPATH`, `GCONV_PATH`... A tenant sets its function's environment, so a
        tenant's `LD_PRELOAD` of a library it wrote in /tmp ran as root (seen: the loader wrote
        `LD_DEBUG_OUTPUT`'s file as root). Rather than list what a loader or a locale might
        read, every variable crosses the switch under a name nothing reads (`KT_HELD_<name>`),
        and the shell, as the account's user, exports it under its own name, by reference to the
        held one: the script holds names, never values (they would show in the process list).
        The names are identifiers: the grammar's for a function's own variables, a fixed list
        for those the platform passes on (`base.base_environment`)."""
        held = {HELD + name: value for name, value in env.items()}
        # Shortest first: a variable of the tenant's named `KT_HELD_X` is written only after X
        # has been read from the held `KT_HELD_X`, which it would otherwise overwrite.
        restore = "".join(
            f'export {name}="${HELD}{name}"; unset {HELD}{name}; ' for name in sorted(env, key=len)
        )
        return held, restore

    def shell_prelude(self) -> str:
        """Run first by the guard's shell, as the account's user: `ulimit -u` is bash's flag
        for processes, `-p` dash's; a shell that takes neither starts nothing. Without -H or
        -S, both shells set the hard limit with the soft one."""
        n, files = self.max_processes, self.max_open_files
        limits = f"{{ ulimit -u {n} || ulimit -p {n}; }} && ulimit -n {files}"
        return f"umask 077; {{ {limits}; }} 2>/dev/null || exit 125; "

    def become(self, namespace: AccountNamespace | None) -> None:
        """The same, from a `preexec_fn` (where there is no setpriv), entering the account's
        `namespace` first where there is one."""
        if namespace is not None:
            if _libc.setns(namespace.ipc, _CLONE_NEWIPC) != 0:
                raise OSError(ctypes.get_errno(), "setns(CLONE_NEWIPC) failed")
            here = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
            if _libc.setns(namespace.mount, _CLONE_NEWNS) != 0:
                raise OSError(ctypes.get_errno(), "setns(CLONE_NEWNS) failed")
            os.fchdir(here)  # entering a mount namespace moves to its root
            os.close(here)
        resource.setrlimit(resource.RLIMIT_NPROC, (self.max_processes, self.max_processes))
        files = self.max_open_files
        resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))
        os.setgroups([])
        os.setresgid(self.uid, self.uid, self.uid)
        os.setresuid(self.uid, self.uid, self.uid)
        os.umask(0o077)
        if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")


@dataclass(frozen=True)
class FunctionUsers:
    mode: str = field(default_factory=lambda: env_choice("KUBETASK_FUNCTION_USERS", MODES))
    max_processes: int = field(
        default_factory=lambda: env_int("KUBETASK_ACCOUNT_MAX_PROCESSES", 4096, low=1)
    )
    max_open_files: int = field(default_factory=open_files_setting)
    homes: AccountHomes = field(default_factory=AccountHomes, compare=False, repr=False)
    cpu: AccountCpu = field(
        default_factory=lambda: AccountCpu(
            parse_weights(env_str("KUBETASK_ACCOUNT_WEIGHTS", "", WEIGHTS)),
            env_switch("KUBETASK_ACCOUNT_CPU", True),
        ),
        compare=False,
        repr=False,
    )
    memory: AttemptMemory = field(
        default_factory=lambda: AttemptMemory(limit_setting()), compare=False, repr=False
    )
    pids: AccountPids = field(init=False, compare=False, repr=False)
    ports: InstancePorts = field(init=False, compare=False, repr=False)
    namespaces: AccountNamespaces = field(init=False, compare=False, repr=False)
    connections: AccountConnections = field(init=False, compare=False, repr=False)
    connection_cap: AccountConnectionCap = field(init=False, compare=False, repr=False)
    packets: AccountPackets = field(init=False, compare=False, repr=False)
    sockets: AccountSockets = field(init=False, compare=False, repr=False)
    threads: AccountThreads = field(init=False, compare=False, repr=False)
    # Ports of the platform's servers on this host besides NATS's (`platform_ports.py`).
    platform_ports: tuple[int, ...] = field(
        default_factory=lambda: parse(
            env_str(PLATFORM_PORTS, "", "port numbers separated by commas")
        ),
        compare=False,
    )
    # The host's own servers' ports tenants' functions may reach (`host_services.py`).
    host_ports: tuple[int, ...] = field(
        default_factory=lambda: parse(
            env_str(
                host_services.SETTING, host_services.DEFAULT, "port numbers separated by commas"
            ),
            host_services.SETTING,
        ),
        compare=False,
    )
    # Where no tenant's function may connect (`function_egress.py`).
    denied_networks: tuple[Network, ...] = field(default_factory=denied_networks, compare=False)
    # The firewall rules added at start (accounts mode), removed by `close`.
    rules: list[HostRules] = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        pids = AccountPids(self.max_processes, account_pids.all_setting())
        object.__setattr__(self, "pids", pids)  # frozen
        object.__setattr__(self, "ports", InstancePorts(self.mode == "accounts"))
        accounts = self.mode == "accounts"
        namespaces = AccountNamespaces(accounts, account_scratch.size_setting())
        object.__setattr__(self, "namespaces", namespaces)
        object.__setattr__(self, "connections", AccountConnections(accounts, TENANTS))
        cap = AccountConnectionCap(accounts, TENANTS, most_setting(), connections_all_setting())
        object.__setattr__(self, "connection_cap", cap)
        packets = AccountPackets(accounts, FIRST_UID, LAST_UID)
        object.__setattr__(self, "packets", packets)
        caps = sockets_most_setting(), sockets_all_setting()
        sockets = AccountSockets(accounts, FIRST_UID, LAST_UID, *caps)
        object.__setattr__(self, "sockets", sockets)
        user_namespaces = env_switch("KUBETASK_ACCOUNT_USER_NAMESPACES", False)
        object.__setattr__(self, "threads", AccountThreads(accounts, user_namespaces))
        if self.mode == "accounts" and os.geteuid() != 0:
            raise ValueError(
                "KUBETASK_FUNCTION_USERS=accounts: only root can run functions as their "
                "accounts' users; run the platform as root, or say platform"
            )

    def user_for(self, fn: TaskFunction) -> RunAs | None:
        """The user to run `fn`'s processes as; None for the platform's own."""
        if self.mode == "platform" or registered_by(fn) == ADMIN:
            return None
        uid = account_uid(fn.account)
        firewall = (self.connections, self.connection_cap)
        return RunAs(
            uid, self.max_processes, self.namespaces, firewall, self.threads, self.max_open_files
        )

    def environment(self, user: RunAs | None) -> dict[str, str]:
        """What a function's environment starts from: the platform's few variables, and for
        one run as its account's user, that account's own HOME and TMPDIR: its /tmp
        (`account_scratch.py`), else a directory on the host's (`account_homes.py`)."""
        base = base_environment()
        if user is not None and self.namespaces.scratch():
            base.update(account_scratch.ENVIRONMENT)
        elif user is not None:
            base.update(self.homes.environment(user.uid))
        return base

    def cgroups(self, fn: TaskFunction, user: RunAs | None) -> list[Group]:
        """New groups for one attempt or instance of `fn`: its account's CPU share
        (`account_cpu.py`) and process cap (`account_pids.py`) and, when it or its account has
        one, its memory limit (`attempt_memory.py`, `account_memory.py`); none where there are
        no groups."""
        uid = None if user is None else user.uid
        cpu = self.cpu.group(fn.account, uid)
        pids = self.pids.group(fn.account, uid)
        memory = self.memory.limited(fn, uid)
        return [g for g in (cpu, pids, memory) if g is not None]

    def close(self) -> None:
        self.homes.close()
        self.cpu.close()
        self.memory.close()
        self.pids.close()
        self.namespaces.close()
        self.connections.close()
        self.connection_cap.close()
        self.packets.close()
        self.sockets.close()
        self.threads.close()
        for rules in self.rules:
            rules.remove()
        self.rules.clear()

    def describe(self) -> str:
        if self.mode == "accounts":
            return "a tenant's functions run as their account's own user, an admin's as this one"
        who = "root" if os.geteuid() == 0 else "this platform's user"
        return (
            f"every function runs as {who}, and can read what the platform can "
            "(KUBETASK_FUNCTION_USERS=accounts, as root, gives each account a user of its "
            "own: docs/security.md)"
        )

    def _warn_of_the_open_file_table(self) -> None:
        """Each tenant's process is held to `max_open_files`; an account's together are not,
        and root is exempt from the host's table, so a full one stops only other accounts."""
        try:
            table = int(Path("/proc/sys/fs/file-max").read_text())
        except (OSError, ValueError):
            return
        most = self.max_processes * self.max_open_files
        if most >= table:
            log.warning(
                "an account's processes may together open every file this host allows "
                "(%d processes of %d descriptors; fs.file-max %d): lower "
                "KUBETASK_ACCOUNT_MAX_PROCESSES or KUBETASK_FUNCTION_MAX_OPEN_FILES",
                self.max_processes,
                self.max_open_files,
                table,
            )

    def announce(self, nats_url: str, own_ports: tuple[int, ...] = ()) -> None:
        """Said once by each dispatcher at start, before any function runs; closes the
        platform's ports on this host (NATS's, where `nats_url` names a loopback address,
        `own_ports` and `KUBETASK_PLATFORM_PORTS`) to tenants' listening sockets, NATS and
        the denied networks to their connections, and the host's other servers to them."""
        log.log(logging.INFO if self.mode == "accounts" else logging.WARNING, self.describe())
        if self.mode == "accounts":
            tenants = TENANTS
            nats = local_nats_ports(nats_url)
            ports = tuple(sorted({*nats, *own_ports, *self.platform_ports}))
            egress = function_egress.rules(self.denied_networks, tenants)
            reachable = tuple(sorted({*own_ports, *self.platform_ports, *self.host_ports}))
            for rules, open_to in (
                (
                    platform_ports.rules(ports, tenants, nats),
                    "may listen on the platform's ports and connect to NATS",
                ),
                (egress, f"may reach {DENIED_NETWORKS}"),
                (host_services.rules(reachable, tenants), "reach every server of this host"),
            ):
                self.rules.append(rules)
                why_not = rules.add()
                if why_not is not None:
                    log.warning("tenants' functions %s: %s", open_to, why_not)
            self.packets.start()
            self.sockets.start()
            self._warn_of_the_open_file_table()
        why_not = self.cpu.why_not()
        if why_not is None:
            log.info("functions' processes share the cores by account (a cpu cgroup each)")
        else:
            log.warning("functions' processes share the cores per process: %s", why_not)
        if self.memory.why_not() is None and self.memory.account_limit is not None:
            limit = self.memory.account_limit
            log.info("an account's functions hold at most %d bytes of memory together", limit)
        # What is not isolated on this host, and why.
        gaps = [
            (self.pids.why_not, "an account's processes are capped per user only"),
            (self.memory.why_not, "functions' memory limits are not applied on this host"),
            (self.ports.why_not, "warm instances' ports are open to every user of the host"),
        ]
        if self.mode == "accounts":
            ns = self.namespaces
            gaps += [
                (
                    self.connections.why_not,
                    "tenants' functions answer other accounts' connections",
                ),
                (self.packets.why_not, "tenants' functions read other accounts' datagrams"),
                (
                    self.sockets.why_not,
                    "an account's functions may hold every port of the host",
                ),
                (ns.why_not_hidden, "tenants' functions see every process of the host"),
                (ns.why_not_scratch, "tenants' functions share the host's /tmp and disk"),
                (ns.why_not_ipc, "tenants' functions share the host's IPC objects"),
                (ns.why_not_terminals, "tenants' functions open the host's terminals"),
                (self.threads.why_not_scope, "tenants' functions reach any abstract Unix socket"),
                (
                    self.threads.why_not_filter,
                    "tenants' functions may make user namespaces and use kernel AIO and io_uring",
                ),
                (self.threads.why_not_keyring, "tenants' functions share the platform's keyring"),
                (
                    self.connection_cap.why_not,
                    "an account's functions may fill the host's connection tracking table",
                ),
            ]
        for why_not_of, gap in gaps:
            if (why := why_not_of()) is not None:
                log.warning("%s: %s", gap, why)


def may_run(path: str, uid: int) -> bool:
    """Whether `uid` (whose group id is the same and who has no other groups) may execute
    `path`: search permission on every directory above it, execute permission on it. Asked
    here because the kernel answers only for the asking process's user, and a function that
    cannot start should say why rather than exit 126 from the guard."""
    given = os.path.abspath(path)
    real = os.path.realpath(given)
    if not (may_search(os.path.dirname(given), uid) and may_search(os.path.dirname(real), uid)):
        return False
    try:
        return _executable(os.stat(real), uid)
    except OSError:
        return False


def may_search(directory: str, uid: int) -> bool:
    """Whether `uid` may reach into `directory`: search permission on it and every directory
    above it. What is below one it may not search is neither there nor missing to it."""
    given = Path(os.path.abspath(directory))
    try:
        return all(_executable(os.stat(p), uid) for p in (given, *given.parents))
    except OSError:
        return False


def _executable(st: os.stat_result, uid: int) -> bool:
    """Execute (search, for a directory) permission as the owner, the group or others."""
    if st.st_uid == uid:
        return bool(st.st_mode & 0o100)
    if st.st_gid == uid:
        return bool(st.st_mode & 0o010)
    return bool(st.st_mode & 0o001)


def refused(program: str, uid: int) -> PermissionError:
    return PermissionError(
        errno.EACCES,
        f"Permission denied to uid {uid}, the user this account's functions run as "
        "(docs/security.md)",
        program,
    )
