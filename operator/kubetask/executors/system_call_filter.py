"""A seccomp filter on a tenant's processes: no user namespaces, no kernel AIO, no io_uring,
no BPF, perf events or userfaultfd.

Why user namespaces: in one of its own a process is uid 0 with every capability, and reaches
kernel code that is otherwise root's alone: mounting file systems of several kinds, making
network devices, netfilter tables. Much of the kernel's privilege-escalation history went
through there, which is why Docker's default seccomp profile refuses it. With
`KUBETASK_FUNCTION_USERS=accounts`, a tenant's function ran `unshare -Urn` and was root with
full capabilities in it (seen 2026-12-05). Nothing an account needs to run its code needs one.

Why kernel AIO: its contexts come from one pool for the whole host (`fs.aio-max-nr`, 65,536),
with no count per user. One unprivileged process's `io_setup(60000)` took 60,000 of it, and the
next asked for failed with EAGAIN (seen 2026-12-05): one call from a tenant, and no database
on the host could start its native AIO. A program that uses it can fall back to threads
when the call is not implemented (glibc's POSIX AIO never uses it).

Why io_uring: it is a large body of kernel code reachable without privileges, and optional:
a runtime that uses it can fall back to threads when `io_uring_setup` is not implemented.

Why BPF, perf events and userfaultfd: each is kernel surface that exploits have used and a
task has no need of, reachable without privileges where the host's sysctls allow it
(`kernel.unprivileged_bpf_disabled`, `kernel.perf_event_paranoid`,
`vm.unprivileged_userfaultfd`; a tenant's `perf_event_open` and `userfaultfd` were made on
this project's test machine, seen 2026-12-05). Here they are refused whatever the host's
sysctls say.

How: a seccomp filter belongs to a thread, as a Landlock domain does, and every process the
thread starts inherits it, through exec and the switch to the account's user, with no way to
take it off. It is installed on the account's thread (`account_threads.py`). The filter
answers EPERM to `unshare` and `clone` with CLONE_NEWUSER among their flags. `clone3` passes
its flags in memory a filter cannot read, so it is answered ENOSYS, on which glibc falls
back to `clone` (threads and subprocesses started under the filter here). `io_setup` and
`io_uring_setup` are answered ENOSYS; `bpf`, `perf_event_open` and `userfaultfd` EPERM,
as an unprivileged caller gets where the host's sysctls close them. Every other call is
allowed. The filter knows the native ABI's numbers and, on x86-64 and arm64, the 32-bit ones;
a call through an ABI it has no numbers for (x32, where the kernel has it) is answered ENOSYS,
so no ABI is a way around.

`KUBETASK_ACCOUNT_USER_NAMESPACES=on` leaves tenants' user namespaces allowed (rootless
container builds and browsers' sandboxes make them).
"""

from __future__ import annotations

import ctypes
import errno
import platform
from typing import NamedTuple

from . import bpf_labels

_libc = ctypes.CDLL(None, use_errno=True)
_PR_GET_SECCOMP = 21
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_CLONE_NEWUSER = 0x10000000
_X32_BIT = 0x40000000

# Offsets in struct seccomp_data: the call's number, the ABI, then six 64-bit arguments, the
# first's low half first (every ABI here is little-endian).
_NR = 0
_ARCH = 4
_FIRST_ARGUMENT = 16

_LOAD = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JUMP_IF_EQUAL = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JUMP_IF_ANY_BIT = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RETURN = 0x06  # BPF_RET | BPF_K
_ALLOW = 0x7FFF0000
_ERRNO = 0x00050000


class _Abi(NamedTuple):
    """An ABI's audit value and the numbers of the calls the filter looks at."""

    audit: int
    unshare: int
    clone: int
    clone3: int
    io_setup: int
    io_uring_setup: int
    bpf: int
    perf_event_open: int
    userfaultfd: int


