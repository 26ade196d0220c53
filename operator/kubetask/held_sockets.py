"""Listening sockets that `kubetask dev` opens once and hands to every incarnation of the
gateway and of each dispatcher's metrics server.

Why: a component that dies is restarted, and in between its port was free. Anything on the
host could take it, a tenant's function included: with `KUBETASK_FUNCTION_USERS=accounts` the
firewall keeps a tenant from answering on a platform port (`executors/platform_ports.py`), not
from holding it, and the gateway or dispatcher that came back could not listen, exited, and was
restarted again and again for as long as the function ran. Held by the supervisor, the port is
never free while it runs. A client that connects while the gateway restarts also waits in the
socket's backlog for the next gateway instead of being refused.

nats-server cannot be handed a socket, so its port is free for the moment it restarts
(`docs/decisions.md`, tenancy).
"""

from __future__ import annotations

import socket

# As many connections as uvicorn's default backlog: the ones a restarting gateway will find.
BACKLOG = 2048


def hold(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host`:`port` (0: any free port) that children inherit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def adopt(fd: int) -> socket.socket:
    """The listening socket inherited as `fd`; a descriptor that is not one is refused here,
    rather than by the server that would then never accept anything."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as err:
        raise ValueError(f"file descriptor {fd} is not a socket: {err.strerror}") from None
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.type != socket.SOCK_STREAM or not listening:
        sock.detach()
        raise ValueError(f"file descriptor {fd} is not a listening TCP socket")
    sock.set_inheritable(False)  # not a tenant's function's to accept on
    return sock
