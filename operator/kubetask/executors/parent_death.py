"""Children that die with the process that started them, even when it dies by SIGKILL, so a
crashed dispatcher never leaves an attempt running that another would run again.

The kernel's parent-death signal (`PR_SET_PDEATHSIG`) does it, but it must be set in the child,
and that only covers a parent that dies after it is set: a parent killed in between leaves the
child running unwatched (seen in CI: an attempt outlived a `kill -9`ed `kubetask dev`). So the
child also checks that its parent is still the one that started it.

Two ways to set it:
- `spawn_argv` (attempts and warm instances: the dispatcher's hot path) puts `setpriv
  --pdeathsig KILL` and a one-line shell guard in front of the command. A `preexec_fn` would
  make Python fork the whole dispatcher instead of vfork-ing it, and a fork copies its page
  tables: measured at 39 ms per spawn for a 350 MB process against 2.5 ms this way (5 ms
  against 2.6 at 20 MB). Without `setpriv` (util-linux) it falls back to the `preexec_fn`.
- `die_with_parent()`, the `preexec_fn`, for the few long-lived children of `kubetask dev`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shlex
import shutil
import signal
from collections.abc import Callable, Sequence
from typing import NamedTuple

from . import account_namespaces, account_scratch, function_users
from .cgroups import Group, end_groups
from .spawn import Child, spawn

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_SETPRIV = shutil.which("setpriv")
_SH = shutil.which("sh")
# Run by `sh -c` with the expected parent's pid as $0 and the command as "$@".
_CHECK = '[ "$PPID" = "$0" ] || kill -KILL $$; '
_EXEC = 'exec "$@"'
# A tenant's process enters its working directory as its account's user, in its account's
# mount namespace (`working_directory`); the directory is in this variable, never in the script.
_WD = "KT_WD"
_ENTER = f'cd -- "${_WD}" || exit 126; unset {_WD}; '
# A function's processes are the first the kernel's OOM killer takes (any process may raise its
# own score; children inherit it). Without it a tenant's processes, each smaller than
# nats-server or the dispatcher, could together have one of those killed instead.
FIRST_TO_GO = 1000
_OOM_SCORE = "/proc/self/oom_score_adj"
_FIRST = f"{{ echo {FIRST_TO_GO} > {_OOM_SCORE}; }} 2>/dev/null; "


class Launch(NamedTuple):
    """What to pass to `spawn`."""

    argv: list[str]
    preexec: Callable[[], None] | None
    env: dict[str, str]
    keep_fds: tuple[int, ...] = ()
    cwd: str | None = None


def die_with_parent(
    user: function_users.RunAs | None = None,
    cgroups: Sequence[str] = (),
    first_to_go: bool = False,
    namespace: account_namespaces.AccountNamespace | None = None,
    directory: str | None = None,
) -> Callable[[], None]:
    """A `preexec_fn` that arms the death signal, then kills the child if the parent that
    forked it is already gone; with `cgroups` (`cgroup.procs` files), first joins those groups,
    with `first_to_go`, makes it the OOM killer's first choice (`FIRST_TO_GO`), and with
    `user`, then enters its account's `namespace`, becomes that user (the kernel disarms
    the signal when the user changes) and, as that user, enters `directory`."""
    parent = os.getpid()

    def arm() -> None:
        for cgroup in cgroups:
            with contextlib.suppress(OSError), open(cgroup, "w") as procs:
                procs.write(str(os.getpid()))
        if first_to_go:
            with contextlib.suppress(OSError), open(_OOM_SCORE, "w") as score:
                score.write(str(FIRST_TO_GO))
        if user is not None:
            user.become(namespace)
            if directory is not None:
                os.chdir(directory)
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return arm


def spawn_argv(
    command: Sequence[str],
    env: dict[str, str],
    cwd: str | None,
    user: function_users.RunAs | None = None,
    cgroups: Sequence[str] = (),
    namespace: account_namespaces.AccountNamespace | None = None,
) -> Launch:
    """What to pass to `spawn` for `command` with `env`; with `user`, the command runs as that
    user (`function_users.py`), and `env` reaches it only once it does (`RunAs.hand_over`);
    with `cgroups`, `cgroup.procs` files, the guard's shell puts itself in those groups before
    the command runs, so all it starts is born there (`cgroups.py`). The command is the
    OOM killer's first choice (`FIRST_TO_GO`). With `namespace`, the descriptors of the user's
    account's namespaces (`account_namespaces.py`), it runs there.

    The command is looked up first as exec would (the environment's PATH, or relative to
    `cwd`), so a missing or unrunnable one fails here with the same error as before, not as an
    exit code of the guard."""
    directory = None
    if user is not None:
        # The launcher starts at the root; the tenant's process enters its directory itself.
        directory, cwd = working_directory(cwd, user, env.get("HOME")), "/"
    if _SETPRIV is None or _SH is None:
        # The user is switched, and its namespace entered, in the forked child before the exec
        # that applies `env`.
        arm = die_with_parent(user, cgroups, True, namespace, directory)
        return Launch(list(command), arm, env, cwd=cwd)
    _check_runnable(command[0], env.get("PATH", os.defpath), directory or cwd, user)
    parent = str(os.getpid())
    # A group that went away meanwhile leaves the process where it is, as without groups.
    place = "".join(f"{{ echo $$ > {shlex.quote(c)}; }} 2>/dev/null; " for c in cgroups)
    if user is None:
        script = place + _FIRST + _CHECK + _EXEC
        guard = [_SETPRIV, "--pdeathsig", "KILL", "--", _SH, "-c", script, parent]
        return Launch([*guard, *command], None, env, cwd=cwd)
    held, restore = user.hand_over(env)
    held[_WD] = str(directory)
    # Restored after the parent check: a variable named PPID must not answer it.
    script = user.shell_prelude() + place + _FIRST + _CHECK + _ENTER + restore + _EXEC
    become = user.setpriv_options()
    guard = [_SETPRIV, "--pdeathsig", "KILL", *become, "--", _SH, "-c", script, parent]
    if namespace is None:
        return Launch([*guard, *command], None, held, cwd=cwd)
    enter = account_namespaces.enter(namespace)
    return Launch([*enter, *guard, *command], None, held, tuple(namespace), cwd)


async def start_function(
    command: Sequence[str],
    env: dict[str, str],
    cwd: str | None,
    user: function_users.RunAs | None,
    groups: list[Group],
    *,
    stdin: bool,
    stderr_to_stdout: bool,
) -> Child:
    """A function's process (an attempt's or a warm instance's) started in `groups`
    (`spawn_argv`); if it cannot start, its groups are ended before the error goes on."""
    try:
        namespace = None
        if user is not None and user.namespaces is not None:
            namespace = await user.namespaces.get(user.uid)
        if user is not None:
            for rules in user.firewall:
                await rules.admit(user.uid)
        launch = spawn_argv(command, env, cwd, user, [g.procs for g in groups], namespace)
        return await spawn(
            launch.argv,
            launch.env,
            launch.cwd,
            launch.preexec,
            stdin=stdin,
            stderr_to_stdout=stderr_to_stdout,
            keep_fds=launch.keep_fds,
            starter=None
            if user is None or user.threads is None
            else user.threads.starter(user.uid),
        )
    except BaseException:
        await end_groups(groups)
        raise


def working_directory(given: str | None, user: function_users.RunAs, home: str | None) -> str:
    """Where a tenant's process starts: its function's `workingDir`, else the dispatcher's own
    directory where the account's user may reach it, else the account's home.

    The dispatcher (root) used to enter the directory before the user switch, and the function
    kept it: `workingDir: /root/.pyenv` listed and read what lies under a directory no tenant
    may enter (seen), and `workingDir: /tmp` wrote 10 MB to the host's /tmp, on the disk the
    queues are on, past the account's own bounded /tmp (`account_scratch.py`; seen). Now the
    process enters it itself, as the account's user in the account's mount namespace
    (`_ENTER`), where the kernel decides as for any path it opens. What the dispatcher can
    tell first it says here, as `could not start`, without saying whether something exists
    where the user may not look."""
    elsewhere = user.unreachable()
    if given is None:
        here = os.getcwd()
        reachable = function_users.may_search(here, user.uid)
        return here if reachable and not account_scratch.under(here, elsewhere) else home or "/"
    path = os.path.join(os.getcwd(), given)
    if account_scratch.under(path, elsewhere):
        return path  # in the account's own /tmp, which only its processes see
    if not function_users.may_search(os.path.dirname(path), user.uid):
        raise function_users.refused(given, user.uid)
    if not os.path.isdir(path):
        raise FileNotFoundError(errno.ENOENT, "No such directory", given)
    if not function_users.may_search(path, user.uid):
        raise function_users.refused(given, user.uid)
    return path


def _check_runnable(
    program: str, path: str, cwd: str | None, user: function_users.RunAs | None
) -> None:
    def runnable(full: str) -> bool:
        if user is None:
            return os.access(full, os.X_OK)
        return function_users.may_run(full, user.uid)

    if user is not None:
        # Looked up as root, a path the account's user cannot reach into would answer whether
        # something exists there: such a place is neither searched nor reported. Nor is the
        # host's /tmp, which its processes do not see (their own is there: `account_scratch`).
        elsewhere = user.unreachable()
        path = os.pathsep.join(
            d
            for d in path.split(os.pathsep)
            if d
            and function_users.may_search(d, user.uid)
            and not account_scratch.under(d, elsewhere)
        )
        if "/" in program:
            full = os.path.join(cwd or os.getcwd(), program)
            if not function_users.may_search(os.path.dirname(full), user.uid):
                raise function_users.refused(program, user.uid)
            # Relative to a working directory in its account's own /tmp, as well as absolute.
            if account_scratch.under(full, elsewhere):
                raise FileNotFoundError(
                    errno.ENOENT,
                    f"No such file in this account's own {account_scratch.ROOT}: a tenant's "
                    f"function does not see the host's {', '.join(elsewhere)} "
                    "(docs/security.md)",
                    program,
                )
    if "/" not in program:
        if shutil.which(program, path=path) is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
        places = (os.path.join(d, program) for d in path.split(os.pathsep) if d)
        if user is not None and not any(os.path.isfile(p) and runnable(p) for p in places):
            raise function_users.refused(program, user.uid)
        return
    full = os.path.join(cwd or os.getcwd(), program)
    if not os.path.isfile(full):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
    if not runnable(full):
        if user is not None:
            raise function_users.refused(program, user.uid)
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
