"""Counts by key that forget a key at zero, so that a dict of every account ever seen does not
grow with accounts that have nothing in flight (their names are a tenant's to choose)."""

from __future__ import annotations


def count_up(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


def count_down(counts: dict[str, int], key: str) -> int:
    """One fewer for `key`; returns what is left."""
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
        return left
    counts.pop(key, None)
    return 0
