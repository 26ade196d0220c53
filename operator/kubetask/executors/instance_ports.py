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

The platform's user may connect, for the dispatcher's invocations; but a webhook is the
platform's user connecting where a tenant said, and a webhook naming another account's
instance port (`http://127.0.0.1:<port>/invoke`) invoked that instance with the tenant's
payload (seen). Webhook sockets carry `WEBHOOK_MARK` (`SO_MARK`, `dispatch/webhooks.py`),
and a third rule refuses a marked connection to the port, whoever made it.

A rule names its dispatcher's process in its comment, and a dispatcher starting removes those
of dispatchers no longer running: a stale rule opens nothing, but it would refuse the next
instance to listen on that port.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .firewall import Chains, chain, end_orphans, mark, restore, said

log = logging.getLogger(__name__)

CHAIN = "KUBETASK-INSTANCES"  # from OUTPUT: connections made on the host
FROM_OUTSIDE = "KUBETASK-INSTANCES-IN"  # from INPUT: connections from elsewhere
# The socket mark of the dispatcher's webhook connections: a bit kube-proxy, Calico's default
# mask and Cilium leave alone on a host running the local executor.
WEBHOOK_MARK = 0x20000000


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
        tcp = f"-p tcp --syn --dport {self.port}"
        return (
            "*filter\n"
            f"{verb} {CHAIN} {tcp} -m addrtype --dst-type LOCAL {who} {mark()}"
            " -j REJECT --reject-with tcp-reset\n"
            f"{verb} {CHAIN} {tcp} -m addrtype --dst-type LOCAL"
            f" -m mark --mark {WEBHOOK_MARK:#x}/{WEBHOOK_MARK:#x} {mark()}"
            " -j REJECT --reject-with tcp-reset\n"
            f"{verb} {FROM_OUTSIDE} {tcp} ! -i lo {mark()} -j DROP\n"
            "COMMIT\n"
        )

    async def remove(self) -> None:
        """Once its instance is gone."""
        try:
            await restore(self.families, self.lines("-D"))
        except (OSError, subprocess.CalledProcessError) as err:
            log.warning("port %d: its rules stay (%s)", self.port, said(err))


class InstancePorts(Chains):
    """`why_not`: why instances' ports are not closed to other users; None if they are."""

    stays_open = "IPv6 ports stay open"

    def _make(self, family: str) -> None:
        chain(family, CHAIN, "OUTPUT")
        chain(family, FROM_OUTSIDE, "INPUT")
        end_orphans(family, (CHAIN, FROM_OUTSIDE))

    async def guard(self, port: int, uid: int) -> PortRules | None:
        """Closes `port` to all but the platform's user and `uid` before an instance listens
        on it; None where ports cannot be closed. An instance is not started open where its
        rules could not be added."""
        if not self._open():
            return None
        rules = PortRules(port, uid, tuple(self._families))
        try:
            await restore(self._families, rules.lines("-A"))
        except (OSError, subprocess.CalledProcessError) as err:
            raise RuntimeError(f"cannot close port {port} to other users: {said(err)}") from err
        return rules
