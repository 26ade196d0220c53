"""Who may connect to a local warm instance's port: the dispatcher and the instance's own
account, and nobody from outside the host.

An instance listens on a TCP port of the host (`$PORT`, `server.py`), and the kernel lets any
process connect to any port, whatever its user: another account's function could find it
(`/proc/net/tcp` lists every listening socket to everyone) and invoke it outside the platform,
with no record, no limit, and the instance's answer to whoever asked. A network namespace per
instance would close that, and take its network away with it: a new namespace has only a
loopback of its own, and giving it the host's network back is a bridge, addresses and NAT per
instance, what a CNI plugin does. The host's firewall is enough: while an instance lives, one
rule per address family refuses a connection to its port from a socket whose owner is neither
the platform's user nor the instance's (the kernel knows the owner of every connection made on
the host: `-m owner`), and one drops connections to it from outside the host.

Only a tenant's user can be told from the platform's, so this holds with
`KUBETASK_FUNCTION_USERS=accounts` (run as root) alone; with `platform` every function runs as
the platform's user, which may do anything the dispatcher does. An admin's instance (run as the
platform's user) is closed to every tenant.

A rule names its dispatcher's process in its comment, and a dispatcher starting removes those
of dispatchers no longer running: a stale rule opens nothing, but it would refuse the next
instance to listen on that port.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .orphans import owner_gone

log = logging.getLogger(__name__)

CHAIN = "KUBETASK-INSTANCES"  # from OUTPUT: connections made on the host
FROM_OUTSIDE = "KUBETASK-INSTANCES-IN"  # from INPUT: connections from elsewhere
FAMILIES = ("iptables", "ip6tables")
_OWNER = re.compile(r'--comment "?kubetask p([0-9]+)"?')


def listeners(port: int) -> set[int]:
    """The users owning a socket that listens on `port`, at any address, from /proc/net."""
    owners = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = Path("/proc/net", table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()  # sl, local address, remote, state (0A: listening), ..., uid
            if len(fields) > 7 and fields[3] == "0A" and fields[1].endswith(f":{port:04X}"):
                owners.add(int(fields[7]))
    return owners


@dataclass(frozen=True)
class PortRules:
    """The rules that close one instance's port, in `iptables-restore` form."""

    port: int
    uid: int
    families: tuple[str, ...]

    def lines(self, verb: str) -> str:
        who = f"-m owner ! --uid-owner {os.geteuid()}"
        if self.uid != os.geteuid():
            who += f" -m owner ! --uid-owner {self.uid}"
        mark = f'-m comment --comment "kubetask p{os.getpid()}"'
        tcp = f"-p tcp --syn --dport {self.port}"
        return (
            "*filter\n"
            f"{verb} {CHAIN} {tcp} -m addrtype --dst-type LOCAL {who} {mark}"
            " -j REJECT --reject-with tcp-reset\n"
            f"{verb} {FROM_OUTSIDE} {tcp} ! -i lo {mark} -j DROP\n"
            "COMMIT\n"
        )

    async def remove(self) -> None:
        """Once its instance is gone."""
        try:
            await _restore(self.families, self.lines("-D"))
        except (OSError, subprocess.CalledProcessError) as err:
            log.warning("port %d: its rules stay (%s)", self.port, _said(err))


class InstancePorts:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._why_not: str | None = None
        self._families: list[str] = []  # those whose chains are there

    def why_not(self) -> str | None:
        """Why instances' ports are not closed to other users; None if they are."""
        self._open()
        return self._why_not

    def _open(self) -> bool:
        """IPv4 is needed; IPv6 is used where the host has it."""
        if self._families or self._why_not is not None:
            return bool(self._families)
        if not self.enabled:
            self._why_not = "only with KUBETASK_FUNCTION_USERS=accounts"
            return False
        for family in FAMILIES:
            try:
                if shutil.which(family + "-restore") is None:
                    raise FileNotFoundError(f"no {family}-restore on this host")
                _chains(family)
                _end_orphans(family)
                self._families.append(family)
            except (OSError, subprocess.CalledProcessError) as err:
                if family == FAMILIES[0]:
                    self._why_not = f"cannot add firewall rules: {_said(err)}"
                    return False
                log.warning("%s: %s; IPv6 ports stay open", family, _said(err))
        return True

    async def guard(self, port: int, uid: int) -> PortRules | None:
        """Closes `port` to all but the platform's user and `uid` before an instance listens
        on it; None where ports cannot be closed. An instance is not started open where its
        rules could not be added."""
        if not self._open():
            return None
        rules = PortRules(port, uid, tuple(self._families))
        try:
            await _restore(self._families, rules.lines("-A"))
        except (OSError, subprocess.CalledProcessError) as err:
            raise RuntimeError(f"cannot close port {port} to other users: {_said(err)}") from err
        return rules


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout


def _chains(family: str) -> None:
    """Our chains, each jumped to first from its built-in one; made once per host, kept."""
    for chain, hook in ((CHAIN, "OUTPUT"), (FROM_OUTSIDE, "INPUT")):
        if subprocess.run([family, "-w", "-n", "-L", chain], capture_output=True).returncode:
            _run(family, "-w", "-N", chain)
        if subprocess.run([family, "-w", "-C", hook, "-j", chain], capture_output=True).returncode:
            _run(family, "-w", "-I", hook, "-j", chain)


def _end_orphans(family: str) -> None:
    for chain in (CHAIN, FROM_OUTSIDE):
        for rule in _run(family, "-w", "-S", chain).splitlines():
            owner = _OWNER.search(rule)
            if owner is None or not rule.startswith("-A "):
                continue
            if not owner_gone(int(owner.group(1))):
                continue
            subprocess.run([family, "-w", "-D", *shlex.split(rule[3:])], capture_output=True)


async def _restore(families: Sequence[str], lines: str) -> None:
    for family in families:
        program = family + "-restore"
        proc = await asyncio.create_subprocess_exec(
            program,
            "-w",
            "--noflush",
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _, err = await proc.communicate(lines.encode())
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, program, stderr=err.decode())


def _said(err: BaseException) -> str:
    if isinstance(err, subprocess.CalledProcessError) and err.stderr:
        return str(err.stderr).strip().splitlines()[-1]
    return str(err)
