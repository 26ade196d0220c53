"""A tenant's function finds its own account's processes in /proc, and no one else's.

Why: run as its account's user (`function_users.py`), a function could still list every
process of the host in /proc and read its command line and state: another account's function
with whatever arguments its tenant gave it, the platform's own processes. Their environment
and files were already closed to it (another user's), their command lines were not.

How: each dispatcher makes one mount namespace when it starts, a copy of the host's in which
/proc is a new mount of the same process namespace with `hidepid=invisible`: there a process
lists only the processes of its own user. A tenant's process enters it (`nsenter`, as root,
before it becomes its account's user). One namespace serves every account: what each sees
depends on its user, not on where it is. Entering costs an exec (about 1 ms); a namespace and
a mount per attempt cost five times that.

Not a PID namespace: there the function would be process 1, which the kernel shields from
every signal it has no handler for, so `stop`'s SIGTERM would reach nothing; and its pids
would not be the host's, which the rest of the dispatcher (cgroups, ports) counts in.

Linux gives each mount of proc options of its own since 5.8. Before, every mount of a process
namespace's proc shares one set, so this mount would hide every process from every user of
the host: on an older kernel it is not made, and the dispatcher says so. The copy is a
`slave` of the host's mounts: what the host mounts later still reaches functions wherever the
host's mounts propagate (`shared`, as systemd makes them).

The dispatcher holds the namespace by a descriptor; it goes when the dispatcher and every
process in it are gone, nothing to sweep after a `kill -9`. A function's process inherits
that descriptor (passed to `nsenter`, which cannot close it): without CAP_SYS_ADMIN nothing
can be done with it but look.
"""

from __future__ import annotations

import os
import platform
import re
import select
import shutil
import subprocess

OPTIONS = "hidepid=invisible,nosuid,nodev,noexec"
_NSENTER = shutil.which("nsenter")  # looked up once, not on every spawn
_FIRST_KERNEL = (5, 8)
# How long making the namespace may take before the dispatcher goes on without it.
_TIMEOUT = 10.0


def enter(fd: int) -> list[str]:
    """`nsenter`'s command line, to put before the rest of an argv: the process enters the
    namespace `fd` (a descriptor it inherits) and keeps the working directory it was started
    in, which entering a mount namespace would reset to its root."""
    assert _NSENTER is not None, "checked when the namespace was made"
    return [_NSENTER, f"--mount=/proc/self/fd/{fd}", "--wd=.", "--"]


class HiddenProcesses:
    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        self._fd: int | None = None
        self._why_not: str | None = None
        self._made = False

    def namespace(self) -> int | None:
        """The descriptor of the namespace a tenant's process enters, made on first use; None
        where it cannot be made (`why_not` says why)."""
        if self._enabled and not self._made:
            self._made = True
            self._why_not = self._make()
        return self._fd

    def why_not(self) -> str | None:
        """Why tenants' functions see every process of the host; None where they do not."""
        self.namespace()
        return self._why_not

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _make(self) -> str | None:
        found = re.match(r"(\d+)\.(\d+)", platform.release())
        if found is None or (int(found[1]), int(found[2])) < _FIRST_KERNEL:
            return (
                f"Linux {platform.release()} gives every mount of /proc the same options "
                "(5.8 is the first that does not)"
            )
        tools = {t: shutil.which(t) for t in ("unshare", "mount", "sh")} | {"nsenter": _NSENTER}
        missing = [t for t, path in tools.items() if path is None]
        if missing:
            return f"no {', '.join(missing)} on this host's PATH (util-linux)"
        unshare, sh = str(tools["unshare"]), str(tools["sh"])
        # The holder mounts /proc in a namespace of its own, says so, and waits on its stdin
        # while the namespace is opened through it; then it is let go.
        script = f"mount -t proc -o {OPTIONS} proc /proc && echo ready && read _"
        holder = subprocess.Popen(
            [unshare, "--mount", "--propagation", "slave", "--", sh, "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert holder.stdin is not None and holder.stdout is not None
        opened: OSError | None = None
        try:
            ready, _, _ = select.select([holder.stdout], [], [], _TIMEOUT)
            if ready and holder.stdout.readline() == b"ready\n":
                # Still our unreaped child, blocked on its stdin: the pid is its own.
                self._fd = os.open(f"/proc/{holder.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            opened = err
        finally:
            try:  # closes its stdin: it ends
                _, err_out = holder.communicate(timeout=_TIMEOUT)
            except subprocess.TimeoutExpired:
                holder.kill()
                _, err_out = holder.communicate()
        if self._fd is not None:
            return None
        said = err_out.decode(errors="replace").strip() or f"exit status {holder.returncode}"
        return f"could not mount a /proc of their own: {opened or said}"
