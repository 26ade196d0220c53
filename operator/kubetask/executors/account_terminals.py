"""Each account's functions open pseudo-terminals from an instance of their own, of at most
`MOST` terminals, not from the host's.

Why: `/dev/ptmx` is open to every user, and the host has `kernel.pty.max` terminals in all
(4,096 by default). Run as its account's user, one tenant's process opened 300 of the host's
(seen 2026-12-05; `kernel.pty.nr` counted them), and with 20,000 descriptors it could have
opened every one: then no one could open a terminal on the host, an administrator's `ssh`,
`tmux` or `kubectl exec -t` included. It also listed the host's terminals in `/dev/pts`.

How: in its account's mount namespace (`account_namespaces.py`), `/dev/pts` is a new devpts
instance (`newinstance`, `max=MOST`) and `/dev/ptmx` is that instance's own. An account's
functions share it, as they share their /tmp. The kernel keeps `kernel.pty.reserve` (1,024)
of the host's terminals for its first instance, the host's, so all accounts together leave
those alone.
"""

from __future__ import annotations

MOST = 256
MOUNTS = [
    f"mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,max={MOST},nosuid,noexec "
    "kubetask-pts /dev/pts",
    "mount --bind /dev/pts/ptmx /dev/ptmx",
]
