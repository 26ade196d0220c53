"""Kubernetes resource quantities (`64Mi`, `500m`, `1e3`), as a function's `resources` gives them.

The API server parses them for the pod only when an attempt runs, and refuses a pod whose
request exceeds its limit: accepted at registration, such a function failed every attempt
instead. So the quantity grammar is Kubernetes' own (no `K`, no `mi`), requests are compared
with limits here and in the CRD (CEL's `quantity()`), and sizes past what a node could have are
refused.
"""

from __future__ import annotations

import re
from decimal import Decimal, DecimalException

from .grammar import QUANTITY_PATTERN

# 2^63: past it Kubernetes' own int64 arithmetic on a quantity overflows.
MAX = "8Ei"

_FORM = re.compile(QUANTITY_PATTERN)
_FACTORS = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    **{f"{s}i": Decimal(2 ** (10 * (n + 1))) for n, s in enumerate("KMGTPE")},
}


def value(text: str) -> Decimal:
    """The quantity's value in its base unit (cores, bytes); ValueError outside the grammar."""
    match = _FORM.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a Kubernetes quantity")
    suffix = match.group(3) or ""
    number = text[: len(text) - len(suffix)].lstrip("+")
    try:
        if suffix[:1] in ("e", "E") and suffix[1:2] not in ("", "i"):
            return Decimal(number + suffix)  # an exponent: exact, up to 10^(10^18)
        return Decimal(number) * _FACTORS[suffix]
    except DecimalException:  # past Decimal's exponents: was a 500 at registration
        raise ValueError(f"{text!r} is out of any range a quantity may have") from None


MAX_VALUE = value(MAX)
