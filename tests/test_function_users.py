"""A tenant's function run by `kubetask dev` as root with KUBETASK_FUNCTION_USERS=accounts: it
runs as its account's own user and cannot reach the platform's files and processes, nor
another account's; an admin's function runs as the platform. Each probe is a real function run
by a real dispatcher; what it may do is asked of the kernel, from inside it."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import http.server
import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from kubetask.embedded import free_port, wait_for_port
from kubetask.executors import (
    abstract_socket_scope,
    account_keyring,
    account_terminals,
    account_threads,
    system_call_filter,
)
from kubetask.executors.account_cpu import AccountCpu
from kubetask.executors.account_homes import AccountHomes
from kubetask.executors.cgroups import own_group
from kubetask.executors.function_users import account_uid, may_run
from kubetask.executors.instance_ports import InstancePorts, listeners

KUBETASK = [sys.executable, "-m", "kubetask"]
HOME = os.environ.get("HOME")  # the platform's, which `kubetask dev` is started with here
MAX_PROCESSES = 40
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="only root can switch users")

# What the function may do, each answered yes or no by trying it.
PROBE = r"""
can() { if "$@" >/dev/null 2>&1; then printf yes; else printf no; fi; }
umask > "$SHARED/$KUBETASK_ACCOUNT-umask"
echo secret > "$SHARED/$KUBETASK_ACCOUNT-file"
printf '{"uid": %s, "groups": "%s", "nnp": "%s", "umask": "%s",' \
  "$(id -u)" "$(id -G)" "$(grep NoNewPrivs /proc/self/status | tr -dc 0-9)" \
  "$(cat "$SHARED/$KUBETASK_ACCOUNT-umask")"
printf '"clientJson": "%s", "index": "%s", "logs": "%s", "store": "%s",' \
  "$(can cat "$DATA/client.json")" "$(can ls "$DATA/index")" "$(can ls "$DATA/logs")" \
  "$(can ls "$DATA/jetstream")"
printf '"signal": "%s", "environ": "%s", "neighbour": "%s"}' \
  "$(can kill -0 "$PLATFORM_PID")" "$(can head -c 1 "/proc/$PLATFORM_PID/environ")" \
  "$(can cat "$SHARED/$NEIGHBOUR-file")"
