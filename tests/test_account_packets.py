"""`account_packets.py` against the kernel: real sockets of real users, over IPv4 and IPv6
loopback, with the programs linked and after they are closed."""

from __future__ import annotations

import subprocess

import pytest
from harness import python_as
from kubetask.executors.account_packets import AccountPackets

FIRST, LAST = 3_000_000, 3_000_999  # tenants here; the listener is FIRST
# Binds a UDP socket on the address given, says its port, then writes each datagram it reads
# until none comes for a while.
LISTEN = """
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
print(s.getsockname()[1], flush=True)
s.settimeout(1.5)
try:
    while True:
        print(s.recv(64).decode(), flush=True)
except TimeoutError:
    pass
"""
SEND = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
socket.socket(family, socket.SOCK_DGRAM).sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
"""


def _read_by_a_tenant(address: str, senders: dict[str, int]) -> list[str]:
    """What a tenant's socket on `address` read of one datagram from each sender (by uid)."""
    listener = subprocess.Popen(
        python_as(FIRST, LISTEN, address), stdout=subprocess.PIPE, text=True
    )
    assert listener.stdout is not None
    port = listener.stdout.readline().strip()
    for word, uid in senders.items():
        subprocess.run(python_as(uid, SEND, address, port, word), check=True, timeout=30)
    out, _ = listener.communicate(timeout=30)
    return out.split()


@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
def test_a_tenants_socket_reads_no_other_accounts_datagrams(address: str) -> None:
    senders = {"own": FIRST, "neighbour": FIRST + 1, "platform": 0, "other-user": 1000}
    packets = AccountPackets(True, FIRST, LAST)
    packets.start()
    try:
        assert packets.why_not() is None
        assert _read_by_a_tenant(address, senders) == ["own", "platform", "other-user"]
    finally:
        packets.close()
    # Closing unlinks them: the neighbour's datagram is read again.
    assert _read_by_a_tenant(address, senders) == ["own", "neighbour", "platform", "other-user"]


def test_in_platform_mode_nothing_is_linked() -> None:
    packets = AccountPackets(False, FIRST, LAST)
    packets.start()
    assert packets.why_not() == "functions run as the platform's user"
