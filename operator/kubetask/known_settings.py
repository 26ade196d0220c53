"""Every KUBETASK_* setting as its reader was asked for it: the default and the values it takes.

The readers (`settings.env_int` and the others) note each setting here as they read it, so the
settings reference (`settings_reference.py`: `kubetask settings`, docs/settings.md) takes its
defaults and ranges from the code that applies them instead of repeating them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Known:
    default: str  # as one would write it in the variable; "" for none
    takes: str  # the values it takes, in words
    secret: bool = False  # its value is never shown; `<NAME>_FILE` may name a file holding it


KNOWN: dict[str, Known] = {}


def note(name: str, default: object, takes: str, secret: bool = False) -> None:
    KNOWN[name] = Known(_written(default), takes, secret)


def _written(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value)
