"""A directory of its own for each account's user, given to its functions as HOME and TMPDIR.

Why: a tenant's function run as its account's user (`function_users.py`) inherited the
platform's HOME (root's, which that user may not enter: nothing could be written there, so
no tool could keep a cache or a configuration) and no TMPDIR, so its temporary files went to
/tmp, which every account shares: a tenant could create, before a neighbour's function did, a
name that function was about to use, or leave files there for it to read. Now each account's
functions get a directory that only its user (and root) may enter, the same for all of them
while the dispatcher runs, as a warm Lambda keeps its /tmp between invocations. A function
that sets HOME or TMPDIR in its own environment keeps its own.

The directories live under one made for this dispatcher with `mkdtemp` (a name nobody could
have created first), which others may pass through but not list, and go away with it: they
are scratch space, not storage. A dispatcher killed before it could remove its own leaves
them behind, with what tenants wrote there; each holds a lock on a file in its directory for
as long as it lives, so the next dispatcher to make one removes every such directory whose
lock it can take (the kernel drops a lock with its holder; a pid could have been reused). An
admin's functions, run as the platform, keep its HOME.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import tempfile
from pathlib import Path

PREFIX = "kubetask-homes-"
LOCK = ".dispatcher"


class AccountHomes:
    def __init__(self) -> None:
        self._base: str | None = None
        self._lock: int | None = None
        self._made: dict[int, str] = {}

    def environment(self, uid: int) -> dict[str, str]:
        """HOME and TMPDIR for the user `uid`, its directory made on first use."""
        home = self._made.get(uid)
        if home is None:
            home = os.path.join(self._base or self._open(), str(uid))
            os.mkdir(home, 0o700)
            os.chown(home, uid, uid)
            self._made[uid] = home
        return {"HOME": home, "TMPDIR": home}

    def _open(self) -> str:
        remove_abandoned(Path(tempfile.gettempdir()))
        base = tempfile.mkdtemp(prefix=PREFIX)
        os.chmod(base, 0o711)  # each user reaches its own, lists none
        # Locked before it has its name: a directory without one is never taken for abandoned.
        claiming = os.path.join(base, LOCK + ".new")
        self._lock = os.open(claiming, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        os.rename(claiming, os.path.join(base, LOCK))
        self._base = base
        return base

    def close(self) -> None:
        if self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None
            self._made.clear()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def remove_abandoned(tmp: Path) -> None:
    """Remove the homes of dispatchers that are gone: directories named as ours, owned by this
    user (nobody else can make one so), whose lock nobody holds."""
    for path in tmp.glob(PREFIX + "*"):
        try:
            info = path.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
                continue
            lock = os.open(path / LOCK, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue  # not one of ours, or removed meanwhile
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its dispatcher is alive
        finally:
            os.close(lock)
        shutil.rmtree(path, ignore_errors=True)
