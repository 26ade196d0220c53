"""Sizes in bytes as a person reads them, the way `kubetask limits` and `kubetask dev` say them."""

from __future__ import annotations


def in_binary_units(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"
