"""How many connections an account's functions may have open at once on one host.

Why: the kernel tracks every connection a process opens (TCP, and each UDP peer it sends to)
in one table for the whole host, `nf_conntrack_max` entries (262,144 on a 24 GB machine). A full
table drops every new connection of the host, the platform's own among them: NATS clients,
the gateway's callers, the dispatcher's calls to warm instances. Seen 2026-12-05: one
unprivileged process sending a byte of UDP to each of 300,000 loopback addresses filled it in
1.4 s (in a network namespace of its own, whose entries count against the same limit), and
an unanswered datagram's entry stays 30 s (a SYN never answered, 120 s). With
`KUBETASK_FUNCTION_USERS=accounts` each account's functions run as a user of its own, which a
rule can count by.

How: every new connection a tenant's socket opens passes one rule of its account's, which
refuses it (`REJECT`: the process is told `Operation not permitted`, or the connection is
refused) while the account holds `KUBETASK_ACCOUNT_MAX_CONNECTIONS` the table still tracks
(`connlimit`, counting the account's connections of every address, per address family). A
closed TCP connection is not counted while it waits out its TIME_WAIT. The default is a
sixteenth of the host's table, so that no one account can fill it; `0` caps nothing. The
platform's connections and an admin's function's are not counted.

One rule per account and address family, added before the account's first process starts on
this dispatcher, in a chain entered only by a tenant's first packet of a connection.
"""

from __future__ import annotations

from pathlib import Path

from ..settings import env_int
from .firewall import AccountRules, chain, end_orphans, mark, restore_now

CHAIN = "KUBETASK-ACCOUNTS-CAP"  # from OUTPUT
SETTING = "KUBETASK_ACCOUNT_MAX_CONNECTIONS"
_TABLE = Path("/proc/sys/net/netfilter/nf_conntrack_max")
# The table's size where the host does not say it (no conntrack loaded yet): a usual one.
_UNKNOWN_TABLE = 262_144
SHARE = 16


def most_setting() -> int:
    try:
        table = int(_TABLE.read_text())
    except (OSError, ValueError):
        table = _UNKNOWN_TABLE
    return env_int(SETTING, max(table // SHARE, 1), low=0)


class AccountConnectionCap(AccountRules):
    """`why_not`: why an account's functions may open connections without a cap; None if they
    may not."""

    stays_open = "IPv6 connections are not capped"
    chain_name = CHAIN
    purpose = "cap its connections"

    def __init__(self, enabled: bool, tenants: str, most: int) -> None:
        """`tenants`: the account users' id range (`first-last`); `most`: the cap, 0 for none."""
        super().__init__(enabled)
        self.tenants = tenants
        self.most = most
        if enabled and most == 0:
            self._why_not = f"{SETTING}=0"

    def _guards(self, verb: str) -> str:
        tenant = f"-m owner --uid-owner {self.tenants}"
        return f"{verb} {CHAIN} -m conntrack --ctstate NEW {tenant} {mark()} -j {CHAIN}-EACH\n"

    def _account(self, verb: str, uid: int) -> str:
        over = f"-m connlimit --connlimit-above {self.most} --connlimit-mask 0"
        return f"{verb} {CHAIN}-EACH -m owner --uid-owner {uid} {over} {mark()} -j REJECT\n"

    def _make(self, family: str) -> None:
        chain(family, f"{CHAIN}-EACH")
        chain(family, CHAIN, "OUTPUT")
        end_orphans(family, (CHAIN, f"{CHAIN}-EACH"))
        restore_now([family], "*filter\n" + self._guards("-A") + "COMMIT\n")
