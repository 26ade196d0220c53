"""A list page rendered from stored records without validating them again is, byte for byte,
the page the models render; what that shortcut cannot account for takes the validating way."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pydantic_core
import pytest
from kubetask.gateway import task_pages
from kubetask.models import (
    Condition,
    ExecutorRef,
    StageTimestamps,
    Task,
    TaskList,
    TaskMeta,
    TaskPhase,
    TaskSpec,
    TaskStatus,
    Waiting,
)
from kubetask.store import TaskRecord, encode

T0 = datetime(2026, 11, 1, tzinfo=UTC)
TEXTS = [
    "",
    "plain",
    "ünïcödé",
    "日本語",
    "emoji 🎉",
    'quote " and \\ back',
    "ctl \x01\n\t",
    "\u2028",
]


def _maybe(rnd: random.Random, value: Any) -> Any:
    return value if rnd.random() < 0.5 else None


def _json_value(rnd: random.Random, depth: int = 0) -> Any:
    kinds = ["int", "big", "float", "text", "bool", "null"] + (
        ["list", "dict"] if depth < 3 else []
    )
    kind = rnd.choice(kinds)
    if kind == "int":
        return rnd.randrange(-(10**6), 10**6)
    if kind == "big":
        return rnd.choice([2**63, -(2**70), 10**30])
    if kind == "float":
        return rnd.choice([0.1, -0.0, 1e300, 5e-324, 1.5, 123456.789, rnd.random()])
    if kind == "text":
        return rnd.choice(TEXTS)
    if kind == "bool":
        return rnd.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [_json_value(rnd, depth + 1) for _ in range(rnd.randrange(4))]
    return {
        rnd.choice(TEXTS) + str(i): _json_value(rnd, depth + 1) for i in range(rnd.randrange(4))
    }


def _time(rnd: random.Random) -> datetime:
    zone = rnd.choice([UTC, timezone(timedelta(hours=2))])
    return (
        T0 + timedelta(seconds=rnd.randrange(10**6), microseconds=rnd.randrange(10**6))
    ).astimezone(zone)


def _task(rnd: random.Random, n: int) -> Task:
    stamps = StageTimestamps(**{k: _maybe(rnd, _time(rnd)) for k in StageTimestamps.model_fields})
    executor = ExecutorRef(
        backend=rnd.choice(["local", "kubernetes"]),
        dispatcher=f"d-{n}",
        host=rnd.choice(["", "vm"]),
        instance=_maybe(rnd, "pid-1"),
        pod=_maybe(rnd, "pod-1"),
        namespace=_maybe(rnd, "ns"),
        container=_maybe(rnd, "main"),
        node=_maybe(rnd, "node-1"),
    )
    conditions = [
        Condition(
            type="Ready",
            status=rnd.choice(["True", "False", "Unknown"]),
            reason=rnd.choice(["", "Why"]),
            message=rnd.choice(TEXTS),
            lastTransitionTime=_maybe(rnd, _time(rnd)),
        )
        for _ in range(rnd.randrange(3))
    ]
    status = TaskStatus(
        phase=rnd.choice(list(TaskPhase)),
        attempts=rnd.randrange(5),
        timestamps=stamps,
        result=_maybe(rnd, _json_value(rnd)),
        error=_maybe(rnd, rnd.choice(TEXTS)),
        exitCode=_maybe(rnd, rnd.randrange(-9, 256)),
        stdoutTail=_maybe(rnd, rnd.choice(TEXTS)),
        stderrTail=_maybe(rnd, rnd.choice(TEXTS)),
        duration=_maybe(rnd, "12ms"),
        nextAttemptAt=_maybe(rnd, _time(rnd)),
        executor=_maybe(rnd, executor),
        observedGeneration=_maybe(rnd, rnd.randrange(9)),
        conditions=conditions,
        waiting=_maybe(rnd, Waiting(queue="KT_Q_a", position=_maybe(rnd, 3), reason="queued")),
    )
    meta = TaskMeta(
        name=f"task-{n}",
        namespace=_maybe(rnd, "team-a"),
        labels=rnd.choice([{}, {"app.kubernetes.io/name": "x", "tier": "gold"}]),
        annotations=rnd.choice([{}, {"note": rnd.choice(TEXTS)}]),
    )
    return Task(
        metadata=meta, spec=TaskSpec(function="fn", payload=_json_value(rnd)), status=status
    )


def _stored(task: Task) -> tuple[str, bytes, int]:
    record = TaskRecord(task=task, token="t", claimSeq=random.choice([None, 7]))
    return f"a.{task.id}", encode(record), 1


def test_a_page_from_stored_records_is_the_models_page_byte_for_byte() -> None:
    rnd = random.Random(5)
    for round_ in range(60):
        tasks = [_task(rnd, round_ * 100 + i) for i in range(rnd.randrange(0, 40))]
        cursor = rnd.choice([None, "a/task-9"])
        body, unreadable = task_pages.render([_stored(t) for t in tasks], cursor)
        assert unreadable == []
        assert body == TaskList(items=tasks, cursor=cursor).model_dump_json().encode()


def _doc(task: Task) -> dict[str, Any]:
    return pydantic_core.from_json(encode(TaskRecord(task=task, token="t")))


@pytest.mark.parametrize(
    "change",
    [
        # Written by a version before `conditions` existed: its default, not a missing field.
        lambda d: d["task"]["status"].pop("conditions"),
        # Metadata ignores what it does not know (as Kubernetes' does): left out, not copied.
        lambda d: d["task"]["metadata"].update(uid="1234"),
        # A record field of another version of the platform (records ignore unknown fields).
        lambda d: d.update(owner="x"),
    ],
)
def test_what_the_shortcut_does_not_know_is_rendered_by_the_models(change: Any) -> None:
    task = _task(random.Random(1), 1)
    doc = _doc(task)
    change(doc)
    stored = pydantic_core.to_json(doc)
    expected = TaskRecord.model_validate_json(stored).task.model_dump(mode="json")
    assert task_pages.task_json("a.task-1", stored, 1) == expected


def test_records_that_do_not_decode_are_reported_and_the_rest_listed() -> None:
    good = _task(random.Random(2), 2)
    broken_doc = _doc(good)
    broken_doc["task"]["status"] = "Running"  # a nested object that is not one
    unknown = _doc(good)
    unknown["task"]["status"]["colour"] = "red"  # the status takes no unknown field
    not_a_list = _doc(good)
    not_a_list["task"]["status"]["conditions"] = {}
    found = [
        ("a.x", b"not json", 3),
        ("a.y", pydantic_core.to_json(broken_doc), 4),
        ("a.z", pydantic_core.to_json(unknown), 5),
        ("a.w", pydantic_core.to_json(not_a_list), 6),
        _stored(good),
    ]
    body, unreadable = task_pages.render(found, None)
    assert [(e.key, e.revision) for e in unreadable] == [
        ("a.x", 3),
        ("a.y", 4),
        ("a.z", 5),
        ("a.w", 6),
    ]
    assert body == TaskList(items=[good], cursor=None).model_dump_json().encode()
