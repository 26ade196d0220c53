"""A tenant's function cannot connect to the networks no function should reach: by default,
the cloud's instance metadata service.

Why: a webhook is kept from these addresses (`dispatch/webhooks.py`), but a tenant's function
is code of its own and may open any connection its host can. On a cloud machine
`169.254.169.254` answers whoever asks with the machine's credentials (its IAM role, its
service account's token): a tenant would hold what the whole platform holds, and more.

How: with `KUBETASK_FUNCTION_USERS=accounts`, one rule per network and address family rejects
what a socket of an account's user sends there (`-m owner`, the account user ids): a connection
fails at once (connection refused), a datagram is dropped with an ICMP error. The networks are
`KUBETASK_FUNCTION_DENIED_NETWORKS` (CIDRs separated by commas, or `none`), by default the
webhooks' (link-local, and the clouds' other metadata addresses). Added when the dispatcher
starts, before any function runs, removed when it stops (`firewall.py`). On Kubernetes the
operator keeps function pods from them with their account's NetworkPolicy. An admin's function
runs as the platform's user and is not held to them, as the platform itself is not; nor is
any function where every function runs as the platform's user (the default), since a rule
cannot tell it from the platform.
"""

from __future__ import annotations

from ..networks import DEFAULT_DENIED, Network, parse_networks
from ..settings import NETWORKS, env_str
from .firewall import HostRules

CHAIN = "KUBETASK-EGRESS"  # from OUTPUT
SETTING = "KUBETASK_FUNCTION_DENIED_NETWORKS"


def denied_networks() -> tuple[Network, ...]:
    """`KUBETASK_FUNCTION_DENIED_NETWORKS`, read by the dispatchers (rules on one host) and the
    operator (each account's NetworkPolicy: `controllers/network_policies.py`)."""
    return parse_networks(SETTING, env_str(SETTING, DEFAULT_DENIED, NETWORKS))


def rules(networks: tuple[Network, ...], tenants: str) -> HostRules:
    """The rules that keep the users `tenants` (a uid range) from sending to `networks`."""

    def family_rules(family: str) -> list[str]:
        version = 4 if family == "iptables" else 6
        return [
            f"-d {net} -m owner --uid-owner {tenants} -j REJECT"
            for net in networks
            if net.version == version
        ]

    return HostRules(CHAIN, "OUTPUT", family_rules)
