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
are scratch space, not storage. An admin's functions, run as the platform, keep its HOME.
"""

from __future__ import annotations

import os
import shutil
import tempfile


class AccountHomes:
    def __init__(self) -> None:
        self._base: str | None = None
        self._made: dict[int, str] = {}

    def environment(self, uid: int) -> dict[str, str]:
        """HOME and TMPDIR for the user `uid`, its directory made on first use."""
        home = self._made.get(uid)
        if home is None:
            if self._base is None:
                self._base = tempfile.mkdtemp(prefix="kubetask-homes-")
                os.chmod(self._base, 0o711)  # each user reaches its own, lists none
            home = os.path.join(self._base, str(uid))
            os.mkdir(home, 0o700)
            os.chown(home, uid, uid)
            self._made[uid] = home
        return {"HOME": home, "TMPDIR": home}

    def close(self) -> None:
        if self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None
            self._made.clear()
