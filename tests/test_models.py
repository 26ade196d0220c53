"""The object model and the state table, without any server."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from kubetask import nats_auth, quantities
from kubetask.crdgen import OUTPUTS, crds, render
from kubetask.models import (
    Destination,
    RetryBackoff,
    StageTimestamps,
    Task,
    TaskFunctionSpec,
    TaskMeta,
    TaskPhase,
    TaskSpec,
    TaskStatus,
)
from kubetask.states import TERMINAL, TRANSITIONS, allowed
from kubetask.store import TaskRecord, encode
from pydantic import ValidationError

ROOT = Path(__file__).resolve().parents[1]


def test_crds_directories_are_generated_from_the_models() -> None:
    for out in OUTPUTS:
        for plural, crd in crds().items():
            path = ROOT / out / f"kubetask.io_{plural}.yaml"
            assert path.read_text() == render(crd), f"{path} is stale: run `kubetask crds generate`"


def test_function_needs_exactly_one_runtime_and_bounded_timeout() -> None:
    TaskFunctionSpec(command=["x"], timeoutSeconds=0.001)
    TaskFunctionSpec(server={"command": ["x"]}, timeoutSeconds=86400)
    for bad in (
        {},
        {"command": ["x"], "server": {"command": ["y"]}},
        {"command": ["x"], "timeoutSeconds": 86400.5},
        {"command": ["x"], "timeoutSeconds": 0},
        {"command": []},
        {"command": ["x"], "maxConcurrency": 0},
    ):
        with pytest.raises(ValidationError):
            TaskFunctionSpec.model_validate(bad)


def test_destination_target_must_fit_its_kind() -> None:
    Destination(kind="webhook", target="https://example.test/hook")
    for kind, target in (("webhook", "ftp://x"), ("function", "Not_A_Name"), ("subject", "a.*")):
        with pytest.raises(ValidationError):
            Destination(kind=kind, target=target)  # type: ignore[arg-type]


def test_backoff_grows_exponentially_to_a_cap() -> None:
    b = RetryBackoff(initialSeconds=1, multiplier=2, maxSeconds=5)
    assert [b.delay(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 5]


def test_state_table_terminal_phases_are_final_and_every_phase_can_end() -> None:
    assert set(TRANSITIONS) == set(TaskPhase)
    for phase in TERMINAL:
        assert TRANSITIONS[phase] == frozenset()
    for phase in set(TaskPhase) - TERMINAL:
        reachable, frontier = {phase}, [phase]
        while frontier:
            for nxt in TRANSITIONS[frontier.pop()]:
                if nxt not in reachable:
                    reachable.add(nxt)
                    frontier.append(nxt)
        assert reachable & TERMINAL, phase
    assert not allowed(TaskPhase.Succeeded, TaskPhase.Running)
    assert allowed(TaskPhase.Running, TaskPhase.Running)  # takeover after a dispatcher crash


def test_the_charts_nats_users_are_generated_from_the_permission_table() -> None:
    assert nats_auth.CHART_FILE.read_text() == nats_auth.server_config(None), (
        f"{nats_auth.CHART_FILE} is stale: run `kubetask nats-config`"
    )


def test_a_stored_record_reads_back_the_same_and_keeps_nulls_inside_payloads() -> None:
    stamps = StageTimestamps(submitted=datetime(2026, 11, 30, tzinfo=UTC))
    for payload in (None, {"a": None, "b": [None, 1]}, [None], 0, ""):
        for result in (None, {"x": None}):
            status = TaskStatus(phase=TaskPhase.Succeeded, timestamps=stamps, result=result)
            record = TaskRecord(
                task=Task(
                    metadata=TaskMeta(name="t1", namespace="acct"),
                    spec=TaskSpec(function="f", payload=payload),
                    status=status,
                ),
                token="tok",
            )
            stored = encode(record)
            assert b'"error"' not in stored and b'"exitCode"' not in stored  # unset: left out
            assert TaskRecord.model_validate_json(stored) == record


def test_quantities_read_as_kubernetes_reads_them() -> None:
    """`E` is exa, `Ei` exbi, `E3` an exponent; `K` and `mi` are no suffixes of Kubernetes."""
    for text, value in (
        ("500m", Decimal("0.5")),
        ("64Mi", Decimal(64 * 2**20)),
        ("1E", Decimal(10**18)),
        ("1Ei", Decimal(2**60)),
        ("1E3", Decimal(1000)),
        ("+.5k", Decimal(500)),
        ("1e999999", Decimal("1e999999")),
    ):
        assert quantities.value(text) == value, text
    for text in ("1K", "1mi", "-1", "1e", "", "1.5.5", "1 Gi", "1e99999999999999999999",
                 "1e-99999999999999999999", "9.5E+1000000000000000000"):  # fmt: skip
        with pytest.raises(ValueError):
            quantities.value(text)