"""


@dataclass
class Dev:
    url: str
    data: Path
    shared: Path
    admin: str
    pid: int

    def token(self, account: str) -> str:
        out = subprocess.run(
            [*KUBETASK, "tokens", "create", "--file", str(self.data / "tokens.json"),
             "--account", account],
            capture_output=True, text=True, check=True, timeout=30,
        )  # fmt: skip
        return out.stdout.strip().split()[-1]


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory any user may enter, so only kubetask's own modes keep a function out of its
    data directory (a pytest tmp_path is 0700, which would keep it out anyway). Not under
    /tmp, where a tenant's function finds its account's own (`account_scratch.py`)."""
    root = Path(tempfile.mkdtemp(prefix="kt-users-", dir="/var/lib"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def dev(open_dir: Path, request: pytest.FixtureRequest) -> Iterator[Dev]:
    """`kubetask dev` in accounts mode; `request.param`, if given, more of its environment."""
    data = open_dir / "data"
    data.mkdir(mode=0o755)  # as a directory a user chose, and shares, would be
    shared = open_dir / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    port = free_port()
    env = dict(
        os.environ,
        KUBETASK_FUNCTION_USERS="accounts",
        KUBETASK_ACCOUNT_MAX_PROCESSES=str(MAX_PROCESSES),
        KUBETASK_ACCOUNT_WEIGHTS="team-a=2",
        **getattr(request, "param", {}),
    )
    log = open(open_dir / "dev.log", "ab")
    proc = subprocess.Popen(
        [*KUBETASK, "dev", "--data-dir", str(data), "--port", str(port), "--nats-port", "0"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        cfg = data / "client.json"
        deadline = time.monotonic() + 60
        while not (cfg.exists() and "url" in cfg.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, (
                open_dir / "dev.log"
            ).read_text()
            time.sleep(0.1)
        wait_for_port(port, proc=proc)
        admin = json.loads(cfg.read_text())["adminToken"]
        yield Dev(f"http://127.0.0.1:{port}", data, shared, admin, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def _put(http: httpx.AsyncClient, path: str, q: dict[str, str], body: dict[str, Any]) -> Any:
    """PUT `body`, with a token made a moment ago: the gateway reads new ones within 1 s."""
    deadline = time.monotonic() + 10
    while (r := await http.put(path, params=q, json=body)).status_code == 401:
        assert time.monotonic() < deadline, r.text
        await asyncio.sleep(0.2)
    assert r.status_code == 200, r.text
    return r.json()


async def _run(
    dev: Dev, token: str, account: str, spec: dict[str, Any], forged: bool = False
) -> dict[str, Any]:
    """Register `spec` as function `probe` with `token` and run one task of it to the end."""
    meta: dict[str, Any] = {"name": "probe"}
    if forged:
        meta["annotations"] = {"kubetask.io/registered-by": "admin"}
    async with httpx.AsyncClient(
        base_url=dev.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as http:
        q = {"account": account}
        fn = await _put(http, "/v1/functions/probe", q, {"metadata": meta, "spec": spec})
        r = await http.post("/v1/tasks", params=q, json={"function": "probe", "payload": {}})
        assert r.status_code == 202, r.text
        task_id = r.json()["metadata"]["name"]
        deadline = time.monotonic() + 60
        while True:
            task = (await http.get(f"/v1/tasks/{task_id}", params=q)).json()
            if task["status"]["phase"] in ("Succeeded", "Failed"):
                return {"function": fn, "task": task}
            assert time.monotonic() < deadline, task
            await asyncio.sleep(0.1)


def _probe(dev: Dev, neighbour: str) -> dict[str, Any]:
    env = {"DATA": str(dev.data), "SHARED": str(dev.shared), "NEIGHBOUR": neighbour}
    env["PLATFORM_PID"] = str(dev.pid)
    return {
        "command": ["sh", "-c", PROBE],
        "env": [{"name": k, "value": v} for k, v in env.items()],
    }


async def test_a_tenants_function_runs_as_its_account_and_reaches_nothing_else(dev: Dev) -> None:
    a = await _run(dev, dev.token("team-a"), "team-a", _probe(dev, "team-b"), forged=True)
    b = await _run(dev, dev.token("team-b"), "team-b", _probe(dev, "team-a"))
    # The forged mark is replaced by the gateway's own.
    assert a["function"]["metadata"]["annotations"]["kubetask.io/registered-by"] == "account"
    for account, run in (("team-a", a), ("team-b", b)):
        assert run["task"]["status"]["phase"] == "Succeeded", run["task"]["status"]
        seen = run["task"]["status"]["result"]
        assert seen["uid"] == account_uid(account) and seen["groups"] == str(seen["uid"])
        assert seen["nnp"] == "1" and seen["umask"] == "0077"
        denied = ("clientJson", "index", "logs", "store", "signal", "environ")
        assert {k: seen[k] for k in denied} == dict.fromkeys(denied, "no"), seen
    assert a["task"]["status"]["result"]["uid"] != b["task"]["status"]["result"]["uid"]
    # b ran after a had written its file, and could not read it.
    assert b["task"]["status"]["result"]["neighbour"] == "no"
    mode = (dev.shared / "team-a-file").stat()
    assert mode.st_uid == account_uid("team-a") and stat.S_IMODE(mode.st_mode) == 0o600


# What a function finds in /proc: whether a word it is given appears in any process's command
# line, whether the platform's process is listed, and whether its own child is.
PROC_SCAN = r"""
sleep 30 & child=$!
found=no
for f in /proc/[0-9]*/cmdline; do
  if tr '\0' ' ' < "$f" 2>/dev/null | grep -q "$WORD"; then found=yes; fi
done
printf '{"word": "%s", "platform": "%s", "child": "%s", "uids": "%s"}' "$found" \
  "$([ -e "/proc/$PLATFORM_PID" ] && echo yes || echo no)" \
  "$([ -e "/proc/$child" ] && echo yes || echo no)" \
  "$(cat /proc/[0-9]*/status 2>/dev/null | awk '/^Uid:/ {print $2}' | sort -u | tr '\n' ' ')"
kill $child
"""


async def test_a_tenants_function_sees_no_other_users_processes(dev: Dev) -> None:
    """Another account's running function, with a secret in its command line, and the
    platform's processes are not in a tenant's /proc; its own are."""
    word = "neighbours-secret-4711"
    async with httpx.AsyncClient(
        base_url=dev.url, headers={"Authorization": f"Bearer {dev.token('team-b')}"}, timeout=30
    ) as http:
        q = {"account": "team-b"}
        spec = {"command": ["sh", "-c", f"sleep 60 # {word}"]}
        deadline = time.monotonic() + 10
        while (
            r := await http.put(
                "/v1/functions/sleeper",
                params=q,
                json={"metadata": {"name": "sleeper"}, "spec": spec},
            )
        ).status_code == 401 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)  # the gateway reads a new token within a second
        assert r.status_code == 200, r.text
        r = await http.post("/v1/tasks", params=q, json={"function": "sleeper", "payload": {}})
        assert r.status_code == 202, r.text
        sleeper = r.json()["metadata"]["name"]
        deadline = time.monotonic() + 30
        while (await http.get(f"/v1/tasks/{sleeper}", params=q)).json()["status"][
            "phase"
        ] != "Running":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        for account, token in (("team-a", dev.token("team-a")), ("default", dev.admin)):
            env = {"WORD": word, "PLATFORM_PID": str(dev.pid)}
            scan = {
                "command": ["sh", "-c", PROC_SCAN],
                "env": [{"name": k, "value": v} for k, v in env.items()],
            }
            run = await _run(dev, token, account, scan)
            assert run["task"]["status"]["phase"] == "Succeeded", run["task"]["status"]
            seen = run["task"]["status"]["result"]
            if account == "team-a":
                assert seen["child"] == "yes", seen
                assert (seen["word"], seen["platform"]) == ("no", "no"), seen
                assert seen["uids"].split() == [str(account_uid("team-a"))], seen
            else:  # an admin's function runs as the platform, and sees what it sees
                assert (seen["word"], seen["platform"], seen["child"]) == ("yes",) * 3, seen
        await http.post(f"/v1/tasks/{sleeper}/stop", params=q)


async def test_an_admins_function_runs_as_the_platform(dev: Dev) -> None:
    """The same probe registered by an admin reads what the platform can: the probe can see
    access where there is some."""
    run = await _run(dev, dev.admin, "default", _probe(dev, "nobody"))
    assert run["function"]["metadata"]["annotations"]["kubetask.io/registered-by"] == "admin"
    seen = run["task"]["status"]["result"]
    assert seen["uid"] == os.geteuid()
    assert (seen["clientJson"], seen["index"], seen["signal"], seen["environ"]) == ("yes",) * 4


async def test_a_program_the_accounts_user_may_not_run_fails_saying_so(
    dev: Dev, tmp_path: Path
) -> None:
    script = tmp_path / "private.sh"  # under pytest's 0700 directory
    script.write_text("#!/bin/sh\necho '{}'\n")
    script.chmod(0o755)
    run = await _run(dev, dev.token("team-d"), "team-d", {"command": [str(script)]})
    status = run["task"]["status"]
    assert status["phase"] == "Failed"
    assert f"Permission denied to uid {account_uid('team-d')}" in status["error"], status
    # Looked up as root, a missing file beside it answered "No such file": whether a path
    # exists where the account's user cannot look was one error message away.
    errors = []
    for spec in (
        {"command": [str(tmp_path / "missing.sh")]},
        {"command": ["private.sh"], "env": [{"name": "PATH", "value": str(tmp_path)}]},
        {"command": ["missing.sh"], "env": [{"name": "PATH", "value": str(tmp_path)}]},
    ):
        run = await _run(dev, dev.token("team-d"), "team-d", spec)
        assert run["task"]["status"]["phase"] == "Failed"
        errors.append(run["task"]["status"]["error"].replace("missing", "private"))
    assert errors[0] == status["error"], errors
    assert errors[1] == errors[2], errors


# A shell starts 100 sleeps (it exits at the first fork refused; they stay), then this one counts
# its account user's processes, itself included, with builtins only: at the cap it could not
# start a `grep`.
FORK_BOMB = r"""
me=$(id -u)
sh -c 'for i in $(seq 1 100); do sleep 30 & done' 2>/dev/null
mine=0
for f in /proc/[0-9]*/status; do
  while IFS= read -r line; do
    case "$line" in Uid:*) set -- $line; [ "$2" = "$me" ] && mine=$((mine + 1)); break;; esac
  done < "$f"
done 2>/dev/null
printf '{"processes": %s}' "$mine"
"""


# The same, counted by the account's `pids` group, whose count it reads with builtins only.
FORK_BOMB_AS_ROOT = r"""
sh -c 'for i in $(seq 1 100); do sleep 30 & done' 2>/dev/null
read n < "$PIDS_ROOT/kubetask/team-e/pids.current"
printf '{"processes": %s}' "$n"
"""


# Holds 30 sleeps, says how many processes its account has in a file, and waits to be told
# to end (below its cap, so that its waiting loop can still fork).
HOLD_PROCESSES = r"""
sh -c 'for i in $(seq 1 30); do sleep 60 & done' 2>/dev/null
read n < "$PIDS_ROOT/kubetask/$KUBETASK_ACCOUNT/pids.current"
echo "$n" > "$SHARED/held"
while [ ! -e "$SHARED/done" ]; do sleep 0.1; done
"""
ALL_PROCESSES = MAX_PROCESSES + 20


@pytest.mark.parametrize(
    "dev", [{"KUBETASK_FUNCTIONS_MAX_PROCESSES": str(ALL_PROCESSES)}], indirect=True
)
async def test_all_accounts_processes_together_are_capped(dev: Dev) -> None:
    """Each account's cap alone did not bound them together: with `kernel.pid_max` 32,768,
    eight accounts at 4,096 would hold every process id of the host. The host's `kubetask`
    group caps them all (`KUBETASK_FUNCTIONS_MAX_PROCESSES`): while one account holds about
    31, another's fork bomb gets what is left of the 60, short of its own cap of 40."""
    pids = _own_group("pids")
    if pids is None:
        pytest.skip("no cgroup v1 pids controller here")
    env = [{"name": "PIDS_ROOT", "value": str(pids)}, {"name": "SHARED", "value": str(dev.shared)}]
    holder = await _start(
        dev,
        dev.token("team-p"),
        "team-p",
        "hold",
        {"command": ["sh", "-c", HOLD_PROCESSES], "env": env},
    )
    held = dev.shared / "held"
    deadline = time.monotonic() + 30
    while not held.exists() or not held.read_text().strip():
        assert time.monotonic() < deadline, "the holder never held"
        await asyncio.sleep(0.1)
    try:
        first = int(held.read_text())
        assert 30 <= first <= 33, first
        run = await _run(dev, dev.token("team-q"), "team-q", {"command": ["sh", "-c", FORK_BOMB]})
        status = run["task"]["status"]
        assert status["phase"] == "Succeeded", status.get("error")
        second = status["result"]["processes"]
        assert second <= ALL_PROCESSES - first, (first, second)
        assert second < MAX_PROCESSES - 5, "held by all accounts' cap, not its own"
        assert (pids / "kubetask" / "pids.max").read_text().strip() == str(ALL_PROCESSES)
    finally:
        (dev.shared / "done").touch()
    assert (await _ended(dev, dev.token("team-p"), "team-p", holder))["phase"] == "Succeeded"


async def test_a_tenant_cannot_look_at_other_accounts_cgroups(dev: Dev) -> None:
    """Every user may read a cgroup hierarchy: a tenant's function listed the names of the
    accounts running on the host and read another account's process count (seen)."""
    if _own_group("pids") is None:
        pytest.skip("no cgroup v1 pids controller here")
    python = _python("team-u", "team-v")
    first = await _run(dev, dev.token("team-u"), "team-u", {"command": ["true"]})
    assert first["task"]["status"]["phase"] == "Succeeded", first["task"]["status"]
    spec = {"command": [python, "-c", CGROUP_SNOOP, "team-u"]}
    seen = (await _run(dev, dev.token("team-v"), "team-v", spec))["task"]["status"]["result"]
    assert seen == {
        "base": "kubetask",
        "accounts": "PermissionError",
        "neighbour": "PermissionError",
    }, seen


async def test_a_tenants_ipc_objects_are_its_accounts_own(dev: Dev) -> None:
    """System V IPC objects were the host's: a tenant's function listed another account's
    shared memory segments, found its key taken (`Permission denied`), and its segments
    outlived its attempt (seen). Each account now has an IPC namespace of its own."""
    python = _python("team-w", "team-x")
    key = 0x6B740000 + os.getpid() % 0x10000
    spec = {"command": [python, "-c", SYSV_SHM, str(key)]}
    made = (await _run(dev, dev.token("team-w"), "team-w", spec))["task"]["status"]
    assert made["result"] == {"made": True, "keys": [key]}, made
    assert key not in _shm_keys(), "the host holds what a tenant made"
    seen = (await _run(dev, dev.token("team-x"), "team-x", spec))["task"]["status"]
    assert seen["result"] == {"made": True, "keys": [key]}, seen
    # Its account's next attempt finds what the first left, as it finds its /tmp.
    again = (await _run(dev, dev.token("team-w"), "team-w", spec))["task"]["status"]
    assert again["result"] == {"made": False, "keys": [key]}, again


async def test_the_system_call_filter_holds_a_tenant_and_not_an_admin(dev: Dev) -> None:
    """In a user namespace of its own, a tenant's function was uid 0 with every capability
    (`unshare -Urn`, seen), kernel code otherwise root's alone; one `io_setup` took most of
    the host's AIO pool, which has no count per user (seen). `system_call_filter.py` refuses
    a user namespace on each path the kernel has (unshare, clone and clone3), kernel AIO
    and io_uring as not implemented, and BPF, perf events and userfaultfd (the last two were
    made) as not permitted. The function still starts threads and processes (the C library
    falls back from clone3 to clone). An admin's function, run as the platform, is not
    filtered."""
    if system_call_filter.why_not() is not None:
        pytest.skip(f"no filter here: {system_call_filter.why_not()}")
    python = _python("team-u")
    spec = {"command": [python, "-c", USER_NAMESPACES]}
    tenant = (await _run(dev, dev.token("team-u"), "team-u", spec))["task"]["status"]
    refused = os.strerror(errno.EPERM)
    assert tenant["result"] == {
        "unshare": refused,
        "clone": refused,
        "clone3": os.strerror(errno.ENOSYS),
        "ioSetup": os.strerror(errno.ENOSYS),
        "ioUring": os.strerror(errno.ENOSYS),
        "bpf": refused,
        "perf": refused,
        "userfaultfd": refused,
        "unshareCommand": 1,
        "mountNamespace": refused,  # no capability for one without a user namespace
        "thread": "ran",
        "pipeline": "through",
    }, tenant
    admin = (await _run(dev, dev.admin, "team-u", spec))["task"]["status"]["result"]
    made = ("unshare", "ioSetup", "ioUring", "bpf", "perf", "userfaultfd")
    assert {admin[call] for call in made} == {"made"}, admin


def test_user_namespaces_are_refused_on_the_accounts_thread_unless_allowed(tmp_path: Path) -> None:
    """`KUBETASK_ACCOUNT_USER_NAMESPACES=on` leaves them allowed, and kernel AIO still refused;
    otherwise a process started from the account's thread cannot make one, even as root,
    while the platform's threads still can."""
    if system_call_filter.why_not() is not None:
        pytest.skip(f"no filter here: {system_call_filter.why_not()}")
    io_setup = [sys.executable, "-c", IO_SETUP]
    programs = [["unshare", "--user", "--map-root-user", "true"]]
    if os.uname().machine == "x86_64":  # the 32-bit ABI has numbers of its own
        compat = tmp_path / "unshare-i386"
        compat.write_bytes(_i386_unshare_newuser())
        compat.chmod(0o755)
        programs.append([str(compat)])
    for allowed, code in ((False, errno.EPERM), (True, 0)):
        threads = account_threads.AccountThreads(True, user_namespaces=allowed)
        assert threads.why_not_filter() is None
        try:
            starter = threads.starter(account_uid("team-u"))
            assert starter is not None  # Landlock's scope alone would make one; so does this
            for argv in programs:
                run = starter.submit(subprocess.run, argv, capture_output=True, text=True)
                assert run.result().returncode == code, (argv, run.result().stderr)
            run = starter.submit(subprocess.run, io_setup, capture_output=True, text=True)
            assert run.result().returncode == errno.ENOSYS, run.result().stderr
        finally:
            threads.close()
    for argv in [*programs, io_setup]:
        assert subprocess.run(argv).returncode == 0, "the platform's own threads are not filtered"


# Exits with io_setup's errno (0: made, and let go).
IO_SETUP = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
number, destroy = {"x86_64": (206, 207), "aarch64": (0, 1)}[os.uname().machine]
context = ctypes.c_ulong(0)
if libc.syscall(number, 8, ctypes.byref(context)) != 0:
    sys.exit(ctypes.get_errno())
libc.syscall(destroy, context)
"""


def _i386_unshare_newuser() -> bytes:
    """A 32-bit x86 program that calls unshare(CLONE_NEWUSER) through `int 0x80` and exits with
    its errno (0: made). Written out here so no 32-bit toolchain is needed."""
    code = bytes.fromhex(
        "b836010000"  # mov eax, 310: unshare
        "bb00000010"  # mov ebx, CLONE_NEWUSER
        "cd80"  # int 0x80
        "f7d8"  # neg eax: the errno
        "89c3"  # mov ebx, eax
        "b801000000"  # mov eax, 1: exit
        "cd80"  # int 0x80
    )
    base, start = 0x08048000, 52 + 32  # after the ELF header and one program header
    size = start + len(code)
    header = b"\x7fELF\x01\x01\x01" + bytes(9)
    header += struct.pack("<HHIIIIIHHHHHH", 2, 3, 1, base + start, 52, 0, 0, 52, 32, 1, 0, 0, 0)
    segment = struct.pack("<IIIIIIII", 1, 0, base, base, size, size, 5, 0x1000)
    return header + segment + code


@pytest.fixture
def session_keyring() -> int:
    """Puts this test's process, and so the `kubetask dev` it starts next, in a session keyring
    of its own, as systemd starts a service (`KeyringMode=private`), with a key of the
    platform's in it. Credentials are a thread's: fixtures and the dev fixture run on this one."""
    if (why := account_keyring.why_not()) is not None:
        pytest.skip(f"no keyrings here: {why}")
    libc = ctypes.CDLL(None, use_errno=True)
    keyctl = {"x86_64": 250, "aarch64": 219}[os.uname().machine]
    assert libc.syscall(keyctl, 1, b"kubetask-test-service") > 0, os.strerror(ctypes.get_errno())
    add_key = {"x86_64": 248, "aarch64": 217}[os.uname().machine]
    key = libc.syscall(add_key, b"user", b"note-platform", b"platform", 8, -3)
    assert key > 0, os.strerror(ctypes.get_errno())
    return int(key)


async def test_a_tenant_holds_its_accounts_keyring_not_the_platforms(
    session_keyring: int, dev: Dev
) -> None:
    """Every tenant's function held the dispatcher's session keyring, inherited through the
    switch of user: team-b read a key team-a had added there (seen), and the platform's keys in
    it were theirs. Each account's processes now have one of their own (`account_keyring.py`),
    which its account's later functions share."""
    python = _python("team-k", "team-l")

    def spec(*args: str) -> dict[str, Any]:
        return {"command": [python, "-c", KEYRINGS, *args]}

    planted = await _run(dev, dev.token("team-k"), "team-k", spec("plant", "team-k"))
    assert planted["task"]["status"]["result"]["planted"] > 0, planted["task"]
    look = spec("look", "team-k", "platform")
    other = (await _run(dev, dev.token("team-l"), "team-l", look))["task"]["status"]["result"]
    own = (await _run(dev, dev.token("team-k"), "team-k", look))["task"]["status"]["result"]
    assert other == {"team-k": "ENOKEY", "platform": "ENOKEY"}, other
    assert own == {"team-k": "hello", "platform": "ENOKEY"}, own


async def test_an_accounts_terminals_are_its_own_and_bounded(dev: Dev) -> None:
    """A tenant's process opened the host's pseudo-terminals from `/dev/ptmx` (300 seen), and
    could have opened all of `kernel.pty.max`, leaving none for an administrator's `ssh`; it
    also listed the host's in `/dev/pts`. Each account now has a devpts instance of its own of
    `account_terminals.MOST` (`account_terminals.py`)."""
    python = _python("team-t")
    spec = {"command": [python, "-c", TERMINALS, str(account_terminals.MOST + 44)]}
    status = (await _run(dev, dev.token("team-t"), "team-t", spec))["task"]["status"]
    assert status["result"] == {
        "opened": account_terminals.MOST,
        "stopped": "No space left on device",
        "listed": account_terminals.MOST + 1,  # and its ptmx
    }, status


def _shm_keys() -> list[int]:
    lines = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    return [int(line.split()[0]) for line in lines]


async def test_an_accounts_processes_are_capped(dev: Dev) -> None:
    """A fork bomb in one account stops at the account's cap (KUBETASK_ACCOUNT_MAX_PROCESSES),
    counted over all of that account's processes; the platform's user has none. An admin's
    function runs as root, which the per-user limit does not bind: its fork bomb had no cap,
    and could take every process the host allows. The account's `pids` group caps it too, and
    the sleeps it left end with its attempt."""
    run = await _run(dev, dev.token("team-e"), "team-e", {"command": ["sh", "-c", FORK_BOMB]})
    status = run["task"]["status"]
    assert status["phase"] == "Succeeded", status.get("error")
    assert MAX_PROCESSES - 5 <= status["result"]["processes"] <= MAX_PROCESSES, status
    pids = _own_group("pids")
    assert pids is not None, "this machine mounts the cgroup v1 pids controller"
    spec = {
        "command": ["sh", "-c", FORK_BOMB_AS_ROOT],
        "env": [{"name": "PIDS_ROOT", "value": str(pids)}],
    }
    run = await _run(dev, dev.admin, "team-e", spec)
    status = run["task"]["status"]
    assert status["phase"] == "Succeeded", status.get("error")
    assert MAX_PROCESSES - 5 <= status["result"]["processes"] <= MAX_PROCESSES, status
    # Killed, they count until their new parent (the host's init) has reaped them.
    deadline = time.monotonic() + 10
    while (pids / "kubetask" / "team-e" / "pids.current").read_text().strip() != "0":
        assert time.monotonic() < deadline, "the sleeps it left outlived its attempt"
        await asyncio.sleep(0.1)


# Opens files until refused (or 5,000), then tries to raise its own limit; says what it got.
OPEN_FILES = """
import json, resource
held, why = [], None
try:
    while len(held) < 5000:
        held.append(open("/dev/null"))
except OSError as err:
    why = err.strerror
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (5000, 5000))
    raised = "raised"
except (ValueError, OSError) as err:
    raised = type(err).__name__
print(json.dumps({"opened": len(held), "stopped": why, "raise": raised}))
"""


async def test_a_tenants_process_holds_at_most_its_open_files(dev: Dev) -> None:
    """A tenant's process had the dispatcher's descriptor limit, hard limit included, so a few
    of them could hold the host's whole open-file table, which root is exempt from and every
    other account is not. Now each holds at most `KUBETASK_FUNCTION_MAX_OPEN_FILES` (1,024),
    and cannot raise it; an admin's function keeps the platform's."""
    spec = {"command": [_python("team-f"), "-c", OPEN_FILES]}
    status = (await _run(dev, dev.token("team-f"), "team-f", spec))["task"]["status"]
    assert status["phase"] == "Succeeded", status.get("error")
    # The interpreter holds a few of them itself (its standard streams among them).
    result = status["result"]
    assert 1000 < result.pop("opened") < 1024, status
    assert result == {"stopped": "Too many open files", "raise": "ValueError"}, status
    status = (await _run(dev, dev.admin, "team-f", spec))["task"]["status"]
    assert status["result"]["opened"] == 5000, status


# Makes internet sockets until refused (or 200); says how many, and why it stopped.
SOCKETS = """
import json, socket
held, why = [], None
try:
    while len(held) < 200:
        held.append(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
except OSError as err:
    why = err.strerror
print(json.dumps({"made": len(held), "stopped": why}))
"""


@pytest.mark.parametrize("dev", [{"KUBETASK_ACCOUNT_MAX_SOCKETS": "40"}], indirect=True)
async def test_an_accounts_sockets_are_capped(dev: Dev) -> None:
    """Each socket a tenant binds, or sends from unbound, holds a port of the host's ephemeral
    range, and holding them all left the platform and every other account none to connect
    from (`account_sockets.py`). An admin's function is the platform's, and not counted."""
    spec = {"command": [_python("team-g"), "-c", SOCKETS]}
    status = (await _run(dev, dev.token("team-g"), "team-g", spec))["task"]["status"]
    assert status["result"] == {"made": 40, "stopped": "Operation not permitted"}, status
    status = (await _run(dev, dev.admin, "team-g", spec))["task"]["status"]
    assert status["result"] == {"made": 200, "stopped": None}, status


# A warm instance that answers each invocation with the user it runs as.
WHOAMI_SERVER = """
import json, os
from http.server import BaseHTTPRequestHandler, HTTPServer

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _reply(self, body):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._reply(b"ok")

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        cpu = [g for g in open("/proc/self/cgroup") if "cpu" in g.split(":")[1].split(",")]
        home = os.environ.get("HOME")
        seen = {"uid": os.getuid(), "home": home, "port": os.environ["PORT"]}
        seen["homeOwner"] = os.stat(home).st_uid if home else None
        seen["cgroup"] = cpu[0].split(":", 2)[2].strip()
        self._reply(json.dumps(seen).encode())

HTTPServer((os.environ.get("BIND", "127.0.0.1"), int(os.environ["PORT"])), Handler).serve_forever()
"""


async def test_a_tenants_warm_instance_runs_as_its_account_too(dev: Dev) -> None:
    python = next(
        (p for p in ("/usr/bin/python3", "/bin/python3") if may_run(p, account_uid("team-g"))),
        None,
    )
    assert python is not None, "no Python the account's user may run on this machine"
    script = dev.shared / "whoami_server.py"
    script.write_text(WHOAMI_SERVER)
    script.chmod(0o644)
    spec = {"server": {"command": [python, str(script)], "concurrency": 2}}
    run = await _run(dev, dev.token("team-g"), "team-g", spec)
    seen = run["task"]["status"]["result"]
    assert seen["uid"] == account_uid("team-g"), run["task"]
    assert (seen["home"], seen["homeOwner"]) == ("/tmp", account_uid("team-g")), "its own"
    assert re.search("/kubetask/team-g/p[0-9]+-[0-9]+$", seen["cgroup"]), seen
    # Registered again by an admin, the function's instances are the platform's.
    run = await _run(dev, dev.admin, "team-g", spec)
    seen = run["task"]["status"]["result"]
    assert (seen["uid"], seen["home"]) == (os.geteuid(), HOME), run["task"]
    assert "/kubetask/team-g/" in seen["cgroup"], "still the account's CPU"


# Whether the function can open a connection to $TARGET's port, at each of the addresses.
CONNECT = """
import os, socket
answers = []
for host in ["127.0.0.1", *os.environ["ADDRESSES"].split()]:
    try:
        socket.create_connection((host, int(os.environ["TARGET"])), timeout=5).close()
        answers.append("connected")
    except OSError as err:
        answers.append(type(err).__name__)
print(" ".join(answers))
"""


async def _connects(dev: Dev, token: str, account: str, python: str, port: str) -> set[str]:
    found = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    addresses = " ".join(a for a in found if "." in a)  # IPv4, as the instance listens
    spec = {
        "command": [python, "-c", CONNECT],
        "env": [{"name": "TARGET", "value": port}, {"name": "ADDRESSES", "value": addresses}],
    }
    task = (await _run(dev, token, account, spec))["task"]
    assert task["status"]["phase"] == "Succeeded", task
    return set(task["status"]["result"].split())


def _python(*accounts: str) -> str:
    """A Python interpreter the accounts' users may run."""
    return next(
        p
        for p in ("/usr/bin/python3", "/bin/python3")
        if all(may_run(p, account_uid(a)) for a in accounts)
    )


def _rules() -> str:
    return subprocess.run(
        ["iptables", "-w", "-S", "KUBETASK-INSTANCES"], capture_output=True, text=True
    ).stdout


# Connects to each host:port it is given, and says what it read or why it could not.
DIALLER = """
import json, socket, sys
seen = {}
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=3) as c:
            seen[target] = c.recv(16).decode()
    except OSError as err:
        seen[target] = type(err).__name__
print(json.dumps(seen))
"""


@contextlib.contextmanager
def _serving(server: socket.socket, answer: Callable[[], None]) -> Iterator[int]:
    """Runs `answer` on a thread, for each request to `server`, until the block ends; yields
    the server's port."""
    server.settimeout(0.1)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                answer()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        done.set()
        thread.join()
        server.close()


@contextlib.contextmanager
def _answering(host: str, word: bytes, port: int = 0) -> Iterator[int]:
    """A server of the platform's user on `host` that answers `word` to each connection."""
    server = socket.create_server((host, port))

    def answer() -> None:
        conn, _ = server.accept()
        conn.sendall(word)
        conn.close()

    with _serving(server, answer) as bound:
        yield bound


# A port of the host's that tenants' functions may reach (`host_services.py`), chosen at
# collection: the dispatcher's rules are made when it starts.
HOST_PORT = free_port()


@pytest.mark.parametrize(
    "dev",
    [{"KUBETASK_FUNCTION_DENIED_NETWORKS": "127.0.0.2/32", "KUBETASK_FUNCTION_HOST_PORTS": str(HOST_PORT)}],
    indirect=True,
)  # fmt: skip
async def test_a_tenants_function_cannot_connect_to_a_denied_network(dev: Dev) -> None:
    """The networks no tenant's function may reach (by default the clouds' metadata service,
    which hands out the machine's credentials): its connection there is refused at once, and
    one elsewhere is not; an admin's function, run as the platform, reaches both."""
    python = _python("team-a")
    with (
        _answering("127.0.0.2", b"denied", HOST_PORT) as denied,
        _answering("127.0.0.1", b"open", HOST_PORT) as open_,
    ):
        targets = [f"127.0.0.2:{denied}", f"127.0.0.1:{open_}"]
        spec = {"command": [python, "-c", DIALLER, *targets]}
        tenant = await _run(dev, dev.token("team-a"), "team-a", spec)
        admin = await _run(dev, dev.admin, "default", spec)
    refused, reached = targets
    seen = tenant["task"]["status"]["result"]
    assert seen == {refused: "ConnectionRefusedError", reached: "open"}, tenant["task"]
    assert admin["task"]["status"]["result"] == {refused: "denied", reached: "open"}


# Connects over TCP to each port on 127.0.0.1 it is given, sends a datagram to the UDP one,
# and asks the gateway whether it is up; says what each answered.
HOST_ASKER = """
import json, os, socket, sys, urllib.request
seen = {}
for port in sys.argv[1:]:
    try:
        with socket.create_connection(("127.0.0.1", int(port)), timeout=3) as c:
            seen[port] = c.recv(16).decode()
    except OSError as err:
        seen[port] = type(err).__name__
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(3)
try:
    u.sendto(b"hi", ("127.0.0.1", int(os.environ["UDP"])))
    seen["udp"] = u.recv(16).decode()
except OSError as err:
    seen["udp"] = type(err).__name__
with urllib.request.urlopen(os.environ["GATEWAY"] + "/healthz", timeout=10) as r:
    seen["gateway"] = r.status
print(json.dumps(seen))
"""


@contextlib.contextmanager
def _udp_answering(word: bytes) -> Iterator[int]:
    """A UDP socket of the platform's user on 127.0.0.1 that answers `word` to each datagram."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))

    def answer() -> None:
        _, peer = server.recvfrom(16)
        with contextlib.suppress(PermissionError):  # an answer the firewall refused
            server.sendto(word, peer)

    with _serving(server, answer) as bound:
        yield bound


@pytest.mark.parametrize("dev", [{"KUBETASK_FUNCTION_HOST_PORTS": str(HOST_PORT)}], indirect=True)
async def test_the_hosts_own_servers_answer_a_tenant_only_on_the_ports_listed(dev: Dev) -> None:
    """A root-owned server on 127.0.0.1 answered a tenant's function (seen: a listing of the
    host's /tmp), as would a Redis or a Docker API open to localhost alone. Now the host's
    servers answer a tenant only on `KUBETASK_FUNCTION_HOST_PORTS` and the platform's ports
    (`host_services.py`); the gateway still answers. An admin's function, run as the platform,
    reaches every one."""
    python = _python("team-h")
    with (
        _answering("127.0.0.1", b"listed", HOST_PORT) as listed,
        _answering("127.0.0.1", b"private") as private,
        _udp_answering(b"private") as udp,
    ):
        spec = {
            "command": [python, "-c", HOST_ASKER, str(listed), str(private)],
            "env": [{"name": "UDP", "value": str(udp)}, {"name": "GATEWAY", "value": dev.url}],
        }
        tenant = (await _run(dev, dev.token("team-h"), "team-h", spec))["task"]["status"]
        admin = (await _run(dev, dev.admin, "team-h", spec))["task"]["status"]
    assert tenant["result"] == {
        str(listed): "listed",
        str(private): "TimeoutError",
        "udp": "TimeoutError",
        "gateway": 200,
    }, tenant
    assert admin["result"] == {
        str(listed): "listed",
        str(private): "private",
        "udp": "private",
        "gateway": 200,
    }, admin

    # The rules go with their dispatcher.
    def rules() -> str:
        argv = ["iptables", "-w", "-S", "KUBETASK-HOST-SERVICES"]
        return subprocess.run(argv, capture_output=True, text=True).stdout

    assert "-j REJECT" in rules()
    os.kill(dev.pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while "-j REJECT" in rules():
        assert time.monotonic() < deadline, rules()
        await asyncio.sleep(0.2)


# Sends a datagram to each of as many loopback addresses as it is told (each a connection the
# host's table tracks for 30 s), then connects to the host:port it is given; says what passed.
FLOOD = """
import json, socket, sys
count, host, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
seen = {"sent": 0, "refused": 0}
for i in range(count):
    try:
        udp.sendto(b"x", (f"127.9.{i // 250}.{i % 250 + 1}", 9))
        seen["sent"] += 1
    except PermissionError:
        seen["refused"] += 1
try:
    socket.create_connection((host, port), timeout=3).close()
    seen["tcp"] = "open"
except OSError as err:
    seen["tcp"] = type(err).__name__
print(json.dumps(seen))
"""
CONNECTIONS = 64
ALL_CONNECTIONS = 96


@pytest.mark.parametrize(
    "dev",
    [
        {
            "KUBETASK_ACCOUNT_MAX_CONNECTIONS": str(CONNECTIONS),
            "KUBETASK_FUNCTIONS_MAX_CONNECTIONS": str(ALL_CONNECTIONS),
        }
    ],
    indirect=True,
)
async def test_an_accounts_connections_are_capped_and_its_neighbours_are_not(dev: Dev) -> None:
    """The host tracks every connection in one table, and a full table drops every new
    connection of the host, the platform's too: one process filled it in about a second
    (seen). An account's functions hold at most KUBETASK_ACCOUNT_MAX_CONNECTIONS of it; past
    that theirs are refused, and a neighbour's and the platform's are not. Sixteen accounts
    at their default sixteenth would fill it together: all accounts' functions hold at most
    KUBETASK_FUNCTIONS_MAX_CONNECTIONS, and an admin's function is not counted."""
    python = _python("team-y", "team-z", "team-x")
    host, port = dev.url.removeprefix("http://").split(":")
    spec = {"command": [python, "-c", FLOOD, str(CONNECTIONS * 3), host, port]}
    flooded = (await _run(dev, dev.token("team-y"), "team-y", spec))["task"]["status"]
    seen = flooded["result"]
    assert CONNECTIONS - 8 <= seen["sent"] <= CONNECTIONS, flooded
    assert seen["refused"] == CONNECTIONS * 3 - seen["sent"], flooded
    assert seen["tcp"] == "ConnectionRefusedError", flooded
    spec = {"command": [python, "-c", FLOOD, "1", host, port]}
    neighbour = (await _run(dev, dev.token("team-z"), "team-z", spec))["task"]["status"]
    assert neighbour["result"] == {"sent": 1, "refused": 0, "tcp": "open"}, neighbour
    # A third account, well under its own cap, gets what is left of all accounts' together.
    # (A closed TCP connection is not counted, nor a refused one.)
    left = ALL_CONNECTIONS - seen["sent"] - neighbour["result"]["sent"]
    spec = {"command": [python, "-c", FLOOD, str(CONNECTIONS), host, port]}
    third = (await _run(dev, dev.token("team-x"), "team-x", spec))["task"]["status"]["result"]
    assert left - 8 <= third["sent"] <= left, (left, third)
    assert third["tcp"] == "ConnectionRefusedError", third
    admin = (await _run(dev, dev.admin, "team-x", spec))["task"]["status"]["result"]
    assert admin == {"sent": CONNECTIONS, "refused": 0, "tcp": "open"}, admin
    await _rules_leave_with_their_dispatcher(dev, "team-y", ("KUBETASK-ACCOUNTS-CAP-EACH",))


# Listens on each port it is given, answering "tenant" to whoever connects, for 20 s.
SQUATTER = """
import socket, sys, time
held = []
for port in map(int, sys.argv[1:]):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen()
    s.settimeout(0.05)
    held.append(s)
deadline = time.time() + 20
while time.time() < deadline:
    for s in held:
        try:
            c, _ = s.accept()
        except socket.timeout:
            continue
        c.sendall(b"tenant")
        c.close()
print("{}")
"""
PLATFORMS = free_port()


def _answer(port: int) -> str:
    """What a connection to `port` on this host reads, or why it got nothing."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
            return c.recv(16).decode() or "closed"
    except OSError as err:
        return type(err).__name__


@pytest.mark.parametrize("dev", [{"KUBETASK_PLATFORM_PORTS": str(PLATFORMS)}], indirect=True)
async def test_a_tenant_listening_on_a_platform_port_answers_nobody(dev: Dev) -> None:
    """A tenant's function that took a port of the platform's (free while its server restarts)
    never opens a connection there, from this host or elsewhere; on a port of its own it does.
    It cannot connect to NATS either (it has no credentials there, and a flood of connections
    could fill NATS's). The rules go with their dispatcher."""
    other = free_port()
    python = _python("team-a")
    token = dev.token("team-a")
    spec = {"command": [python, "-c", SQUATTER, str(PLATFORMS), str(other)]}
    task_id = await _start(dev, token, "team-a", "squatter", spec)
    async with httpx.AsyncClient(
        base_url=dev.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as http:
        q = {"account": "team-a"}
        deadline = time.monotonic() + 30
        while await asyncio.to_thread(_answer, other) != "tenant":
            assert time.monotonic() < deadline, "the function never listened"
            await asyncio.sleep(0.1)
        # Its answer to the connection's first packet is rejected: the connection never opens.
        assert await asyncio.to_thread(_answer, PLATFORMS) == "TimeoutError"
        assert listeners(PLATFORMS) == {account_uid("team-a")}, "it does hold the port"
        await http.post(f"/v1/tasks/{task_id}/stop", params=q)
    # Nor may it connect to NATS, on any of the host's addresses; the platform's user may.
    nats = str(urlsplit(json.loads((dev.data / "client.json").read_text())["nats"]).port)
    assert await _connects(dev, token, "team-a", python, nats) == {"ConnectionRefusedError"}
    assert "connected" in await _connects(dev, dev.admin, "team-a", python, nats)  # 127.0.0.1
    rules = subprocess.run(["iptables", "-w", "-S", "KUBETASK-PLATFORM"], capture_output=True)
    assert str(PLATFORMS) in rules.stdout.decode(), rules
    egress = subprocess.run(["iptables", "-w", "-S", "KUBETASK-EGRESS"], capture_output=True)
    assert "169.254.0.0/16" in egress.stdout.decode(), "the metadata service, by default"
    os.kill(dev.pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while (
        str(PLATFORMS)
        in subprocess.run(
            ["iptables", "-w", "-S", "KUBETASK-PLATFORM"], capture_output=True, text=True
        ).stdout
    ):
        assert time.monotonic() < deadline, "the rule outlived its dispatcher"
        await asyncio.sleep(0.1)


async def test_a_warm_instances_port_takes_only_the_platform_and_its_own_account(
    dev: Dev,
) -> None:
    """Any process of the host may connect to a loopback port: another account's function
    could invoke an instance outside the platform. The firewall refuses it."""
    python = _python("team-h", "team-i")
    script = dev.shared / "whoami_server.py"
    script.write_text(WHOAMI_SERVER)
    script.chmod(0o644)
    spec = {
        "server": {"command": [python, str(script)], "idleSeconds": 600},
        "env": [{"name": "BIND", "value": "0.0.0.0"}],  # every address of the host
    }
    owner, neighbour = dev.token("team-h"), dev.token("team-i")
    seen = (await _run(dev, owner, "team-h", spec))["task"]["status"]["result"]
    port = seen["port"]
    assert listeners(int(port)) == {account_uid("team-h")}
    assert await _connects(dev, neighbour, "team-i", python, port) == {"ConnectionRefusedError"}
    assert await _connects(dev, owner, "team-h", python, port) == {"connected"}
    socket.create_connection(("127.0.0.1", int(port)), timeout=5).close()  # the platform's user
    assert f"--dport {port} " in _rules()
    # An admin's instance is the platform's, closed to every tenant.
    seen = (await _run(dev, dev.admin, "team-j", spec))["task"]["status"]["result"]
    assert seen["uid"] == os.geteuid()
    refused = await _connects(dev, owner, "team-h", python, seen["port"])
    assert refused == {"ConnectionRefusedError"}
    # Its rules go with the instances (here, with the dispatcher that started them).
    os.kill(dev.pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while f"--dport {port} " in _rules():
        assert time.monotonic() < deadline, _rules()
        await asyncio.sleep(0.2)


async def _hooked(dev: Dev, token: str, account: str, url: str) -> tuple[str, str]:
    """A task of a function (`probe`) whose success goes to the webhook `url`, once it has
    Succeeded; its id and its log as far as it has come a few seconds later."""
    async with httpx.AsyncClient(
        base_url=dev.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as http:
        q = {"account": account}
        hook = {"onSuccess": {"kind": "webhook", "target": url}}
        config = {"function": "probe", "destinationConfig": hook}
        await _put(http, "/v1/asyncconfigs/probe", q, {"metadata": {"name": "probe"},
                                                      "spec": config})  # fmt: skip
        task = (await _run(dev, token, account, {"command": ["true"]}))["task"]
        assert task["status"]["phase"] == "Succeeded", task["status"]
        await asyncio.sleep(3)  # a webhook refused is tried 4 times within ~2 s
        logs = await http.get(f"/v1/tasks/{task['metadata']['name']}/logs", params=q)
        return task["metadata"]["name"], logs.text


async def test_a_webhook_cannot_invoke_a_warm_instance_on_this_host(dev: Dev) -> None:
    """The dispatcher may connect to every instance's port, and a webhook is the dispatcher
    connecting where a tenant says: another account's webhook at an instance's port invoked
    it with that account's payload (seen). A webhook elsewhere on this host still arrives."""
    python = _python("team-k")
    script = dev.shared / "whoami_server.py"
    script.write_text(WHOAMI_SERVER)
    script.chmod(0o644)
    spec = {"server": {"command": [python, str(script)], "idleSeconds": 600}}
    port = (await _run(dev, dev.token("team-k"), "team-k", spec))["task"]["status"]["result"]
    port = port["port"]
    neighbour = dev.token("team-l")
    task_id, log = await _hooked(dev, neighbour, "team-l", f"http://127.0.0.1:{port}/invoke")
    assert "task Succeeded" not in log, log  # not delivered, so not finished
    said = (dev.data / "logs" / "dispatcher-0.log").read_text()
    assert f"finishing team-l/{task_id} failed" in said and "Connection refused" in said, said
    got: list[bytes] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    receiver = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
        task_id, log = await _hooked(dev, neighbour, "team-l", url)
    finally:
        receiver.shutdown()
    assert "task Succeeded" in log, log
    assert [json.loads(body)["requestContext"]["requestId"] for body in got] == [task_id]


# Finds its own `pids` cgroup, then tries to list the accounts' groups above it and to read
# another account's.
CGROUP_SNOOP = """
import json, os, sys
path = next(
    p for _, c, p in (line.split(":", 2) for line in open("/proc/self/cgroup").read().splitlines())
    if "pids" in c.split(",")
)
for line in open("/proc/self/mountinfo"):
    pre, post = line.split(" - ", 1)
    kind, _, options = post.split()[:3]
    if kind == "cgroup" and "pids" in options.split(","):
        root, point = pre.split()[3:5]
inside = path[len(root):] if root != "/" and path.startswith(root) else path
base = os.path.dirname(os.path.dirname(point + inside))
seen = {"base": os.path.basename(base)}
for what, look in (
    ("accounts", lambda: os.listdir(base)),
    ("neighbour", lambda: open(os.path.join(base, sys.argv[1], "pids.current")).read()),
):
    try:
        seen[what] = look()
    except OSError as err:
        seen[what] = type(err).__name__
print(json.dumps(seen))
"""
# Makes a System V shared memory segment with the key it is given, if none has it yet, and
# lists the keys of the segments it can see.
SYSV_SHM = """
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
key = int(sys.argv[1])
made = libc.shmget(key, 4096, 0o1000 | 0o2000 | 0o600) >= 0
if not made and ctypes.get_errno() != 17:  # EEXIST: an earlier attempt's
    sys.exit(os.strerror(ctypes.get_errno()))
lines = open("/proc/sysvipc/shm").read().splitlines()[1:]
print(json.dumps({"made": made, "keys": [int(line.split()[0]) for line in lines]}))
"""
# Tries each way to a user namespace, and says what each answered; then that threads and
# processes still start.
USER_NAMESPACES = """
import ctypes, json, os, platform, subprocess, threading
libc = ctypes.CDLL(None, use_errno=True)
UNSHARE, CLONE, CLONE3 = {"x86_64": (272, 56, 435), "aarch64": (97, 220, 435)}[platform.machine()]
NEWUSER, NEWNS, SIGCHLD = 0x10000000, 0x00020000, 17
def answer(made):
    return "made" if made else os.strerror(ctypes.get_errno())
seen = {}
pid = libc.syscall(CLONE, NEWUSER | SIGCHLD, 0, 0, 0, 0)
if pid == 0:
    os._exit(0)
if pid > 0:
    os.waitpid(pid, 0)
seen["clone"] = answer(pid > 0)
seen["clone3"] = answer(libc.syscall(CLONE3, None, 0) >= 0)
seen["unshareCommand"] = subprocess.run(["unshare", "--user", "true"], stderr=subprocess.DEVNULL).returncode
seen["mountNamespace"] = answer(libc.syscall(UNSHARE, NEWNS) == 0)
ran = []
t = threading.Thread(target=ran.append, args=("ran",))
t.start()
t.join()
seen["thread"] = ran[0]
seen["pipeline"] = subprocess.run("echo through | cat", shell=True, capture_output=True, text=True).stdout.strip()
IO_SETUP, IO_DESTROY, IO_URING_SETUP = {"x86_64": (206, 207, 425), "aarch64": (0, 1, 425)}[platform.machine()]
context = ctypes.c_ulong(0)
made = libc.syscall(IO_SETUP, 8, ctypes.byref(context)) == 0
seen["ioSetup"] = answer(made)
if made:
    libc.syscall(IO_DESTROY, context)
ring = libc.syscall(IO_URING_SETUP, 8, ctypes.create_string_buffer(120))
seen["ioUring"] = answer(ring >= 0)
if ring >= 0:
    os.close(ring)
BPF, PERF, USERFAULTFD = {"x86_64": (321, 298, 323), "aarch64": (280, 241, 282)}[platform.machine()]
program = ctypes.create_string_buffer(bytes.fromhex("b700000000000000" "9500000000000000"))
licence = ctypes.create_string_buffer(b"GPL")
load = ctypes.create_string_buffer(128)  # BPF_PROG_LOAD of a socket filter returning 0
ctypes.memmove(load, ctypes.byref((ctypes.c_uint32 * 2)(1, 2)), 8)
ctypes.memmove(ctypes.addressof(load) + 8, ctypes.byref((ctypes.c_uint64 * 2)(ctypes.addressof(program), ctypes.addressof(licence))), 16)
loaded = libc.syscall(BPF, 5, load, 128)
seen["bpf"] = answer(loaded >= 0)
event = ctypes.create_string_buffer(128)  # a software clock of its own, in user mode only
ctypes.memmove(event, ctypes.byref((ctypes.c_uint32 * 2)(1, 128)), 8)
ctypes.memmove(ctypes.addressof(event) + 40, ctypes.byref(ctypes.c_uint64(0x60)), 8)  # exclude_kernel, _hv
perf = libc.syscall(PERF, event, 0, -1, -1, 0)
seen["perf"] = answer(perf >= 0)
faults = libc.syscall(USERFAULTFD, 1)  # UFFD_USER_MODE_ONLY
seen["userfaultfd"] = answer(faults >= 0)
for fd in (loaded, perf, faults):
    if fd >= 0:
        os.close(fd)
seen["unshare"] = answer(libc.syscall(UNSHARE, NEWUSER) == 0)  # last: it would change who we are
print(json.dumps(seen))
"""
# Adds a key named after its account to its session keyring ("plant ACCOUNT"), or looks for
# the keys named ("look NAME...") and says what each held.
KEYRINGS = """
import ctypes, errno, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
ADD_KEY, KEYCTL = {"x86_64": (248, 250), "aarch64": (217, 219)}[os.uname().machine]
SEARCH, READ, SESSION = 10, 11, -3
if sys.argv[1] == "plant":
    name = b"note-" + sys.argv[2].encode()
    print(json.dumps({"planted": libc.syscall(ADD_KEY, b"user", name, b"hello", 5, SESSION)}))
    sys.exit()
seen = {}
for name in sys.argv[2:]:
    key = libc.syscall(KEYCTL, SEARCH, SESSION, b"user", b"note-" + name.encode(), 0)
    if key < 0:
        seen[name] = errno.errorcode[ctypes.get_errno()]
        continue
    buf = ctypes.create_string_buffer(64)
    n = libc.syscall(KEYCTL, READ, key, buf, 64)
    seen[name] = buf.raw[:n].decode() if n >= 0 else errno.errorcode[ctypes.get_errno()]
print(json.dumps(seen))
"""
# Opens as many pseudo-terminals as it is told, or until refused; says how many, why it stopped,
# and how many entries its /dev/pts lists while it holds them.
TERMINALS = """
import json, os, sys
held, why = [], None
try:
    for _ in range(int(sys.argv[1])):
        held.append(os.openpty())
except OSError as err:
    why = err.strerror
print(json.dumps({"opened": len(held), "stopped": why, "listed": len(os.listdir("/dev/pts"))}))
"""
# Writes its marker where it is, makes a directory next to it, and says where it is.
WHERE = """
import json, os, sys
open(sys.argv[1], "w").write("x" * 1000)
os.makedirs(sys.argv[1] + "-dir", exist_ok=True)
print(json.dumps({"cwd": os.getcwd()}))
"""
# Answers "mine" on TCP and UDP at the ports given, and on the abstract Unix socket named, until
# told to stop; writes down each datagram it reads.
LISTENER = """
import os, socket, time
tcp = socket.create_server(("127.0.0.1", int(os.environ["TCP"])))
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("127.0.0.1", int(os.environ["UDP"])))
unix = socket.socket(socket.AF_UNIX)
unix.bind("\\0" + os.environ["UNIX"])
unix.listen()
tcp.settimeout(0.05)
udp.settimeout(0.05)
unix.settimeout(0.05)
open(os.environ["READY"], "w").close()
end = time.monotonic() + 90
while time.monotonic() < end and not os.path.exists(os.environ["DONE"]):
    for server in (tcp, unix):
        try:
            conn, _ = server.accept()
            conn.sendall(b"mine")
            conn.close()
        except OSError:
            pass
    try:
        data, peer = udp.recvfrom(16)
        with open(os.environ["RECEIVED"], "a") as received:
            received.write(data.decode() + "\\n")
        udp.sendto(b"mine", peer)
    except OSError:
        pass
"""
# Asks the listener over TCP, UDP and an abstract Unix socket, and says what it answered, or
# why nothing came.
ASKER = """
import json, os, socket
seen = {}
try:
    with socket.create_connection(("127.0.0.1", int(os.environ["TCP"])), timeout=2) as c:
        seen["tcp"] = c.recv(16).decode()
except OSError as err:
    seen["tcp"] = type(err).__name__
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(2)
try:
    u.sendto(f"from {os.getuid()}".encode(), ("127.0.0.1", int(os.environ["UDP"])))
    seen["udp"] = u.recv(16).decode()
except OSError as err:
    seen["udp"] = type(err).__name__
try:
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(2)
        c.connect("\\0" + os.environ["UNIX"])
        seen["unix"] = c.recv(16).decode()
except OSError as err:
    seen["unix"] = type(err).__name__
print(json.dumps(seen))
"""


async def _rules_leave_with_their_dispatcher(
    dev: Dev, account: str, chains: tuple[str, ...]
) -> None:
    """The account's rules are in `chains`, and go when its dispatcher stops."""

    def rules() -> str:
        return "".join(
            subprocess.run(["iptables", "-w", "-S", c], capture_output=True, text=True).stdout
            for c in chains
        )

    assert f"--uid-owner {account_uid(account)} " in rules()
    os.kill(dev.pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while f"--uid-owner {account_uid(account)} " in rules():
        assert time.monotonic() < deadline, rules()
        await asyncio.sleep(0.2)


async def test_what_a_tenants_function_listens_on_answers_its_own_account_only(dev: Dev) -> None:
    """A function listening on 127.0.0.1 for its own use (a database for the length of a job)
    answered another account's function, over TCP and UDP (seen: `account_connections.py`),
    and on an abstract Unix socket, which no file mode guards (seen: `abstract_socket_scope.py`).
    Another account's datagram, unanswered, was still read (seen: `account_packets.py`). Its own
    account and the platform are still answered."""
    python = _python("team-p", "team-q")
    ports = [
        {"name": "TCP", "value": str(free_port())},
        {"name": "UDP", "value": "0"},
        {"name": "UNIX", "value": f"kubetask-test-{os.getpid()}"},
    ]
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    ports[1]["value"] = str(probe.getsockname()[1])
    probe.close()
    ready, done = dev.shared / "listening", dev.shared / "done"
    received = dev.shared / "received"
    flags = [
        {"name": name, "value": str(path)}
        for name, path in (("READY", ready), ("DONE", done), ("RECEIVED", received))
    ]
    owner, neighbour = dev.token("team-p"), dev.token("team-q")
    async with httpx.AsyncClient(
        base_url=dev.url, headers={"Authorization": f"Bearer {owner}"}, timeout=30
    ) as http:
        q = {"account": "team-p"}
        spec = {"command": [python, "-c", LISTENER], "env": ports + flags, "timeoutSeconds": 120}
        await _put(http, "/v1/functions/listener", q, {"metadata": {"name": "listener"},
                                                       "spec": spec})  # fmt: skip
        r = await http.post("/v1/tasks", params=q, json={"function": "listener"})
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert time.monotonic() < deadline, "the listener never listened"
            await asyncio.sleep(0.1)
        asker = {"command": [python, "-c", ASKER], "env": ports}
        try:
            other = (await _run(dev, neighbour, "team-q", asker))["task"]["status"]["result"]
            own = (await _run(dev, owner, "team-p", asker))["task"]["status"]["result"]
            with socket.create_connection(("127.0.0.1", int(ports[0]["value"])), timeout=5) as c:
                platform = c.recv(16)
            with socket.socket(socket.AF_UNIX) as c:
                c.connect("\0" + ports[2]["value"])
                platform += c.recv(16)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.settimeout(5)
                u.sendto(b"from 0", ("127.0.0.1", int(ports[1]["value"])))
                platform += u.recv(16)
        finally:
            done.touch()
    # Where the kernel has no Landlock scopes (before 6.12) the dispatcher warns, and the
    # abstract socket stays open (`abstract_socket_scope.py`).
    unix = "PermissionError" if abstract_socket_scope.why_not() is None else "mine"
    assert other == {"tcp": "TimeoutError", "udp": "TimeoutError", "unix": unix}, other
    assert own == {"tcp": "mine", "udp": "mine", "unix": "mine"}, own
    assert platform == b"mine" * 3  # over TCP, the Unix socket and UDP
    uids = {"team-p": account_uid("team-p"), "team-q": account_uid("team-q")}
    assert received.read_text().split("\n") == [f"from {uids['team-p']}", "from 0", ""], uids
    chains = ("KUBETASK-ACCOUNTS-OPENED", "KUBETASK-ACCOUNTS-ANSWERS")
    await _rules_leave_with_their_dispatcher(dev, "team-q", chains)


def test_the_port_rules_a_killed_dispatcher_left_are_removed_by_the_next() -> None:
    """A stale rule opens nothing, but it would refuse the next instance given that port."""
    assert InstancePorts(True).why_not() is None  # its chains are there
    gone = subprocess.Popen(["true"])
    gone.wait()
    for pid, port in ((gone.pid, 1), (os.getpid(), 2)):
        subprocess.run(
            ["iptables", "-w", "-A", "KUBETASK-INSTANCES", "-p", "tcp", "--dport", str(port),
             "-m", "comment", "--comment", f"kubetask p{pid}", "-j", "REJECT"],
            check=True,
        )  # fmt: skip
    try:
        assert InstancePorts(True).why_not() is None
        assert "--dport 1 " not in _rules(), "its dispatcher is gone"
        assert "--dport 2 " in _rules(), "its dispatcher runs"
    finally:
        subprocess.run(
            ["iptables", "-w", "-D", "KUBETASK-INSTANCES", "-p", "tcp", "--dport", "2",
             "-m", "comment", "--comment", f"kubetask p{os.getpid()}", "-j", "REJECT"],
            check=True,
        )  # fmt: skip


# An instance that never listens on its port: whoever does first is sent its work.
NOT_LISTENING = 'echo "$PORT" >> "$SHARED/ports"; exec sleep 600'


async def test_an_instance_whose_port_another_user_took_is_not_sent_work(dev: Dev) -> None:
    """The port an instance is given was free when chosen; another user's process listening
    on it first would be sent the account's payloads."""
    ports = dev.shared / "ports"
    ports.touch()
    ports.chmod(0o666)
    taken: list[http.server.HTTPServer] = []
    stop = threading.Event()

    class Answer(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_GET

    def squat() -> None:  # another user (root, here) listening on each port as it is given
        while not stop.is_set():
            for port in ports.read_text().split()[len(taken) :]:
                server = http.server.ThreadingHTTPServer(("127.0.0.1", int(port)), Answer)
                threading.Thread(target=server.serve_forever, daemon=True).start()
                taken.append(server)
            time.sleep(0.01)

    squatter = threading.Thread(target=squat, daemon=True)
    squatter.start()
    try:
        spec = {
            "server": {"command": ["sh", "-c", NOT_LISTENING], "startupTimeoutSeconds": 20},
            "env": [{"name": "SHARED", "value": str(dev.shared)}],
        }
        task = (await _run(dev, dev.token("team-k"), "team-k", spec))["task"]
    finally:
        stop.set()
        squatter.join()
        for server in taken:
            server.shutdown()
            server.server_close()
    assert taken, "no instance was started"
    assert task["status"]["phase"] == "Failed", task
    assert "was taken by another user's process (uid 0)" in task["status"]["error"], task


async def test_the_loaders_variables_reach_the_function_not_the_root_side_of_the_switch(
    dev: Dev,
) -> None:
    """`setpriv` runs as root until it switches users, and its loader read the function's
    environment: a tenant's `LD_PRELOAD` of a library it wrote ran as root. Every process whose
    loader reads `LD_DEBUG_OUTPUT` writes a file there as its user: only the account's may
    appear. The function still has its variables, values intact, even one named as another is
    while it crosses."""
    out = dev.shared / "ld"
    odd = 'a "quoted" $HOME `x` value\\'
    spec = {
        "command": [
            "sh",
            "-c",
            'printf \'{"out": "%s", "odd": "%s", "mine": "%s"}\' "$LD_DEBUG_OUTPUT" "${#ODD}"'
            ' "$KT_HELD_ODD"',
        ],
        "env": [
            {"name": "LD_DEBUG", "value": "files"},
            {"name": "LD_DEBUG_OUTPUT", "value": str(out)},
            # Named as ODD is while it crosses the switch, and given first.
            {"name": "KT_HELD_ODD", "value": "mine"},
            {"name": "ODD", "value": odd},
            {"name": "PPID", "value": "1"},
        ],
    }
    run = await _run(dev, dev.token("team-h"), "team-h", spec)
    status = run["task"]["status"]
    written = {p.name: p.stat().st_uid for p in dev.shared.glob("ld.*")}
    assert written, "the function's own loader wrote nothing: LD_DEBUG_OUTPUT did not reach it"
    assert set(written.values()) == {account_uid("team-h")}, written
    assert status["phase"] == "Succeeded", status.get("error")
    assert status["result"] == {"out": str(out), "odd": str(len(odd)), "mine": "mine"}


# What a tenant's function finds in /tmp and may write there, /var/tmp and /dev/shm included.
SCRATCH = r"""
can() { if "$@" >/dev/null 2>&1; then printf yes; else printf no; fi; }
before=$(cat "/tmp/$MARK" 2>/dev/null)
echo "$KUBETASK_ACCOUNT" > "/tmp/$MARK"
dd if=/dev/zero of=/dev/shm/fill bs=64k count="$BLOCKS" 2>/dev/null; shm=$?
dd if=/dev/zero of=/var/tmp/fill bs=64k count="$BLOCKS" 2>/dev/null; var=$?
printf '{"home": "%s", "tmpdir": "%s", "owner": "%s", "before": "%s", "shm": %s, "var": %s,' \
  "$HOME" "$TMPDIR" "$(stat -c '%u %a' /tmp)" "$before" "$shm" "$var"
printf '"used": %s, "listed": "%s", "host": "%s"}' \
  "$(du -sk /tmp | cut -f1)" "$(ls /tmp | tr '\n' ' ')" "$(can cat "$HOST_FILE")"
rm -f /dev/shm/fill /var/tmp/fill
"""
SCRATCH_SIZE = 4 << 20


def _scratch(host_file: Path, blocks: int) -> dict[str, Any]:
    env = {"HOST_FILE": str(host_file), "BLOCKS": str(blocks), "MARK": host_file.name + "-mark"}
    return {
        "command": ["sh", "-c", SCRATCH],
        "env": [{"name": k, "value": v} for k, v in env.items()],
    }


@pytest.mark.parametrize("dev", [{"KUBETASK_ACCOUNT_SCRATCH": "4Mi"}], indirect=True)
async def test_a_tenants_function_has_a_tmp_of_its_own_of_bounded_size(dev: Dev) -> None:
    """A tenant's /tmp, /var/tmp and /dev/shm are one tmpfs of its account's: it cannot fill
    the host's disk or memory past its size, a neighbour neither sees it nor loses any of its
    own to it, and the host's /tmp is out of its sight. HOME and TMPDIR are there; what it
    writes stays for the account's next attempt. An admin's function keeps the host's."""
    fd, name = tempfile.mkstemp(prefix="kt-host-")
    os.write(fd, b"the host's\n")
    os.close(fd)
    os.chmod(name, 0o644)  # any user could read it, were it in sight
    host_file = Path(name)
    try:
        flood = 2 * SCRATCH_SIZE // 65536  # each write alone is twice the size
        a = await _run(dev, dev.token("team-a"), "team-a", _scratch(host_file, flood))
        a = a["task"]["status"]
        assert a["phase"] == "Succeeded", a
        a = a["result"]
        assert (a["home"], a["tmpdir"], a["before"]) == ("/tmp", "/tmp", ""), a
        assert a["owner"] == f"{account_uid('team-a')} 700", a
        assert a["shm"] != 0 and a["var"] != 0, "a write past the size must fail"
        assert SCRATCH_SIZE // 2048 < a["used"] <= SCRATCH_SIZE // 1024, a
        listed = ["fill", host_file.name + "-mark"]
        assert a["listed"].split() == listed, "one tmpfs: /dev/shm's file is in /tmp"
        assert a["host"] == "no", a
        b = await _run(dev, dev.token("team-b"), "team-b", _scratch(host_file, 16))
        b = b["task"]["status"]["result"]
        assert b["before"] == "" and b["owner"] == f"{account_uid('team-b')} 700", b
        assert (b["shm"], b["var"]) == (0, 0), "b's own size is whole"
        again = await _run(dev, dev.token("team-a"), "team-a", _scratch(host_file, 1))
        assert again["task"]["status"]["result"]["before"] == "team-a", "kept while it runs"
        admin = (await _run(dev, dev.admin, "default", _scratch(host_file, 1)))["task"]
        assert admin["status"]["result"]["home"] == (HOME or ""), "unset: printed empty"
        assert admin["status"]["result"]["host"] == "yes", admin
    finally:
        os.unlink(name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name + "-mark")  # the admin's, in the host's /tmp


async def test_a_working_directory_is_entered_as_the_account_and_in_its_namespace(
    dev: Dev, open_dir: Path
) -> None:
    """The dispatcher entered a function's `workingDir` as root, before the switch to the
    account's user: `workingDir: /tmp` wrote to the host's /tmp, past the account's own
    bounded one, and a directory under one the account may not enter was listed and read
    (both seen)."""
    python = _python("team-r")
    token = dev.token("team-r")
    marker = f"kt-wd-{os.getpid()}"
    spec = {
        "command": [python, "-c", WHERE, marker],
        "workingDir": "/tmp",
    }
    task = (await _run(dev, token, "team-r", spec))["task"]
    assert task["status"]["phase"] == "Succeeded", task["status"]
    assert task["status"]["result"]["cwd"] == "/tmp", task["status"]["result"]
    assert not (Path("/tmp") / marker).exists(), "written to the host's /tmp"
    again = await _run(dev, token, "team-r", {**spec, "workingDir": f"/tmp/{marker}-dir"})
    assert again["task"]["status"]["result"]["cwd"] == f"/tmp/{marker}-dir", again["task"]
    private = open_dir / "private"
    (private / "inner").mkdir(parents=True)
    private.chmod(0o700)
    (private / "inner").chmod(0o755)
    (private / "inner" / "secret.txt").write_text("the platform's\n")
    (private / "inner" / "secret.txt").chmod(0o644)
    spec = {"command": ["cat", "secret.txt"], "workingDir": str(private / "inner")}
    task = (await _run(dev, token, "team-r", spec))["task"]
    assert task["status"]["phase"] == "Failed", task["status"]
    assert "the platform's" not in json.dumps(task), task
    assert "could not start" in task["status"]["error"], task["status"]
    assert "Permission denied to uid" in task["status"]["error"], task["status"]


async def test_a_tenants_program_under_the_hosts_tmp_is_not_found_saying_why(dev: Dev) -> None:
    """A command under the host's /tmp is not where a tenant's function looks: the attempt
    fails saying so, not with a bare "No such file". An admin's runs."""
    where = tempfile.mkdtemp(prefix="kt-program-")
    script = os.path.join(where, "run.sh")
    try:
        os.chmod(where, 0o755)
        with open(script, "w") as f:
            f.write("#!/bin/sh\necho '{}'\n")
        os.chmod(script, 0o755)
        run = await _run(dev, dev.token("team-d"), "team-d", {"command": [script]})
        status = run["task"]["status"]
        assert status["phase"] == "Failed", status
        assert "does not see the host's /tmp" in status["error"], status
        admin = await _run(dev, dev.admin, "default", {"command": [script]})
        assert admin["task"]["status"]["phase"] == "Succeeded", admin["task"]["status"]
    finally:
        shutil.rmtree(where)


async def test_an_idle_accounts_namespace_is_let_go_and_its_tmp_with_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each account has a namespace of its own, kept while it is used; one not handed out for
    IDLE_SECONDS is let go, and what its /tmp held with it (memory an idle account keeps no
    longer). Real namespaces, with IDLE_SECONDS made short."""
    from kubetask.executors import account_namespaces

    namespaces = account_namespaces.AccountNamespaces(True, SCRATCH_SIZE)
    a, b = account_uid("team-a"), account_uid("team-b")

    def sh(namespace: account_namespaces.AccountNamespace, script: str) -> str:
        out = subprocess.run(
            [*account_namespaces.enter(namespace), "sh", "-c", script],
            pass_fds=tuple(namespace), capture_output=True, text=True, check=True, timeout=10,
        )  # fmt: skip
        return out.stdout.strip()

    segments = "tail -n +2 /proc/sysvipc/shm | wc -l"

    try:
        first = await namespaces.get(a)
        assert first is not None and await namespaces.get(a) == first
        sh(first, "echo kept > /tmp/mark; ipcmk -M 4096")
        assert sh(first, segments) == "1"
        other = await namespaces.get(b)
        assert other is not None and other != first
        assert sh(other, "stat -c %u /tmp; ls /tmp") == str(b), "b's /tmp is not a's"
        assert sh(other, segments) == "0", "b's IPC objects are not a's"
        monkeypatch.setattr(account_namespaces, "IDLE_SECONDS", 0.5)
        await asyncio.sleep(0.3)
        assert await namespaces.get(a) == first  # used again: stamped
        await asyncio.sleep(0.6)
        second = await namespaces.get(a)
        assert second is not None
        assert sh(second, "ls /tmp") == "", "a new namespace, a new /tmp"
        assert sh(second, segments) == "0", "and no IPC objects"
    finally:
        namespaces.close()


async def test_an_idle_accounts_thread_is_let_go(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each account's processes start from a thread of its own, in a Landlock domain of its own
    (`account_threads.py`), kept while the account is used and let go with its namespace's idle
    time. Real threads and domains, with IDLE_SECONDS made short."""
    if abstract_socket_scope.why_not() is not None:
        pytest.skip(f"no Landlock scopes here: {abstract_socket_scope.why_not()}")
    from kubetask.executors import account_namespaces

    scopes = account_threads.AccountThreads(True)
    a, b = account_uid("team-a"), account_uid("team-b")
    listen = "import socket, time; s = socket.socket(socket.AF_UNIX); s.bind(b'\\0kt-scope'); s.listen(); time.sleep(5)"
    ask = "import socket; socket.socket(socket.AF_UNIX).connect(b'\\0kt-scope')"

    def run(uid: int, code: str) -> subprocess.Popen[bytes]:
        starter = scopes.starter(uid)
        assert starter is not None
        argv = [sys.executable, "-S", "-c", code]
        return starter.submit(subprocess.Popen, argv, stderr=subprocess.PIPE).result()

    try:
        first = scopes.starter(a)
        assert first is not None and scopes.starter(a) is first
        assert scopes.starter(b) is not first
        listener = run(a, listen)
        await asyncio.sleep(0.3)
        assert run(a, ask).wait(10) == 0, "its own account's socket"
        assert run(b, ask).wait(10) != 0, "another account's socket"
        monkeypatch.setattr(account_namespaces, "IDLE_SECONDS", 0.5)
        await asyncio.sleep(0.3)
        assert scopes.starter(a) is first  # used again: stamped
        await asyncio.sleep(0.6)
        assert scopes.starter(a) is not first, "let go: a new thread, a new domain"
        assert run(a, ask).wait(10) != 0, "a socket of the domain before is not its own"
        listener.kill()
        listener.wait()
    finally:
        scopes.close()


ON_DISK = {"KUBETASK_ACCOUNT_SCRATCH": "0"}


HOMES = r"""
can() { if "$@" >/dev/null 2>&1; then printf yes; else printf no; fi; }
echo mine > "$TMPDIR/scratch"
printf '{"home": "%s", "tmpdir": "%s", "owner": "%s", "writable": "%s",' \
  "$HOME" "$TMPDIR" "$(stat -c '%u %a' "$HOME")" "$(can touch "$HOME/.probe")"
printf '"neighbourList": "%s", "neighbourRead": "%s"}' \
  "$(can ls "$NEIGHBOUR_HOME")" "$(can cat "$NEIGHBOUR_HOME/scratch")"
"""


def _homes(neighbour_home: str, **env: str) -> dict[str, Any]:
    env = {"NEIGHBOUR_HOME": neighbour_home, **env}
    return {
        "command": ["sh", "-c", HOMES],
        "env": [{"name": k, "value": v} for k, v in env.items()],
    }


@pytest.mark.parametrize("dev", [ON_DISK], indirect=True)
async def test_without_a_tmp_of_its_own_a_tenant_has_a_home_on_the_hosts(dev: Dev) -> None:
    """With `KUBETASK_ACCOUNT_SCRATCH=0`, HOME and TMPDIR of a tenant's function are a
    directory of the host's only its account's user may enter (they were root's HOME, which
    it may not enter, and the /tmp every account shares); a neighbour's function can neither
    list it nor read what was left there. One the function sets itself is kept; an admin's
    function keeps the platform's."""
    a = (await _run(dev, dev.token("team-a"), "team-a", _homes("/nowhere")))["task"]["status"]
    assert a["phase"] == "Succeeded", a
    a = a["result"]
    assert a["home"] == a["tmpdir"] and a["home"] != HOME and a["writable"] == "yes", a
    assert a["owner"] == f"{account_uid('team-a')} 700", a
    b = await _run(dev, dev.token("team-b"), "team-b", _homes(a["home"]))
    b = b["task"]["status"]["result"]
    assert b["home"] != a["home"] and b["owner"] == f"{account_uid('team-b')} 700", b
    assert (b["neighbourList"], b["neighbourRead"]) == ("no", "no"), b
    left = Path(a["home"], "scratch").read_text()  # noqa: ASYNC240 (a small file)
    assert left == "mine\n", "b looked after a wrote it"
    again = await _run(dev, dev.token("team-a"), "team-a", _homes("/nowhere"))
    assert again["task"]["status"]["result"]["home"] == a["home"], "kept while it runs"
    own = await _run(dev, dev.token("team-a"), "team-a", _homes("/", TMPDIR=str(dev.shared)))
    assert own["task"]["status"]["result"]["tmpdir"] == str(dev.shared)
    admin = await _run(dev, dev.admin, "default", _homes("/nowhere"))
    assert admin["task"]["status"]["result"]["home"] == (HOME or ""), "unset: printed empty"
    # They are scratch: a dispatcher that stops removes them.
    os.kill(dev.pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while Path(a["home"]).parent.exists():
        assert time.monotonic() < deadline, "the homes outlived their dispatcher"
        await asyncio.sleep(0.1)


def test_account_homes_are_reachable_by_their_user_only_and_removed_on_close() -> None:
    homes = AccountHomes()
    home = Path(homes.environment(account_uid("team-a"))["HOME"])
    assert (
        home.stat().st_uid == account_uid("team-a") and home.parent.stat().st_mode & 0o777 == 0o711
    )
    homes.close()
    assert not home.parent.exists()


def _dispatcher_pid(dev: Dev) -> int | None:
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == dev.pid and b"dispatcher" in argv:
            return int(proc.name)
    return None


@pytest.mark.parametrize("dev", [ON_DISK], indirect=True)
async def test_the_homes_a_killed_dispatcher_left_are_removed_by_the_next(dev: Dev) -> None:
    """A dispatcher killed with SIGKILL cannot remove the homes it made, with what tenants left
    in them; the one started after it removes them when it makes its own."""
    token = dev.token("team-a")
    first = (await _run(dev, token, "team-a", _homes("/nowhere")))["task"]["status"]["result"]
    left = Path(first["home"]).parent
    killed = _dispatcher_pid(dev)
    assert killed is not None
    os.kill(killed, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _dispatcher_pid(dev) in (None, killed):
        assert time.monotonic() < deadline, "kubetask dev did not restart its dispatcher"
        await asyncio.sleep(0.1)
    assert left.exists(), "nothing could have removed it yet"
    second = (await _run(dev, token, "team-a", _homes("/nowhere")))["task"]["status"]["result"]
    made = Path(second["home"])
    assert made.parent != left and made.is_dir()  # noqa: ASYNC240 (one stat)
    assert not left.exists(), "the killed dispatcher's homes were left behind"


def test_only_homes_whose_dispatcher_is_gone_are_removed() -> None:
    """Another dispatcher's homes stay while it runs, whatever the order they were made in, and
    a directory a user made under the same name is not the platform's to remove."""
    live = AccountHomes()
    kept = Path(live.environment(account_uid("team-a"))["HOME"]).parent
    foreign = Path(tempfile.mkdtemp(prefix="kubetask-homes-"))
    (foreign / ".dispatcher").touch()
    os.chown(foreign, account_uid("team-d"), account_uid("team-d"))
    killed = subprocess.run(
        [sys.executable, "-c",
         "import os, signal\n"
         "from kubetask.executors.account_homes import AccountHomes\n"
         f"print(AccountHomes().environment({account_uid('team-b')})['HOME'], flush=True)\n"
         "os.kill(os.getpid(), signal.SIGKILL)"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    abandoned = Path(killed.stdout.strip()).parent
    assert abandoned.is_dir() and kept.is_dir()
    later = AccountHomes()
    later.environment(account_uid("team-c"))
    assert not abandoned.exists() and kept.is_dir() and foreign.is_dir()
    live.close()
    later.close()
    shutil.rmtree(foreign)


# Where the function's processes are in the cpu hierarchy, and what it can change there.
CPU = r"""
can() { if "$@" >/dev/null 2>&1; then printf yes; else printf no; fi; }
cpu='$2 ~ /(^|,)cpu(,|$)/ {print $3}'
own=$(awk -F: "$cpu" /proc/$$/cgroup)
mem=$(awk -F: '$2 ~ /(^|,)memory(,|$)/ {print $3}' /proc/$$/cgroup)
printf '{"own": "%s", "child": "%s", "stay": "%s", "up": "%s", "leave": "%s", "join": "%s", "weigh": "%s", "oom": "%s", "mem": "%s", "raise": "%s"}' \
  "$own" "$(awk -F: "$cpu" /proc/self/cgroup)" \
  "$(can sh -c "echo \$\$ > $CPU_ROOT/kubetask/team-a/${own##*/}/cgroup.procs")" \
  "$(can sh -c "echo \$\$ > $CPU_ROOT/kubetask/team-a/cgroup.procs")" \
  "$(can sh -c "echo \$\$ > $CPU_ROOT/cgroup.procs")" \
  "$(can sh -c "echo \$\$ > $CPU_ROOT/kubetask/team-b/cgroup.procs")" \
  "$(can sh -c "echo 262144 > $CPU_ROOT/kubetask/team-a/cpu.shares")" \
  "$(cat /proc/self/oom_score_adj)" "$mem" \
  "$(can sh -c "echo 9999999999 > $MEM_ROOT/kubetask/team-a/${mem##*/}/memory.limit_in_bytes")"
"""


def _own_group(controller: str) -> Path | None:
    """This process's group of a hierarchy: the dispatcher's, whose child it starts."""
    return own_group(
        Path("/proc/self/mountinfo").read_text(), Path("/proc/self/cgroup").read_text(), controller
    )


GRAB = (
    "import sys, time; b = bytearray(int(sys.argv[1]) << 20); b[::4096] = b'x' * len(b[::4096]);"
    " time.sleep(float(sys.argv[2])); print(len(b) >> 20)"
)


async def _start(dev: Dev, token: str, account: str, name: str, spec: dict[str, Any]) -> str:
    """Registers `spec` as `name` (no retries) and submits one task of it, not waiting."""
    async with httpx.AsyncClient(
        base_url=dev.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as http:
        q = {"account": account}
        deadline = time.monotonic() + 10
        while (
            r := await http.put(
                f"/v1/functions/{name}", params=q, json={"metadata": {"name": name}, "spec": spec}
            )
        ).status_code == 401 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)  # the gateway reads a new token within a second
        assert r.status_code == 200, r.text
        config = {
            "metadata": {"name": name},
            "spec": {"function": name, "maxAsyncRetryAttempts": 0},
        }
        r = await http.put(f"/v1/asyncconfigs/{name}", params=q, json=config)
        assert r.status_code == 200, r.text
        r = await http.post("/v1/tasks", params=q, json={"function": name, "payload": {}})
        assert r.status_code == 202, r.text
        return str(r.json()["metadata"]["name"])


async def _ended(dev: Dev, token: str, account: str, task_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(
        base_url=dev.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as http:
        deadline = time.monotonic() + 60
        while True:
            r = await http.get(f"/v1/tasks/{task_id}", params={"account": account})
            status: dict[str, Any] = r.json()["status"]
            if status["phase"] in ("Succeeded", "Failed"):
                return status
            assert time.monotonic() < deadline, status
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("dev", [{"KUBETASK_ACCOUNT_MAX_MEMORY": "96Mi"}], indirect=True)
async def test_an_accounts_functions_together_hold_at_most_its_memory(dev: Dev) -> None:
    """`KUBETASK_ACCOUNT_MAX_MEMORY` bounds all of an account's functions on the host together,
    its /tmp included: two attempts of 60 MiB at once do not both fit, while a neighbour's 60
    MiB at the same time does; what /tmp holds counts after its attempt ended; a function's
    own, lower limit is still named as the one it went over."""
    python = _python("team-a", "team-b")
    a, b = dev.token("team-a"), dev.token("team-b")

    def grab(mib: int, hold: float, limit: str | None = None) -> dict[str, Any]:
        spec: dict[str, Any] = {"command": [python, "-c", GRAB, str(mib), str(hold)]}
        if limit is not None:
            spec["resources"] = {"limits": {"memory": limit}}
        return spec

    over = "out of memory: its account's functions are over their limit of 100663296 bytes"
    started = [
        ("team-a", a, await _start(dev, a, "team-a", "first", grab(60, 3))),
        ("team-a", a, await _start(dev, a, "team-a", "second", grab(60, 3))),
        ("team-b", b, await _start(dev, b, "team-b", "neighbour", grab(60, 3))),
    ]
    first, second, neighbour = [await _ended(dev, t, acct, i) for acct, t, i in started]
    assert neighbour["phase"] == "Succeeded", neighbour
    phases = sorted((first["phase"], second["phase"]))
    assert phases == ["Failed", "Succeeded"], (first, second)
    failed = first if first["phase"] == "Failed" else second
    assert failed["error"].startswith(over), failed
    # What an attempt left in /tmp is the account's memory once it has ended.
    fill = {"command": ["sh", "-c", "dd if=/dev/zero of=/tmp/fill bs=1M count=70 && echo 1"]}
    filled = await _ended(dev, a, "team-a", await _start(dev, a, "team-a", "fill", fill))
    assert filled["phase"] == "Succeeded", filled
    after = await _ended(dev, a, "team-a", await _start(dev, a, "team-a", "after", grab(40, 0)))
    assert after["phase"] == "Failed" and after["error"].startswith(over), after
    # A function's own limit, lower than what the account has left, is the one it went over.
    own = grab(40, 0, limit="16Mi")
    own_status = await _ended(dev, b, "team-b", await _start(dev, b, "team-b", "own", own))
    assert own_status["error"].startswith("out of memory: over its limit of 16Mi"), own_status


async def test_each_accounts_processes_share_the_cores_as_one_weighted_group(dev: Dev) -> None:
    """Every process of an account's functions, and whatever they start, is in its attempt's
    cpu cgroup inside the account's, weighted by the account's weight; a tenant can neither
    leave it for its account's or the dispatcher's, nor join a neighbour's, nor change its
    weight. An admin's function in the account is there too."""
    root = _own_group("cpu")
    assert root is not None, "this machine mounts the cgroup v1 cpu controller"
    memory = _own_group("memory")
    assert memory is not None, "this machine mounts the cgroup v1 memory controller"
    spec = {
        "command": ["sh", "-c", CPU],
        "env": [
            {"name": "CPU_ROOT", "value": str(root)},
            {"name": "MEM_ROOT", "value": str(memory)},
        ],
        "resources": {"limits": {"memory": "256Mi"}},
    }
    b = (await _run(dev, dev.token("team-b"), "team-b", spec))["task"]["status"]
    assert b["phase"] == "Succeeded", b
    assert re.search("/kubetask/team-b/p[0-9]+-[0-9]+$", b["result"]["own"]), b["result"]
    a = (await _run(dev, dev.token("team-a"), "team-a", spec))["task"]["status"]
    seen = a["result"]
    assert re.search("/kubetask/team-a/p[0-9]+-[0-9]+$", seen["own"]), seen
    assert seen["child"] == seen["own"], seen
    # It may place its own processes in its own group (so the paths are right), no more.
    assert seen["stay"] == "yes", seen
    assert (seen["up"], seen["leave"], seen["join"], seen["weigh"]) == ("no",) * 4, seen
    assert seen["oom"] == "1000", "the OOM killer's first choice, before the platform"
    # Held to its memory limit in a group of its own, which it cannot raise.
    assert re.search("/kubetask/team-a/p[0-9]+-[0-9]+$", seen["mem"]), seen
    assert seen["raise"] == "no", seen
    shares = {
        account: (root / "kubetask" / account / "cpu.shares").read_text().strip()
        for account in ("team-a", "team-b")
    }
    assert shares == {"team-a": "2048", "team-b": "1024"}, "1024 for each unit of weight"
    all_accounts = (root / "kubetask" / "cpu.shares").read_text().strip()
    assert all_accounts == str(1024 * (os.cpu_count() or 1)), "1024 a core, as the kubelet's"
    admin = (await _run(dev, dev.admin, "team-b", spec))["task"]["status"]["result"]
    assert re.search("/kubetask/team-b/p[0-9]+-[0-9]+$", admin["own"]), admin
    # Each attempt's group is gone with it.
    assert not list((root / "kubetask" / "team-a").glob("p*")), "groups left behind"


def test_the_groups_a_killed_dispatcher_left_are_ended_by_the_next() -> None:
    """A dispatcher killed outright leaves its attempts' groups, and whatever escaped into
    them runs on. The next dispatcher on the host ends the groups named for a process that
    no longer runs, and only those, and removes the accounts' groups left empty."""
    root = _own_group("cpu")
    assert root is not None, "this machine mounts the cgroup v1 cpu controller"
    gone = subprocess.Popen(["true"])
    gone.wait()  # its number names a dispatcher that is gone
    account = root / "kubetask" / "team-orphans"
    orphan, live = account / f"p{gone.pid}-0", account / f"p{os.getpid()}-999"
    for group in (orphan, live):
        group.mkdir(parents=True)
    empty = root / "kubetask" / "team-left-empty"
    empty.mkdir()
    daemons = [subprocess.Popen(["sleep", "300.107"], start_new_session=True) for _ in range(2)]
    try:
        for group, daemon in zip((orphan, live), daemons, strict=True):
            (group / "cgroup.procs").write_text(str(daemon.pid))
        assert AccountCpu({}).why_not() is None
        assert daemons[0].wait(timeout=5) == -signal.SIGKILL and not orphan.exists()
        assert daemons[1].poll() is None and live.is_dir(), "a running dispatcher's is kept"
        assert not empty.exists()
    finally:
        for daemon in daemons:
            daemon.kill()
            daemon.wait()
        for group in (orphan, live, account):
            with contextlib.suppress(OSError):
                group.rmdir()


def test_the_cpu_hierarchy_is_found_where_the_host_mounts_it() -> None:
    mounts = (
        "30 25 0:26 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
        "31 25 0:27 /kubepods/pod1 /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
    )
    own = "5:memory:/kubepods/pod1\n3:cpu,cpuacct:/kubepods/pod1/box\n0::/\n"
    assert own_group(mounts, own, "cpu") == Path("/sys/fs/cgroup/cpu,cpuacct/box")
    plain = "32 25 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
    assert own_group(plain, "1:cpu:/\n", "cpu") == Path("/sys/fs/cgroup/cpu")
    unified = "33 25 0:29 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    assert own_group(unified, "0::/user.slice\n", "cpu") is None
    # The v2 hierarchy (`account_packets.py`), not a v1 one mounted beside it.
    assert own_group(mounts + unified, own, "") == Path("/sys/fs/cgroup")
    assert own_group(unified, "1:name=systemd:/a\n0::/user.slice\n", "") == Path(
        "/sys/fs/cgroup/user.slice"
    )
    assert own_group(mounts, own, "") is None
