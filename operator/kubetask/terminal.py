"""What the CLI prints is mostly text others wrote: a task's output and error, what its
process printed last, a webhook's answer. A terminal obeys the control characters in it: an
escape sequence can retitle the window, set the clipboard (OSC 52), clear the screen or move
the cursor over what was printed, a carriage return overwrites a line, and bidirectional
overrides reorder what is shown (a tenant's task printing `\\x1b[2J` cleared the screen of the
admin running `kubetask describe` on it). The CLI's client commands show such characters as
escapes instead (`\\x1b`, `\\u202e`), as `cat -v` does, on stdout and stderr alike; tab and
newline stay. `-o json` is unchanged: JSON writes them escaped already.
"""

from __future__ import annotations

import re
from typing import Any, TextIO

# C0 but tab and newline, DEL, C1, the bidirectional marks and overrides, and lone surrogates
# (which JSON may carry and no terminal encoding can write).
_OBEYED = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def inert(text: str) -> str:
    return _OBEYED.sub(_escaped, text)


class InertStream:
    """A text stream that writes what it is given with its control characters escaped."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(inert(text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
