"""Small eBPF programs on a cgroup's sockets and their packets, loaded with the bare `bpf`
system call.

Why bare: the programs kubetask needs (`account_packets.py`, `account_sockets.py`) are a few
dozen instructions each; a compiler and a loader library (clang, libbpf, bcc) on every host
would be a far larger part than the programs. They are written as instructions here, with
named jump targets so no offset is counted by hand, and the kernel's verifier checks them when
loaded.

Why a link, not an attachment: the kernel undoes a link when its last descriptor closes, so a
dispatcher killed outright leaves no program behind, where a firewall rule of its stays until
the next dispatcher removes it (`firewall.py`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import bpf_labels
from .cgroups import own_group

_libc = ctypes.CDLL(None, use_errno=True)
_BPF = {"x86_64": 321, "aarch64": 280}
_MAP_CREATE = 0
_PROG_LOAD = 5
_LINK_CREATE = 28
# Program types, with where on a cgroup each is linked.
SKB = 8  # each packet a cgroup's sockets send or receive
INGRESS, EGRESS = 0, 1
SOCK = 9  # each internet socket a cgroup's processes make, or release
SOCK_CREATE, SOCK_RELEASE = 2, 34
_HASH = 1  # the map type used
_NO_PREALLOC = 1  # a map flag: entries are allocated as they are added
_ATTR_SIZE = 144  # room for the fields used; the kernel reads the rest as zero
_LOG_SIZE = 1 << 16

# The opcodes used (register forms end in X; 32-bit jumps compare the registers' low halves).
MOV = 0xBF  # dst = src
MOV32 = 0xBC  # dst = src, the low half
MOV_K = 0xB7  # dst = imm
ADD_K = 0x07  # dst += imm
LOAD_W = 0x61  # dst = *(u32 *)(src + off)
LOAD_DW = 0x79  # dst = *(u64 *)(src + off)
STORE_W = 0x63  # *(u32 *)(dst + off) = src
STORE_DW = 0x7B  # *(u64 *)(dst + off) = src
ATOMIC_ADD_DW = 0xDB  # *(u64 *)(dst + off) += src, atomically (imm 0: add)
LOAD_MAP = 0x18  # dst = the map whose descriptor is imm (src 1); takes two instructions
AND_K = 0x54  # dst &= imm (32-bit)
OR_K = 0x44  # dst |= imm (32-bit)
IF_EQ_K, IF_EQ_X, IF_NE_K = 0x16, 0x1E, 0x56
IF_LT_K, IF_GT_K = 0xA6, 0x26  # unsigned
IF_EQ64_K, IF_NE64_K, IF_GE64_K = 0x15, 0x55, 0x35  # 64-bit; the last unsigned
GOTO = 0x05
CALL = 0x85
EXIT = 0x95
# Helpers called.
MAP_LOOKUP, MAP_UPDATE, MAP_DELETE = 1, 2, 3
GET_CURRENT_UID_GID = 15  # the calling process's user id (low half) and group id
GET_SOCKET_COOKIE = 46  # a socket's number, unique while the host is up
GET_SOCKET_UID = 47  # the user id of the packet's socket's owner
ONLY_NEW = 1  # MAP_UPDATE's flag: fail if the key is there
STACK = 10  # the register that points at the top of the program's stack
# Fields of `struct __sk_buff`, the programs' view of a packet.
MARK = 8
IFINDEX = 40
LOOPBACK = 1  # the loopback device's index, in every network namespace


@dataclass(frozen=True)
class Op:
    """One instruction; a jump's `off` may name a label (a string in the program's list)."""

    code: int
    dst: int = 0
    src: int = 0
    off: int | str = 0
    imm: int = 0


def load_map(register: int, fd: int) -> list[Op]:
    """`register` = the map whose descriptor is `fd`."""
    return [Op(LOAD_MAP, dst=register, src=1, imm=fd), Op(0)]


def on_stack(register: int, offset: int) -> list[Op]:
    """`register` = the address `offset` bytes below the top of the stack."""
    return [Op(MOV, dst=register, src=STACK), Op(ADD_K, dst=register, imm=offset)]


def assemble(program: Sequence[Op | str]) -> bytes:
    """The program's bytes; strings in it are labels, taking no room."""
    labels = bpf_labels.positions(program)
    out: list[bytes] = []
    for op in (item for item in program if not isinstance(item, str)):
        off = op.off if isinstance(op.off, int) else labels[op.off] - len(out) - 1
        imm = op.imm - (1 << 32) if op.imm >= 1 << 31 else op.imm
        out.append(struct.pack("<BBhi", op.code, (op.src << 4) | op.dst, off, imm))
    return b"".join(out)


