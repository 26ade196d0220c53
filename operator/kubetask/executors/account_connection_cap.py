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

A sixteenth each still lets sixteen busy accounts fill the table together, so all accounts'
functions together hold at most `KUBETASK_FUNCTIONS_MAX_CONNECTIONS` (75% of the table by
default; a number, a share, or 0 for no cap), counted by one rule over every account's user
before each account's own. What is left stays the platform's and the host's.

One rule per account and address family, added before the account's first process starts on
this dispatcher, in a chain entered only by a tenant's first packet of a connection.
"""

from __future__ import annotations

from pathlib import Path

from ..settings import env_count_or_share, env_int
from .firewall import AccountRules, chain, end_orphans, mark, restore_now

CHAIN = "KUBETASK-ACCOUNTS-CAP"  # from OUTPUT
SETTING = "KUBETASK_ACCOUNT_MAX_CONNECTIONS"
_TABLE = Path("/proc/sys/net/netfilter/nf_conntrack_max")
# The table's size where the host does not say it (no conntrack loaded yet): a usual one.
_UNKNOWN_TABLE = 262_144
SHARE = 16
ALL_SETTING = "KUBETASK_FUNCTIONS_MAX_CONNECTIONS"
ALL_DEFAULT = "75%"


def _table() -> int:
    try:
        return int(_TABLE.read_text())
    except (OSError, ValueError):
        return _UNKNOWN_TABLE


def most_setting() -> int:
    return env_int(SETTING, max(_table() // SHARE, 1), low=0)


def all_setting() -> int:
    """What all accounts' functions on this host may hold together; 0 for no cap."""
    return env_count_or_share(ALL_SETTING, ALL_DEFAULT, "connections", _table)


class AccountConnectionCap(AccountRules):
    """`why_not`: why an account's functions may open connections without a cap; None if they
    may not."""

    stays_open = "IPv6 connections are not capped"
    chain_name = CHAIN
    purpose = "cap its connections"

    def __init__(self, enabled: bool, tenants: str, most: int, all_most: int = 0) -> None:
        """`tenants`: the account users' id range (`first-last`); `most`: an account's cap,
        `all_most`: all accounts' together, 0 for none."""
        super().__init__(enabled)
        self.tenants = tenants
        self.most = most
        self.all_most = all_most
        if enabled and most == 0 and all_most == 0:
            self._why_not = f"{SETTING}=0 and {ALL_SETTING}=0"

    def _guards(self, verb: str) -> str:
        new = f"{verb} {CHAIN} -m conntrack --ctstate NEW -m owner --uid-owner {self.tenants}"
        rules = ""
        if self.all_most:
            over = f"-m connlimit --connlimit-above {self.all_most} --connlimit-mask 0"
            rules += f"{new} {over} {mark()} -j REJECT\n"
        if self.most:
            rules += f"{new} {mark()} -j {CHAIN}-EACH\n"
        return rules

    def _account(self, verb: str, uid: int) -> str:
        if not self.most:
            return ""
        over = f"-m connlimit --connlimit-above {self.most} --connlimit-mask 0"
        return f"{verb} {CHAIN}-EACH -m owner --uid-owner {uid} {over} {mark()} -j REJECT\n"

    def _make(self, family: str) -> None:
        chain(family, f"{CHAIN}-EACH")
        chain(family, CHAIN, "OUTPUT")
        end_orphans(family, (CHAIN, f"{CHAIN}-EACH"))
        restore_now([family], "*filter\n" + self._guards("-A") + "COMMIT\n")
