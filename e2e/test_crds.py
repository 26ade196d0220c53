"""The generated CRDs against a real kube-apiserver: they install, valid objects are accepted,
invalid ones are rejected by the API server with a message that names the field, and
`kubectl get` shows the printer columns."""

from __future__ import annotations

import json
import textwrap

import pytest
from controlplane import ControlPlane


def _fn(name: str, spec: str) -> str:
    return (
        textwrap.dedent(f"""
        apiVersion: kubetask.io/v1alpha1
        kind: TaskFunction
        metadata: {{name: {name}}}
        spec:
    """)
        + textwrap.indent(textwrap.dedent(spec).strip(), "  ")
        + "\n"
    )


def test_valid_objects_are_accepted(crds: ControlPlane) -> None:
    crds.kubectl(
        "apply", "-f", "-", stdin=_fn("ok-command", "command: [echo, hi]\ntimeoutSeconds: 0.5")
    )
    crds.kubectl(
        "apply", "-f", "-", stdin=_fn("ok-server", "server: {command: [srv]}\nmaxConcurrency: 3")
    )
    podded = """
        command: [a]
        tolerations:
        - {operator: Exists}
        - {key: a, effect: NoExecute, tolerationSeconds: -5}
        resources: {requests: {cpu: 500m, memory: 1Gi}, limits: {cpu: "1", memory: 1Gi}}
    """
    crds.kubectl("apply", "-f", "-", stdin=_fn("ok-podded", podded))
    crds.kubectl(
        "apply",
        "-f",
        "-",
        stdin=textwrap.dedent("""
        apiVersion: kubetask.io/v1alpha1
        kind: AsyncConfig
        metadata: {name: ok-command}
        spec:
          function: ok-command
          maxAsyncRetryAttempts: 0
          destinationConfig:
            onFailure: {kind: webhook, target: "http://example.test/hook"}
    """),
    )
    got = json.loads(crds.kubectl("get", "taskfunction", "ok-server", "-o", "json").stdout)
    assert got["spec"]["server"]["concurrency"] == 1  # defaults come from the models too
    assert got["spec"]["timeoutSeconds"] == 300


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("env: []", "exactly one of spec.command or spec.server must be set"),
        ("command: [a]\nserver: {command: [b]}", "exactly one of spec.command or spec.server"),
        ("command: [a]\ntimeoutSeconds: 86401", "spec.timeoutSeconds: Invalid value: 86401"),
        ("command: [a]\nmaxConcurrency: -1", "spec.maxConcurrency: Invalid value: -1"),
        ("command: [a]\nqueueMode: private", 'spec.queueMode: Unsupported value: "private"'),
        (
            "command: [a]\ntolerations: [{operator: Equal, value: x}]",
            "a toleration without a key matches every taint",
        ),
        (
            "command: [a]\ntolerations: [{key: a, operator: Exists, value: x}]",
            "a toleration with operator Exists has no value",
        ),
        (
            "command: [a]\ntolerations: [{key: a, tolerationSeconds: 5}]",
            "tolerationSeconds needs effect NoExecute",
        ),
        (
            "command: [a]\nresources: {requests: {memory: 2Gi}, limits: {memory: 1Gi}}",
            "a resource's request may not exceed its limit",
        ),
        ("command: [a]\nresources: {limits: {memory: 9Ei}}", "must be below 8Ei"),
        ("command: [a]\nresources: {limits: {memory: 1K}}", "spec.resources.limits.memory"),
        ('command: ["", a]', "the program to run (the command's first word) may not be empty"),
        (
            'server: {command: [""]}',
            'spec.server.command: Invalid value: "array": the program to run',
        ),
        # No longer than the kernel takes (`grammar.py`): an argument, a path, a variable.
        (f"command: [echo, {'a' * 131_072}]", "spec.command[1]: Too long"),
        (f"command: [/{'a' * 4_095}]", "is a path: at most 4,095 bytes"),
        (f"command: [a]\nworkingDir: /{'d' * 4_095}", "spec.workingDir: Too long"),
        (
            f"command: [a]\nenv: [{{name: A, value: {'b' * 131_006}}}]",
            "a variable, as NAME=value, may be at most 131,007 bytes",
        ),
    ],
)
def test_invalid_functions_are_rejected_naming_the_field(
    crds: ControlPlane, spec: str, message: str
) -> None:
    result = crds.kubectl("apply", "-f", "-", stdin=_fn("bad", spec), check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_unknown_destination_kind_is_rejected(crds: ControlPlane) -> None:
    result = crds.kubectl(
        "apply",
        "-f",
        "-",
        check=False,
        stdin=textwrap.dedent("""
        apiVersion: kubetask.io/v1alpha1
        kind: AsyncConfig
        metadata: {name: bad-dest}
        spec:
          function: f
          destinationConfig:
            onSuccess: {kind: email, target: someone}
    """),
    )
    assert result.returncode != 0
    assert 'spec.destinationConfig.onSuccess.kind: Unsupported value: "email"' in result.stderr


def test_get_tasks_shows_function_phase_attempts_age_duration(crds: ControlPlane) -> None:
    crds.kubectl(
        "apply",
        "-f",
        "-",
        stdin=textwrap.dedent("""
        apiVersion: kubetask.io/v1alpha1
        kind: Task
        metadata: {name: report-1}
        spec: {function: ok-command, payload: {day: 3}}
    """),
    )
    status = {"status": {"phase": "Succeeded", "attempts": 2, "duration": "1.5s"}}
    crds.kubectl(
        "patch",
        "task",
        "report-1",
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )
    table = crds.kubectl("get", "tasks").stdout.splitlines()
    assert table[0].split() == ["NAME", "FUNCTION", "PHASE", "ATTEMPTS", "AGE", "DURATION"]
    assert table[1].split()[:4] == ["report-1", "ok-command", "Succeeded", "2"]
    assert table[1].split()[-1] == "1.5s"
    short = crds.kubectl("get", "ktask", "report-1", "-o", "jsonpath={.spec.payload.day}").stdout
    assert short == "3"  # free-form payloads are kept as written
    functions = crds.kubectl("get", "taskfunctions").stdout.splitlines()[0].split()
    assert functions == ["NAME", "QUEUE", "CONCURRENCY", "BACKLOG", "READY", "AGE"]
