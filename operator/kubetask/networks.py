"""Networks given as settings (CIDRs separated by commas), and whether an address is in one.

Apart from `dispatch/webhooks.py`, which uses them, so that reading the settings does not
import an HTTP client.
"""

from __future__ import annotations

import ipaddress

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


def denied(address: str, networks: tuple[Network, ...]) -> Network | None:
    """The denied network `address` is in, seen through an IPv4-mapped IPv6 form too."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    for net in networks:
        if ip in net or (mapped is not None and mapped in net):
            return net
    return None
