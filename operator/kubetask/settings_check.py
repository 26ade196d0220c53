"""Every KUBETASK_* setting the data plane reads, checked together before a component starts.

The settings are read where they are used (the AIMD window's in `dispatch/aimd.py`, the node
budget's in `dispatch/node_budget.py`...), some only once a component is connected: a value out
of range would otherwise be found after NATS came up, and a supervisor would restart the
component over and over with the reason in its log.
"""

from __future__ import annotations

from .settings_reference import read_all


def settings_problem() -> str | None:
    """The first setting that does not parse or is out of range, named, or None."""
    try:
        read_all()
    except ValueError as err:
        return str(err)
    return None
