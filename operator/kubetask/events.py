"""The audit trail: every revision of every task record, kept in the KT_EVENTS stream.

JetStream itself sources the task bucket's stream into KT_EVENTS (subjects
`kt.events.<account>.<task id>`), so each state change of a task is recorded without any work or
round trip in the gateway or dispatchers, exactly once per successful compare-and-set. Messages
with no data are deletions.
"""

from __future__ import annotations

from nats.js.api import DiscardPolicy, StorageType, StreamConfig, StreamSource, SubjectTransform

from . import history, names
from .settings import Settings


def stream_config(settings: Settings) -> StreamConfig:
    bucket_stream = f"KV_{names.TASKS_BUCKET}"
    return StreamConfig(
        name=names.EVENTS_STREAM,
        subjects=[],
        sources=[
            StreamSource(
                name=bucket_stream,
                subject_transforms=[
                    SubjectTransform(
                        src=f"$KV.{names.TASKS_BUCKET}.*.*",
                        dest="kt.events.{{wildcard(1)}}.{{wildcard(2)}}",
                    )
                ],
            )
        ],
        max_age=settings.retention_seconds,
        # A trail is history, not state: past its cap the oldest revisions go, so a flood of
        # changes cannot take the disk that records and queues need. Nothing reads it but
        # `describe` and `/events`, which then show a task's later changes only.
        max_bytes=settings.events_max_bytes,
        discard=DiscardPolicy.OLD,
        storage=StorageType.FILE,
        allow_direct=True,  # read without consumers: `direct_reads.py`
        **history.stream_options(settings),  # type: ignore[arg-type]
    )
