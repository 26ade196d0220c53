"""A tenant's function cannot answer on the platform's ports: a socket of an account's user
may not send from them.

Why: with `KUBETASK_FUNCTION_USERS=accounts` a tenant's function may listen on any free port of
the host, and the platform's are free for as long as one of its servers restarts (`kubetask
dev` restarts one that died). A function waiting for that moment would be the NATS server
every component logs in to with its password, or the gateway every client sends its token to.
The kernel lets a process bind any port above 1024, whatever its user, and a new server finds
its port taken rather than its clients finding the wrong server.

How: one rule per address family rejects a packet sent from any of the platform's ports by a
socket whose owner is an account's user (`function_users.FIRST_UID` and above: `-m owner`):
the answer to a connection's first packet included, so a connection to a tenant listening
there never opens, from this host or another (its client waits out its connect timeout, as
for a host that does not answer: the kernel has no owner to match on the way in). The ports:
NATS's, where its URL names a loopback address, the dispatcher's metrics port, and those
`KUBETASK_PLATFORM_PORTS` lists (`kubetask dev` adds its gateway's and dispatchers' metrics
ports; a platform run otherwise lists its own). Added when
the dispatcher starts, before any function runs, and removed when it stops; those of a
dispatcher killed outright, by the next (`firewall.py`). A tenant that took a port first still
keeps the platform's server from starting there until its function ends: the platform's
server says the port is in use rather than serving from the wrong one.

Nor may an account's user connect to NATS on this host (a reset at once). A function holds no
NATS credentials and has nothing to say there, and NATS takes 64K connections in all: a
tenant's processes (each allowed as many descriptors as its dispatcher) opening connections
without end would have kept a restarted component of the platform from getting one.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from .firewall import HostRules

CHAIN = "KUBETASK-PLATFORM"  # from OUTPUT: what a socket of this host sends
SETTING = "KUBETASK_PLATFORM_PORTS"
_LOCAL = ("127.0.0.1", "localhost", "::1", "0.0.0.0", "")
# iptables' multiport match takes at most 15 ports.
_PER_RULE = 15


def parse(raw: str, setting: str = SETTING) -> tuple[int, ...]:
    """`KUBETASK_PLATFORM_PORTS` (or `setting`): ports separated by commas."""
    ports = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or not 0 < int(part) < 65536:
            raise ValueError(f"{setting}={raw!r}: expected ports from 1 to 65535, by commas")
        ports.append(int(part))
    return tuple(sorted(set(ports)))


def local_nats_ports(nats_url: str) -> tuple[int, ...]:
    """The ports of the NATS servers `nats_url` names on this host."""
    ports = set()
    for url in nats_url.split(","):
        try:
            where = urlsplit(url.strip() if "://" in url else f"nats://{url.strip()}")
            if where.hostname in _LOCAL or where.hostname is None:
                ports.add(where.port or 4222)
        except ValueError:
            continue  # the connection refuses it, saying why
    return tuple(sorted(ports))


def rules(ports: tuple[int, ...], tenants: str, nats: tuple[int, ...] = ()) -> HostRules:
    """The rules that keep the users `tenants` (a uid range) from sending from `ports`, and
    from connecting to `nats` on any address of this host."""
    closed = [
        f"-p tcp -m multiport --{direction} {','.join(map(str, group))} {where}"
        f"-m owner --uid-owner {tenants} -j REJECT --reject-with tcp-reset"
        for direction, listed, where in (
            ("sports", ports, ""),
            ("dports", nats, "-m addrtype --dst-type LOCAL "),
        )
        for group in (listed[i : i + _PER_RULE] for i in range(0, len(listed), _PER_RULE))
    ]
    return HostRules(CHAIN, "OUTPUT", lambda _family: closed)
