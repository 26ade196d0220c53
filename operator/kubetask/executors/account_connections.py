"""A connection one account's function opens, on this host, to a socket of another account's
function is never answered.

Why: with `KUBETASK_FUNCTION_USERS=accounts` each account's functions run as a user of its own,
but the kernel lets any process connect to any port of the host, whatever its user. A function
that listens on a port for its own use (a database for the length of a job, a helper server,
a metrics agent over UDP) answered another account's function: seen, team-b's function read
what team-a's function, listening on 127.0.0.1, sent it, over TCP and over UDP. Warm instances'
ports were closed to other accounts (`instance_ports.py`); what a function opened itself was
not. A network namespace per account would close it too, and take the functions' network with
it (a bridge, addresses, NAT and a resolver per account to give it back).

How: the firewall remembers which account opened a connection and refuses another account's
answer to it. The first packet a tenant's socket sends on a connection no one marked marks it
(`CONNMARK`) with the account's user id and `OPENED_BY_A_TENANT`; a packet a tenant's socket
sends in answer (`--ctdir REPLY`) on a connection marked by another account is rejected. So a
TCP connection never opens (the listener's SYN-ACK does not leave; the client waits out its
connect timeout, as at a host that does not answer) and a UDP datagram gets no answer. The
datagram itself is dropped before it is read by `account_packets.py`, where the kernel can:
on the way in the firewall knows the sending socket's owner, not the receiving one's.
Connections the platform opens (the dispatcher invoking an instance), and those from other
hosts, carry no mark and are answered; a tenant's connections to the platform (the gateway's
API) and to its own account's sockets are answered.

Two rules per account and address family, added before the account's first process starts on
this dispatcher, in chains entered only by a tenant's first packet of a connection or by a
tenant's answer on a connection a tenant opened: other traffic passes two rules. Each rule
names its dispatcher in its comment (`firewall.py`), so a dispatcher starting removes those of
one killed outright. A connection another program marked first is left alone, as is every
connection in `platform` mode, where every function is the platform's user.
"""

from __future__ import annotations

from .firewall import AccountRules, chain, end_orphans, mark, restore_now

CHAIN = "KUBETASK-ACCOUNTS"  # from OUTPUT
OPENED = "KUBETASK-ACCOUNTS-OPENED"  # per account: mark what it opens
ANSWERS = "KUBETASK-ACCOUNTS-ANSWERS"  # per account: refuse its answers to another's
# The conntrack mark's bit that says a tenant's socket opened the connection; the rest of the
# mark is its account's user id, which is below 2**31 (`function_users.account_uid`).
OPENED_BY_A_TENANT = 0x80000000


def opened_by(uid: int) -> str:
    return f"{uid | OPENED_BY_A_TENANT:#x}"


class AccountConnections(AccountRules):
    """`why_not`: why accounts' functions answer each other's connections; None if they do not."""

    stays_open = "IPv6 connections stay open"
    chain_name = CHAIN
    purpose = "close it to other accounts' connections"

    def __init__(self, enabled: bool, tenants: str) -> None:
        """`tenants`: the account users' id range (`first-last`)."""
        super().__init__(enabled)
        self.tenants = tenants

    def _guards(self, verb: str) -> str:
        tenant = f"-m owner --uid-owner {self.tenants}"
        flag = f"{OPENED_BY_A_TENANT:#x}"
        return (
            f"{verb} {CHAIN} -m conntrack --ctstate NEW -m connmark --mark 0 {tenant} {mark()}"
            f" -j {OPENED}\n"
            f"{verb} {CHAIN} -m conntrack --ctdir REPLY -m connmark --mark {flag}/{flag} {tenant}"
            f" {mark()} -j {ANSWERS}\n"
        )

    def _account(self, verb: str, uid: int) -> str:
        own = f"-m owner --uid-owner {uid}"
        return (
            f"{verb} {OPENED} {own} {mark()} -j CONNMARK --set-mark {opened_by(uid)}\n"
            f"{verb} {ANSWERS} {own} -m connmark ! --mark {opened_by(uid)} {mark()} -j REJECT\n"
        )

    def _make(self, family: str) -> None:
        chain(family, OPENED)
        chain(family, ANSWERS)
        chain(family, CHAIN, "OUTPUT")
        end_orphans(family, (CHAIN, OPENED, ANSWERS))
        restore_now([family], "*filter\n" + self._guards("-A") + "COMMIT\n")
