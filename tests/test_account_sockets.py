"""`account_sockets.py` against the kernel: real sockets of real users, each account held to
its cap and all accounts to theirs, with the programs linked and after they are closed."""

from __future__ import annotations

import socket
import subprocess

from harness import python_as
from kubetask.executors.account_sockets import AccountSockets

FIRST, LAST = 3_001_000, 3_001_999  # tenants here
# Makes sockets until refused (or 20), says how many and why it stopped, then holds them until
# its standard input closes.
HOLD = """
import socket, sys
held, why = [], None
try:
    while len(held) < 20:
        held.append(socket.socket(socket.AF_INET6 if len(held) % 2 else socket.AF_INET))
except OSError as err:
    why = err.strerror
print(len(held), why, flush=True)
sys.stdin.read()
"""
# Listens, says its port, accepts three connections once told to and closes them, then makes
# sockets until refused and says how many.
ACCEPT = """
import socket, sys
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
sys.stdin.readline()
for _ in range(3):
    server.accept()[0].close()
held = []
try:
    while len(held) < 20:
        held.append(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
except OSError:
    pass
print(len(held), flush=True)
"""


def _as(uid: int, script: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        python_as(uid, script),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _made(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline().strip()


def test_an_account_holds_at_most_its_sockets_and_all_accounts_theirs() -> None:
    sockets = AccountSockets(True, FIRST, LAST, 5, 8)
    sockets.start()
    held: list[subprocess.Popen[str]] = []
    try:
        assert sockets.why_not() is None
        held.append(_as(FIRST, HOLD))
        assert _made(held[-1]) == "5 Operation not permitted"  # its own cap
        held.append(_as(FIRST + 1, HOLD))
        assert _made(held[-1]) == "3 Operation not permitted"  # what all accounts have left
        for uid in (0, 1000):  # the platform, and a user of the host that is no tenant
            held.append(_as(uid, HOLD))
            assert _made(held[-1]) == "20 None"
        held[0].communicate("")  # its sockets released, the count goes down
        held.append(_as(FIRST + 2, HOLD))
        assert _made(held[-1]) == "5 Operation not permitted"
    finally:
        for proc in held:
            proc.communicate("")
        sockets.close()
    # Closing unlinks them.
    free = _as(FIRST, HOLD)
    assert _made(free) == "20 None"
    free.communicate("")


def test_a_connection_a_tenant_accepts_is_not_taken_off_its_count() -> None:
    """An accepted socket is not counted when made, so its release must not count either:
    else a tenant could bring its count down by accepting its own connections."""
    sockets = AccountSockets(True, FIRST, LAST, 5, 100)
    sockets.start()
    try:
        server = _as(FIRST, ACCEPT)
        port = int(_made(server))
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        out, _ = server.communicate("go\n")
        for client in clients:
            client.close()
        assert out.split() == ["4"]  # the listener is one of its 5
    finally:
        sockets.close()


def test_with_both_caps_0_nothing_is_linked() -> None:
    sockets = AccountSockets(True, FIRST, LAST, 0, 0)
    sockets.start()
    assert sockets.why_not() == (
        "KUBETASK_ACCOUNT_MAX_SOCKETS and KUBETASK_FUNCTIONS_MAX_SOCKETS are 0"
    )
