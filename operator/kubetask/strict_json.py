"""JSON as kubetask reads what a caller sends: one meaning per document.

A key given twice in one object (`{"function": "a", "function": "b"}`) is refused, not settled
by "the last one wins": a proxy, a policy check or an audit log in front of the gateway may read
the first, so the same request would mean one thing to them and another to kubetask. `NaN` and
`Infinity` are not JSON, and text must be valid UTF-8 without lone surrogates. The Kubernetes API
server refuses duplicate fields the same way under strict field validation.

jiter is the parser pydantic-core embeds, so checking for duplicates costs about what parsing
did before.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jiter

# Python's json.dumps writes these; only the error message looks for them.
_CONSTANT = re.compile(rb"(?<![\w\"])-?(NaN|Infinity)\b")


class NotJson(ValueError):
    """The text is not one JSON document kubetask accepts; the message says where."""


def loads(data: bytes | str) -> Any:
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    try:
        return jiter.from_json(raw, allow_inf_nan=False, catch_duplicate_keys=True)
    except ValueError as err:
        said = str(err).replace("Detected duplicate key", "duplicate key")
        if said.startswith(("expected value", "invalid number")) and _CONSTANT.search(raw):
            said += " (NaN and Infinity are not JSON)"
        raise NotJson(said) from None


def check_finite(value: Any) -> None:
    """A literal like 1e400 parses to infinity, which JSON cannot carry on: refused."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                raise NotJson("numbers must be finite (this one overflows)")
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
