"""At most `KUBETASK_ACCOUNT_MAX_SOCKETS` internet sockets per account on a host, and
`KUBETASK_FUNCTIONS_MAX_SOCKETS` for all accounts' functions together.

Why: a socket bound to a port, or one that sent a datagram before any bind, holds that port of
the host's ephemeral range (32768-60999 here: 28,232 ports) until it closes. A tenant holding
them all leaves the host none to connect from: the platform's own connections (the dispatcher
to NATS and to warm instances, webhooks), its name lookups and every other account's fail with
"address not available". The per-process open-file limit slows that down, not stops it
(28 processes of 1,024 would do), and the connection caps (`account_connection_cap.py`) count
tracked connections, not bound sockets.

How: two eBPF programs (`cgroup_bpf.py`) on the dispatcher's cgroup v2 group, which every
function's process is born in. When a tenant's process makes an internet socket, the first
counts it against its account (a map: account's user id → sockets) and writes the socket down
(a map: socket cookie → user id, as large as the all-accounts cap); past the account's cap, or
with that map full, `socket()` fails with EPERM ("Operation not permitted"). When a socket
written down is released, the second takes it off. A socket `accept()` returns is not made by
the process and holds no port of its own, so it is not counted. Two sockets made at the same
moment at the cap may both be let through: the count and the check are two steps.

Where the programs cannot be linked (see `account_packets.py`), the dispatcher says so at start.
"""

from __future__ import annotations

from pathlib import Path

from ..settings import env_count_or_share, env_int
from . import cgroup_bpf
from .cgroup_bpf import (
    ATOMIC_ADD_DW,
    CALL,
    EXIT,
    GET_CURRENT_UID_GID,
    GET_SOCKET_COOKIE,
    GOTO,
    IF_EQ64_K,
    IF_GE64_K,
    IF_GT_K,
    IF_LT_K,
    IF_NE64_K,
    LOAD_DW,
    LOAD_W,
    MAP_DELETE,
    MAP_LOOKUP,
    MAP_UPDATE,
    MOV,
    MOV32,
    MOV_K,
    ONLY_NEW,
    STACK,
    STORE_DW,
    STORE_W,
    Op,
    load_map,
    on_stack,
)

SETTING = "KUBETASK_ACCOUNT_MAX_SOCKETS"
DEFAULT = 4096
ALL_SETTING = "KUBETASK_FUNCTIONS_MAX_SOCKETS"
ALL_DEFAULT = "50%"
UNCAPPED = (1 << 31) - 1  # what a setting of 0 counts up to
# Where the programs keep what they work with, below the top of their stack.
_UID, _COOKIE, _ONE = -4, -16, -24
# The accounts the count holds at once; another one's sockets count against all accounts' cap
# only.
_ACCOUNTS = 1 << 16


def most_setting() -> int:
    return env_int(SETTING, DEFAULT, low=0)


def host_ports() -> int:
    """The host's ephemeral ports: the range it gives sockets that bind to port 0."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(high) - int(low) + 1
    except (OSError, ValueError):
        return 28232  # Linux's default range, 32768-60999


def all_setting() -> int:
    """What all accounts' functions on this host may hold together; 0 for no cap."""
    return env_count_or_share(ALL_SETTING, ALL_DEFAULT, "sockets", host_ports)


def _written_down(deny: str, sockets: int) -> list[Op | str]:
    """The socket in r6 written down as the account's (its user id on the stack); to `deny`
    when the map is full."""
    return [
        Op(MOV, dst=1, src=6),
        Op(CALL, imm=GET_SOCKET_COOKIE),
        Op(STORE_DW, dst=STACK, src=0, off=_COOKIE),
        *load_map(1, sockets),
        *on_stack(2, _COOKIE),
        *on_stack(3, _UID),
        Op(MOV_K, dst=4, imm=ONLY_NEW),
        Op(CALL, imm=MAP_UPDATE),
        Op(IF_NE64_K, dst=0, off=deny, imm=0),
    ]


