"""A tenant's function reaches no service of its host but the platform's and those listed: the
host's own servers do not answer a connection a tenant's function opens.

Why: with `KUBETASK_FUNCTION_USERS=accounts` a tenant's functions share the host's network, and
the kernel lets any process connect to any port of the host. A root-owned HTTP server on
127.0.0.1 answered a tenant's function with the host's `/tmp` listing (seen 2026-12-05). On a
host that is also something else, such servers are often open to localhost alone because
localhost is taken to be trusted: a Redis or a Docker API without a password, a kubelet's
read-only port, a metrics agent. A function in a pod, or in Lambda, has no way to them.

How: `account_connections.py` marks every connection a tenant's socket opens. A rule per
protocol and address family rejects an answer on such a connection from a socket of this host
whose owner is not an account's user (root's or a system user's: the host's servers), unless
it answers from one of the ports tenants may reach: the platform's (the gateway's API, the
metrics'; NATS refuses them itself: `platform_ports.py`) and `KUBETASK_FUNCTION_HOST_PORTS`
(by default 53, for a resolver on the host). The server's SYN-ACK is answered with a reset
and never leaves, so a TCP connection never opens (the client waits out its connect timeout,
as for a host that does not answer; the kernel has no owner to match on the way in), and a
datagram gets no answer. A connection the host's own programs open, or one from
another machine, carries no tenant's mark and is answered as before, as are the answers of
a tenant's own account, which `account_connections.py` rules on. Added when the dispatcher
starts, before any function runs, removed when it stops (`firewall.py`).

Each dispatcher's rules end in their refusals, so with several dispatchers on a host, a port
only the second knows is refused by the first's: every platform server on the host belongs in
`KUBETASK_PLATFORM_PORTS`, as for `platform_ports.py` (`kubetask dev` lists its own).
"""

from __future__ import annotations

from .account_connections import OPENED_BY_A_TENANT
from .firewall import HostRules

CHAIN = "KUBETASK-HOST-SERVICES"  # from OUTPUT: what this host's sockets answer
SETTING = "KUBETASK_FUNCTION_HOST_PORTS"
DEFAULT = "53"
# iptables' multiport match takes at most 15 ports.
_PER_RULE = 15


def rules(reachable: tuple[int, ...], tenants: str) -> HostRules:
    """The rules that keep the host's servers from answering the users `tenants` (a uid range)
    on any port but `reachable`. Every packet this host sends passes the first rule; only a
    packet of a connection a tenant opened goes further."""
    flag = f"{OPENED_BY_A_TENANT:#x}"
    # An answer on a connection a tenant opened, from a socket of the host's own servers. Each
    # refusal holds it whole, so none relies on the rules before it: removed one at a time
    # (`firewall.end_orphans`), what is left never refuses more.
    answer = (
        f"-m connmark --mark {flag}/{flag} -m conntrack --ctdir REPLY "
        f"-m owner --socket-exists ! --uid-owner {tenants}"
    )
    groups = [reachable[i : i + _PER_RULE] for i in range(0, len(reachable), _PER_RULE)]
    listed = [
        f"-p {protocol} -m multiport --sports {','.join(map(str, group))} -j RETURN"
        for protocol in ("tcp", "udp")
        for group in groups
    ]
    family_rules = [
        f"-m connmark ! --mark {flag}/{flag} -j RETURN",  # every other packet, at once
        *listed,
        f"-p tcp {answer} -j REJECT --reject-with tcp-reset",
        f"-p udp {answer} -j REJECT",
    ]
    return HostRules(CHAIN, "OUTPUT", lambda _family: family_rules)
