"""The history caps `kubetask dev` gives its components when the defaults do not fit its disk.

JetStream reserves a stream's `max_bytes` when it is made, out of nats-server's storage, which
is, unless configured, three quarters of the free space of its store's disk when it starts. The
logs and audit-trail streams default to 4 GiB and 2 GiB (`KUBETASK_LOGS_MAX_BYTES`,
`KUBETASK_EVENTS_MAX_BYTES`): with less than about 8 GiB free, making them failed with
"insufficient storage resources", and `kubetask dev` waited for a gateway that could never
start (seen, on a 64 MiB disk). Where neither is set, each is held to a share of that storage
instead, so that records and queues keep the rest; one set by hand is kept as given, and a
component that cannot make its stream then says which settings to lower (`jetstream.py`).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

from .settings import HISTORY_MIN, Settings

# nats-server's own default for its storage, of the free space at its start.
NATS_SHARE = 0.75
# Of that storage, what each history stream may reserve.
SHARES = {"KUBETASK_LOGS_MAX_BYTES": 1 / 4, "KUBETASK_EVENTS_MAX_BYTES": 1 / 8}


def _used(store: Path) -> int:
    return sum(f.stat().st_size for f in store.rglob("*") if f.is_file())


def storage(store: Path) -> int:
    """nats-server's storage for `store` on a first start. What the store already holds is
    counted as free, so a later start finds the same caps, and the streams made with them
    stay as they were made."""
    store.mkdir(parents=True, exist_ok=True)
    return int((shutil.disk_usage(store).free + _used(store)) * NATS_SHARE)


def caps(store_bytes: int, settings: Settings, env: Mapping[str, str]) -> dict[str, str]:
    """The history caps to give the components: each not set in `env` whose value is more
    than its share of `store_bytes`, held to that share."""
    values = {
        "KUBETASK_LOGS_MAX_BYTES": settings.logs_max_bytes,
        "KUBETASK_EVENTS_MAX_BYTES": settings.events_max_bytes,
    }
    lowered = {}
    for name, share in SHARES.items():
        if name not in env and values[name] > store_bytes * share:
            lowered[name] = str(max(HISTORY_MIN, int(store_bytes * share)))
    return lowered
