"""Networks given as settings (CIDRs separated by commas), and whether an address is in one.

Apart from `dispatch/webhooks.py`, which uses them, so that reading the settings does not
import an HTTP client.
"""

from __future__ import annotations

import ipaddress
import socket

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Link-local (169.254.169.254 is the metadata service of AWS, GCP, Azure and OpenStack),
# Alibaba Cloud's metadata address, and AWS's IPv6 one.
DEFAULT_DENIED = "169.254.0.0/16,fe80::/10,100.100.100.200/32,fd00:ec2::254/128"


def parse_networks(name: str, raw: str) -> tuple[Network, ...]:
    """`raw` is CIDRs separated by commas, or `none` to deny no network."""
    if raw.strip().lower() == "none":
        return ()
    networks = []
    for item in raw.split(","):
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{name}: {item.strip()!r} is not a network (a.b.c.d/n)") from None
    return tuple(networks)


def address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address `host` is written as, None for a name. IPv4 in every form the resolver
    takes as one (`inet_aton`'s: `2852039166`, `0xa9fea9fe`, `0251.254.43518`), which
    `ipaddress` does not: each of those is 169.254.169.254."""
    host = host.split("%", 1)[0]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if not host or not host[0].isdigit():
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def denied(host: str, networks: tuple[Network, ...]) -> Network | None:
    """The denied network the address `host` is written as is in, seen through an
    IPv4-mapped IPv6 form too; None for a name."""
    ip = address(host)
    if ip is None:
        return None
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    for net in networks:
        if ip in net or (mapped is not None and mapped in net):
            return net
    return None
