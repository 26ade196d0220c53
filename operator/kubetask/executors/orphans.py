"""Whether what a dispatcher left on the host (cgroups, firewall rules) is an orphan.

Each is named for the process id of the dispatcher that made it; a dispatcher killed outright
(`kill -9`) cannot remove its own, so the next one to start on the host ends those of
dispatchers that no longer run.
"""

from __future__ import annotations

import os


def owner_gone(pid: int) -> bool:
    """True only when no process has that id. A process we may not signal is alive, and a
    number taken by another process since counts as alive too: left, never ended wrongly."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
