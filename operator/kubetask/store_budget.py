"""How much of its disk `kubetask dev` gives JetStream, and the history caps that fit in it.

JetStream's storage is, unless configured, three quarters of the free space of its store's disk
when nats-server starts; what the gateway's task index (a copy of every record) and the logs
write to the same disk was not counted, so the disk filled before JetStream's limit, and every
write then waited out its timeout ("no space left on device", seen on a 64 MiB disk). `kubetask
dev` now configures it (`max_file_store`) to `NATS_SHARE` of the disk, what its data directory
already holds counted as free, so a later start finds the same figure; the gateway is told it
(`KUBETASK_STORE_MAX_BYTES`) and refuses submissions before it is reached
(`gateway/store_room.py`).

JetStream also reserves a stream's `max_bytes` out of that storage when the stream is made. The
logs and audit-trail streams default to 4 GiB and 2 GiB (`KUBETASK_LOGS_MAX_BYTES`,
`KUBETASK_EVENTS_MAX_BYTES`): with less storage than that, making them failed with
"insufficient storage resources", and `kubetask dev` waited for a gateway that could never
start (seen). Where neither is set, each is held to a share of the storage instead, so that
records and queues keep the rest; one set by hand is kept as given, and a component that cannot
make its stream then says which settings to lower (`jetstream.py`).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

from .settings import HISTORY_MIN, Settings

# Of the disk, what JetStream may store, as it counts: its files took 1.6 times that and the
# index (a copy of each record) about as much again, on a 64 MiB disk filled with records.
NATS_SHARE = 0.3
# Of JetStream's storage, what each history stream may reserve.
SHARES = {"KUBETASK_LOGS_MAX_BYTES": 1 / 4, "KUBETASK_EVENTS_MAX_BYTES": 1 / 8}


def _used(data_dir: Path) -> int:
    return sum(f.stat().st_size for f in data_dir.rglob("*") if f.is_file())


def storage(data_dir: Path) -> int:
    """JetStream's storage for `kubetask dev`'s `data_dir`: the same at every start, while
    nothing else on its disk changes, so the caps, and the streams made with them, stay as
    they were made."""
    return int((shutil.disk_usage(data_dir).free + _used(data_dir)) * NATS_SHARE)


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