def why_not() -> str | None:
    """Why no program can be loaded here; None if one can be tried."""
    if platform.machine() not in _BPF:
        return f"no system call number for bpf on {platform.machine()} here"
    if os.geteuid() != 0:
        return "only root can link programs to cgroups"
    return None


def _bpf(command: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, _ATTR_SIZE)
    fd = int(_libc.syscall(_BPF[platform.machine()], command, buf, _ATTR_SIZE))
    if fd < 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))
    return fd


def new_map(key_size: int, value_size: int, entries: int) -> int:
    """A hash map's descriptor; its entries are allocated as they are added. Programs loaded
    with it hold it; close the descriptor once they are."""
    attr = struct.pack("<IIIII", _HASH, key_size, value_size, entries, _NO_PREALLOC)
    return _bpf(_MAP_CREATE, attr)


def _link(program: Sequence[Op | str], name: str, cgroup: Path, where: int, kind: int) -> int:
    """Loads `program`, of type `kind`, and links it to `cgroup` (a cgroup v2 directory) at
    `where`; the link's descriptor, whose closing unlinks it. Raises OSError with the
    verifier's words."""
    raw = assemble(program)
    code = ctypes.create_string_buffer(raw, len(raw))
    # The project's; no helper the kernel keeps for GPL programs is called.
    licence = ctypes.create_string_buffer(b"Apache-2.0")
    log = ctypes.create_string_buffer(_LOG_SIZE)
    attr = struct.pack(
        "<IIQQIIQII16sII",
        kind,
        len(raw) // 8,
        ctypes.addressof(code),
        ctypes.addressof(licence),
        1,
        _LOG_SIZE,
        ctypes.addressof(log),
        0,
        0,
        name.encode()[:15],
        0,
        where,
    )
    try:
        loaded = _bpf(_PROG_LOAD, attr)
    except OSError as err:
        said = log.value.decode(errors="replace").strip().splitlines()
        raise OSError(err.errno, f"{err.strerror}: {said[0] if said else 'not loaded'}") from err
    try:
        target = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return _bpf(_LINK_CREATE, struct.pack("<IIII", loaded, target, where, 0))
        finally:
            os.close(target)
    finally:
        os.close(loaded)  # the link holds the program


Programs = list[tuple[Sequence[Op | str], str, int, int]]  # program, name, where, kind


def link_here(programs: Programs) -> list[int]:
    """Links each of `programs` (program, name, where, kind) to this process's cgroup v2 group,
    which every process it starts is born in; the links' descriptors, all or none. Raises
    OSError saying why not."""
    group = own_group(
        Path("/proc/self/mountinfo").read_text(), Path("/proc/self/cgroup").read_text(), ""
    )
    if group is None:
        raise OSError(errno.ENOENT, "no cgroup v2 hierarchy is mounted")
    links: list[int] = []
    try:
        for program, name, where, kind in programs:
            links.append(_link(program, name, group, where, kind))
    except OSError:
        for fd in links:
            os.close(fd)
        raise
    return links


class Linked:
    """Programs linked to this process's cgroup v2 group once (`start`), and unlinked by
    `close` or when the process ends. `why_not`: why they are not linked; None once they are.
    Subclasses say what they link (`_programs`)."""

    def __init__(self, why_not: str | None) -> None:
        self._links: list[int] = []
        self._why_not = why_not
        self._started = False

    def _programs(self, maps: list[int]) -> Programs:
        """The programs to link; the maps made for them go in `maps`, to be closed once the
        programs hold them."""
        raise NotImplementedError

    def start(self) -> None:
        if self._started or self._why_not is not None:
            return
        self._started = True
        self._why_not = why_not()
        if self._why_not is not None:
            return
        maps: list[int] = []
        try:
            self._links = link_here(self._programs(maps))
        except OSError as err:
            self._why_not = f"cannot link a program to this process's cgroup: {err}"
        finally:
            for fd in maps:
                os.close(fd)

    def why_not(self) -> str | None:
        return self._why_not

    def close(self) -> None:
        for fd in self._links:
            os.close(fd)
        self._links.clear()
