"""What a person names on the command line to be read (`--payload-file`, `functions apply -f`,
`-` for stdin), read up to a limit: `/dev/zero`, or any file without end, filled the CLI's
memory until something killed it. Far above what the API takes, so the API's own limits stay
the ones a user meets."""

from __future__ import annotations

import sys
from pathlib import Path

MAX_BYTES = 64 << 20


class TooLarge(ValueError):
    pass


def named(source: str) -> str:
    """How an error names `source`."""
    return "stdin" if source == "-" else source


def read(source: str, limit: int = MAX_BYTES) -> str:
    """The text of `source` (a path, or `-` for stdin), decoded as UTF-8. Raises OSError when
    it cannot be read, UnicodeDecodeError when it is not text, TooLarge past `limit` bytes."""
    if source == "-":
        data = sys.stdin.buffer.read(limit + 1)
    else:
        with Path(source).open("rb") as file:
            data = file.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"{named(source)} holds more than {limit >> 20} MiB; nothing was sent")
    return data.decode()
