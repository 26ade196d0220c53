"""Small eBPF programs on a cgroup's sockets' packets, loaded with the bare `bpf` system call.

Why bare: the programs kubetask needs (`account_packets.py`) are a dozen instructions each; a
compiler and a loader library (clang, libbpf, bcc) on every host would be a far larger part
than the programs. They are written as instructions here, with named jump targets so no
offset is counted by hand, and the kernel's verifier checks them when loaded.

Why a link, not an attachment: the kernel undoes a link when its last descriptor closes, so a
dispatcher killed outright leaves no program behind, where a firewall rule of its stays until
the next dispatcher removes it (`firewall.py`).
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import bpf_labels

_libc = ctypes.CDLL(None, use_errno=True)
_BPF = {"x86_64": 321, "aarch64": 280}
_PROG_LOAD = 5
_LINK_CREATE = 28
_CGROUP_SKB = 8  # the program type: sees each packet a cgroup's sockets send or receive
INGRESS, EGRESS = 0, 1  # where on a cgroup it is linked
_ATTR_SIZE = 144  # room for the fields used; the kernel reads the rest as zero
_LOG_SIZE = 1 << 16

# The opcodes used (register forms end in X; 32-bit jumps compare the registers' low halves).
MOV = 0xBF  # dst = src
MOV_K = 0xB7  # dst = imm
LOAD_W = 0x61  # dst = *(u32 *)(src + off)
STORE_W = 0x63  # *(u32 *)(dst + off) = src
AND_K = 0x54  # dst &= imm (32-bit)
OR_K = 0x44  # dst |= imm (32-bit)
IF_EQ_K, IF_EQ_X, IF_NE_K = 0x16, 0x1E, 0x56
IF_LT_K, IF_GT_K = 0xA6, 0x26  # unsigned
CALL = 0x85
EXIT = 0x95
GET_SOCKET_UID = 47  # the helper: the user id of the packet's socket's owner
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


def link(program: Sequence[Op | str], name: str, cgroup: Path, where: int) -> int:
    """Loads `program` and links it to `cgroup` (a cgroup v2 directory) at `where`; the link's
    descriptor, whose closing unlinks it. Raises OSError with the verifier's words."""
    raw = assemble(program)
    code = ctypes.create_string_buffer(raw, len(raw))
    licence = ctypes.create_string_buffer(b"GPL")  # the socket-uid helper is GPL-only
    log = ctypes.create_string_buffer(_LOG_SIZE)
    attr = struct.pack(
        "<IIQQIIQII16sII",
        _CGROUP_SKB,
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