_ABIS = {
    "x86_64": (
        _Abi(0xC000003E, 272, 56, 435, 206, 425, 321, 298, 323),
        _Abi(0x40000003, 310, 120, 435, 245, 425, 357, 336, 374),  # i386
    ),
    "aarch64": (
        _Abi(0xC00000B7, 97, 220, 435, 0, 425, 280, 241, 282),
        _Abi(0x40000028, 337, 120, 435, 243, 425, 386, 364, 388),  # arm
    ),
}


class _Instruction(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Instruction))]


def why_not() -> str | None:
    """Why tenants' processes cannot be filtered here; None where they can."""
    if platform.machine() not in _ABIS:
        return f"no system call numbers for {platform.machine()} here"
    if _libc.prctl(_PR_GET_SECCOMP, 0, 0, 0, 0) < 0:
        return f"no seccomp on this kernel ({errno.errorcode.get(ctypes.get_errno(), '?')})"
    return None


def program(machine: str, user_namespaces: bool = False) -> list[tuple[int, int, int, int]]:
    """The filter for `machine`'s ABIs, as (code, jump if true, jump if false, value);
    `user_namespaces`: they are allowed."""
    steps: list[_Step] = [(_LOAD, None, None, _ARCH)]
    steps += [(_JUMP_IF_EQUAL, f"abi {abi.audit}", None, abi.audit) for abi in _ABIS[machine]]
    steps.append((_RETURN, None, None, _ERRNO | errno.ENOSYS))  # an ABI without numbers here
    for abi in _ABIS[machine]:
        steps += [f"abi {abi.audit}", (_LOAD, None, None, _NR)]
        if abi.audit == 0xC000003E:  # x32's calls come as x86-64's with this bit set
            steps.append((_JUMP_IF_ANY_BIT, "unknown", None, _X32_BIT))
        unknown = [abi.io_setup, abi.io_uring_setup]
        if not user_namespaces:
            steps += [(_JUMP_IF_EQUAL, "flags", None, nr) for nr in (abi.unshare, abi.clone)]
            unknown.append(abi.clone3)
        steps += [(_JUMP_IF_EQUAL, "unknown", None, nr) for nr in unknown]
        refused = [abi.bpf, abi.perf_event_open, abi.userfaultfd]
        steps += [(_JUMP_IF_EQUAL, "refuse", None, nr) for nr in refused]
        steps.append((_RETURN, None, None, _ALLOW))
    steps += [
        "unknown",
        (_RETURN, None, None, _ERRNO | errno.ENOSYS),
        "flags",
        (_LOAD, None, None, _FIRST_ARGUMENT),
        (_JUMP_IF_ANY_BIT, "refuse", None, _CLONE_NEWUSER),
        (_RETURN, None, None, _ALLOW),
        "refuse",
        (_RETURN, None, None, _ERRNO | errno.EPERM),
    ]
    return _assemble(steps)


# An instruction whose jumps name labels (None: the next instruction), or a label.
_Step = tuple[int, str | None, str | None, int] | str


def _assemble(steps: list[_Step]) -> list[tuple[int, int, int, int]]:
    """Turns labels into the forward offsets classic BPF jumps take."""
    at = bpf_labels.positions(steps)
    out: list[tuple[int, int, int, int]] = []
    for step in steps:
        if isinstance(step, str):
            continue
        code, yes, no, value = step
        here = len(out) + 1
        out.append(
            (code, 0 if yes is None else at[yes] - here, 0 if no is None else at[no] - here, value)
        )
    return out


def filter_this_thread(user_namespaces: bool = False) -> None:
    """Installs the filter on the calling thread, and so on all it starts from now on. Needs
    no_new_privs or CAP_SYS_ADMIN: the dispatcher runs as root in accounts mode."""
    steps = program(platform.machine(), user_namespaces)
    instructions = (_Instruction * len(steps))(*(_Instruction(*s) for s in steps))
    prog = _Program(len(steps), instructions)
    if _libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "installing the seccomp filter failed")
