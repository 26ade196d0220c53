"""One event per task that reaches a terminal phase, in the KT_EVENTS stream — the audit trail.

The Nats-Msg-Id is derived from the task and its final dispatch token, so the event that a
crashed dispatcher's successor publishes again is absorbed by JetStream's de-duplication window.
"""

from __future__ import annotations

import json

from nats.js import JetStreamContext

from . import names
from .store import TaskRecord


async def publish_terminal(js: JetStreamContext, record: TaskRecord) -> None:
    task = record.task
    status = task.status
    event = {
        "account": task.account,
        "id": task.id,
        "function": task.spec.function,
        "phase": status.phase.value,
        "attempts": status.attempts,
        "error": status.error,
        "timestamps": status.timestamps.model_dump(mode="json"),
    }
    await js.publish(
        names.event_subject(task.account, task.spec.function),
        json.dumps(event).encode(),
        headers={"Nats-Msg-Id": f"{task.account}.{task.id}.{record.token}.{status.phase.value}"},
    )