def counting(first: int, last: int, most: int, counts: int, sockets: int) -> list[Op | str]:
    """On a socket made by a user in `first`..`last`: counted, or refused past `most`."""
    return [
        Op(MOV, dst=6, src=1),
        Op(CALL, imm=GET_CURRENT_UID_GID),
        Op(MOV32, dst=7, src=0),
        Op(IF_LT_K, dst=7, off="pass", imm=first),
        Op(IF_GT_K, dst=7, off="pass", imm=last),
        Op(STORE_W, dst=STACK, src=7, off=_UID),
        *load_map(1, counts),
        *on_stack(2, _UID),
        Op(CALL, imm=MAP_LOOKUP),
        Op(IF_EQ64_K, dst=0, off="first", imm=0),
        Op(LOAD_DW, dst=1, src=0),
        Op(IF_GE64_K, dst=1, off="deny", imm=most),
        Op(MOV, dst=8, src=0),
        *_written_down("deny", sockets),
        Op(MOV_K, dst=1, imm=1),
        Op(ATOMIC_ADD_DW, dst=8, src=1),
        Op(GOTO, off="pass"),
        "first",  # the account's first socket here
        *_written_down("deny", sockets),
        Op(MOV_K, dst=1, imm=1),
        Op(STORE_DW, dst=STACK, src=1, off=_ONE),
        *load_map(1, counts),
        *on_stack(2, _UID),
        *on_stack(3, _ONE),
        Op(MOV_K, dst=4, imm=ONLY_NEW),
        Op(CALL, imm=MAP_UPDATE),
        "pass",
        Op(MOV_K, dst=0, imm=1),
        Op(EXIT),
        "deny",
        Op(MOV_K, dst=0, imm=0),
        Op(EXIT),
    ]


def uncounting(counts: int, sockets: int) -> list[Op | str]:
    """On a socket released: taken off its account's count if it was written down."""
    return [
        Op(CALL, imm=GET_SOCKET_COOKIE),
        Op(STORE_DW, dst=STACK, src=0, off=_COOKIE),
        *load_map(1, sockets),
        *on_stack(2, _COOKIE),
        Op(CALL, imm=MAP_LOOKUP),
        Op(IF_EQ64_K, dst=0, off="pass", imm=0),
        Op(LOAD_W, dst=7, src=0),
        Op(STORE_W, dst=STACK, src=7, off=_UID),
        *load_map(1, sockets),
        *on_stack(2, _COOKIE),
        Op(CALL, imm=MAP_DELETE),
        *load_map(1, counts),
        *on_stack(2, _UID),
        Op(CALL, imm=MAP_LOOKUP),
        Op(IF_EQ64_K, dst=0, off="pass", imm=0),
        Op(MOV_K, dst=1, imm=-1),
        Op(ATOMIC_ADD_DW, dst=0, src=1),
        "pass",
        Op(MOV_K, dst=0, imm=1),
        Op(EXIT),
    ]


class AccountSockets(cgroup_bpf.Linked):
    """`why_not`: why an account's functions may hold any number of internet sockets; None
    once they may not."""

    def __init__(self, enabled: bool, first: int, last: int, most: int, all_most: int) -> None:
        """`first`, `last`: the account users' id range; `most`, `all_most`: the caps, each
        0 for none."""
        why_not = None if enabled else "functions run as the platform's user"
        if enabled and most == 0 and all_most == 0:
            why_not = f"{SETTING} and {ALL_SETTING} are 0"
        super().__init__(why_not)
        self._range = (first, last)
        self._most = most or UNCAPPED
        self._all = all_most or UNCAPPED

    def _programs(self, maps: list[int]) -> cgroup_bpf.Programs:
        maps.append(counts := cgroup_bpf.new_map(4, 8, _ACCOUNTS))
        maps.append(sockets := cgroup_bpf.new_map(8, 4, self._all))
        count = counting(*self._range, self._most, counts, sockets)
        where = cgroup_bpf.SOCK_CREATE, cgroup_bpf.SOCK_RELEASE
        return [
            (count, "kt_count", where[0], cgroup_bpf.SOCK),
            (uncounting(counts, sockets), "kt_uncount", where[1], cgroup_bpf.SOCK),
        ]
