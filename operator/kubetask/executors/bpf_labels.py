"""Jump targets by name, for the two BPF programs kubetask writes out by hand: the classic one
of `system_call_filter.py` and the extended ones of `cgroup_bpf.py`. An offset counted by hand
goes wrong silently when an instruction is added above its target; a label does not."""

from __future__ import annotations

from collections.abc import Iterable


def positions(program: Iterable[object]) -> dict[str, int]:
    """Each label's place: the index of the instruction after it, labels (strings in the
    program's list) taking no room."""
    at: dict[str, int] = {}
    count = 0
    for item in program:
        if isinstance(item, str):
            at[item] = count
        else:
            count += 1
    return at
