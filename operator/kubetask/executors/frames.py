"""The runtime's wire format (`runtime-sidecar/frames.go`): frames of a kind byte, a 32-bit
big-endian length and that many bytes. Sidecars report in it (`runtime_server.py`) and warm
pods' proxies answer in it (`warm_pods.py`)."""

from __future__ import annotations

import struct

HEAD = struct.Struct(">BI")
RUNNING, STDOUT, STDERR = b"R"[0], b"O"[0], b"E"[0]
TERMINATED, EXIT, ANSWER = b"T"[0], b"X"[0], b"H"[0]
CODE = struct.Struct(">i")  # an exit code or HTTP status, at the start of X and H frames
# As `maxFrame` in frames.go: what a reader holds for one frame is bounded before it arrives.
MAX_FRAME = 1 << 24


class BadFrames(ValueError):
    pass


class FrameReader:
    """Frames out of bytes that arrive in pieces of any size."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buf += data
        frames = []
        at = 0
        while len(self._buf) - at >= HEAD.size:
            kind, size = HEAD.unpack_from(self._buf, at)
            if size > MAX_FRAME:
                raise BadFrames(f"a frame of {size} bytes (at most {MAX_FRAME})")
            if len(self._buf) - at - HEAD.size < size:
                break
            start = at + HEAD.size
            frames.append((kind, bytes(self._buf[start : start + size])))
            at = start + size
        del self._buf[:at]
        return frames

    def finish(self) -> None:
        """Everything fed was whole frames."""
        if self._buf:
            raise BadFrames("truncated frame")
