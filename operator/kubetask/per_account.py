"""Settings given per account as `account=value,...` (weights, retention, back-pressure
limits): one grammar, one error message naming the variable and the first bad entry."""

from __future__ import annotations

import os

from . import grammar
from .known_settings import note


def parse(
    variable: str, text: str, high: float, what: str, *, zero: bool = False, whole: bool = False
) -> dict[str, float]:
    """`account=value,...` with each value above 0 (or 0 itself, with `zero`), at most `high`,
    and a whole number with `whole`; raises ValueError."""
    values: dict[str, float] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        account, sep, raw = entry.partition("=")
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        fits = (0 <= value if zero else 0 < value) and value <= high
        if not sep or not grammar.is_name(account.strip()) or not fits or (whole and value % 1):
            least = "0 or more" if zero else "above 0"
            raise ValueError(
                f"{variable} entry {entry!r}: expected <account>=<{what}>, an account name and"
                f" a {'whole ' if whole else ''}number {least} and at most {high:g}"
            )
        values[account.strip()] = value
    return values


def from_env(
    variable: str, high: float, what: str, *, zero: bool = False, whole: bool = False
) -> dict[str, float]:
    """`parse` of the environment variable `variable` (unset: no account has its own)."""
    note(variable, "", f"account=<{what}>,... (a {'whole ' if whole else ''}number each)")
    return parse(variable, os.environ.get(variable, ""), high, what, zero=zero, whole=whole)


def parse_accounts(variable: str, text: str) -> frozenset[str]:
    """`account,...`, or `*` for every account; raises ValueError."""
    note(variable, "", "account names separated by commas, or *")
    accounts = frozenset(filter(None, (e.strip() for e in text.split(","))))
    for account in accounts:
        if account != "*" and not grammar.is_name(account):
            raise ValueError(f"{variable} entry {account!r}: expected an account name or *")
    return accounts
