"""What the pods of a function on Kubernetes are named: each function's its own."""

from __future__ import annotations

import re

from kubetask.executors.pod_template import warm_name
from kubetask.grammar import NAME_PATTERN
from kubetask.models import TaskFunction


def _fn(name: str) -> TaskFunction:
    return TaskFunction.model_validate(
        {"metadata": {"name": name, "namespace": "team-a"}, "spec": {"server": {"command": ["s"]}}}
    )


def test_functions_with_long_names_alike_get_deployments_of_their_own() -> None:
    stem = "a" * 59
    names = [stem + end for end in ("b", "bc", "bcd", "-cd", "x-yz")]
    deployments = {warm_name(_fn(name)) for name in names}
    assert len(deployments) == len(names), deployments
    for deployment in deployments:
        assert re.fullmatch(NAME_PATTERN, deployment), deployment
    assert warm_name(_fn(stem + "b")) == f"kt-{stem}b", "a name that fits is kept as it is"
