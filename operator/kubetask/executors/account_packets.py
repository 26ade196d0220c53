"""A packet one account's function sends on this host reaches no socket of another account.

Why: `account_connections.py` refuses a tenant's answer on another account's connection, so a
TCP connection to another account's listener never opens and a datagram gets no answer. The
datagram itself still arrived: on the way in, the firewall knows which user sent a packet but
not which user's socket will take it. A function reading UDP on 127.0.0.1 for its own use (a
metrics agent, a job's helper) read another account's datagrams as if its own (seen: team-q's
function's datagram reached team-p's listener, with the firewall's rules in place).

How: two eBPF programs (`cgroup_bpf.py`) linked to the dispatcher's cgroup v2 group, which
every function's process is born in and a tenant cannot leave. On what the group's sockets
send over the loopback device, the first marks a tenant's packet with its account's user id
and `OPENED_BY_A_TENANT`, as the connection mark is; on what they take in over loopback, the
second drops a packet marked by another account when the receiving socket is a tenant's. So
another account's datagram is never read, and its TCP connection never opens (its SYN is
dropped; its connect times out, as before). Packets from the platform (the gateway, an admin's
function, the dispatcher invoking an instance) and from other hosts carry no mark and are
taken, as are a tenant's packets to the platform and to its own account's sockets. The mark is
set after the firewall's hooks on the way out (nothing they match changes) and only on
loopback packets, which never leave the host. A link is undone when the dispatcher's process
ends, however it ends.

Where they cannot be linked (no cgroup v2 hierarchy mounted, a kernel before 5.7, not root),
the dispatcher says so at start, and another account's datagrams reach a tenant's sockets.
"""

from __future__ import annotations

from . import cgroup_bpf
from .account_connections import OPENED_BY_A_TENANT
from .cgroup_bpf import (
    AND_K,
    CALL,
    EXIT,
    GET_SOCKET_UID,
    IF_EQ_K,
    IF_EQ_X,
    IF_GT_K,
    IF_LT_K,
    IF_NE_K,
    IFINDEX,
    LOAD_W,
    LOOPBACK,
    MARK,
    MOV,
    MOV_K,
    OR_K,
    STORE_W,
    Op,
)

INGRESS_IFINDEX = 36  # `struct __sk_buff`: the device a received packet came in on


def marking(first: int, last: int) -> list[Op | str]:
    """On the way out: a loopback packet of a socket of a user in `first`..`last` is marked."""
    return [
        Op(MOV, dst=6, src=1),
        Op(LOAD_W, dst=2, src=1, off=IFINDEX),
        Op(IF_NE_K, dst=2, off="pass", imm=LOOPBACK),
        Op(CALL, imm=GET_SOCKET_UID),
        Op(IF_LT_K, dst=0, off="pass", imm=first),
        Op(IF_GT_K, dst=0, off="pass", imm=last),
        Op(OR_K, dst=0, imm=OPENED_BY_A_TENANT),
        Op(STORE_W, dst=6, src=0, off=MARK),
        "pass",
        Op(MOV_K, dst=0, imm=1),
        Op(EXIT),
    ]


def filtering(first: int, last: int) -> list[Op | str]:
    """On the way in: a loopback packet marked by a tenant is dropped if the receiving socket's
    user is another tenant."""
    return [
        Op(MOV, dst=6, src=1),
        Op(LOAD_W, dst=2, src=6, off=INGRESS_IFINDEX),
        Op(IF_NE_K, dst=2, off="pass", imm=LOOPBACK),
        Op(LOAD_W, dst=7, src=6, off=MARK),
        Op(MOV, dst=8, src=7),
        Op(AND_K, dst=8, imm=OPENED_BY_A_TENANT),
        Op(IF_EQ_K, dst=8, off="pass", imm=0),
        Op(MOV, dst=1, src=6),
        Op(CALL, imm=GET_SOCKET_UID),
        Op(IF_LT_K, dst=0, off="pass", imm=first),
        Op(IF_GT_K, dst=0, off="pass", imm=last),
        Op(AND_K, dst=7, imm=~OPENED_BY_A_TENANT & 0xFFFFFFFF),
        Op(IF_EQ_X, dst=7, src=0, off="pass"),
        Op(MOV_K, dst=0, imm=0),
        Op(EXIT),
        "pass",
        Op(MOV_K, dst=0, imm=1),
        Op(EXIT),
    ]


class AccountPackets(cgroup_bpf.Linked):
    """`why_not`: why another account's packets reach a tenant's sockets; None once they
    cannot."""

    def __init__(self, enabled: bool, first: int, last: int) -> None:
        """`first`, `last`: the account users' id range."""
        super().__init__(None if enabled else "functions run as the platform's user")
        self._range = (first, last)

    def _programs(self, maps: list[int]) -> cgroup_bpf.Programs:
        return [
            (marking(*self._range), "kt_mark", cgroup_bpf.EGRESS, cgroup_bpf.SKB),
            (filtering(*self._range), "kt_filter", cgroup_bpf.INGRESS, cgroup_bpf.SKB),
        ]
