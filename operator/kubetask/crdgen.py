"""Generate the CRD manifests in `crds/` from the pydantic models (`kubetask crds generate`).

Pydantic emits JSON Schema (draft 2020-12); Kubernetes wants a *structural* OpenAPI v3.0 schema.
The conversion inlines references, turns `X | None` into `X` (absent = null), maps numeric
`exclusiveMinimum` to the v3.0 boolean form, and marks free-form JSON (task payloads and results)
with `x-kubernetes-preserve-unknown-fields`. A test regenerates and compares, so `crds/` cannot
drift from the models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from . import grammar
from .models import (
    API_GROUP,
    API_VERSION,
    AsyncConfigSpec,
    AsyncConfigStatus,
    TaskFunctionSpec,
    TaskFunctionStatus,
    TaskSpec,
    TaskStatus,
)

# `anyOf` at an object's top level restates a CEL rule for the OpenAPI document; the CRD has the
# rule itself (a structural schema may not constrain types inside `anyOf`).
# `prefixItems` has no place in a structural schema; where a model says it, a CEL rule says
# the same (`models.CommandLine`).
_DROP = {"title", "$defs", "prefixItems"}


def _convert(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_convert(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].split("/")[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _convert(merged, defs)
    if "anyOf" in node and "properties" in node:
        node = {k: v for k, v in node.items() if k != "anyOf"}
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if rest.get("default", 0) is None:
            rest.pop("default")
        if len(options) == 1:
            return _convert({**options[0], **rest}, defs)
        node = {**rest, "anyOf": options}
    node = _keys_as_cel(node)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "additionalProperties" and value is False:
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
            continue
        if key == "x-kubernetes-validations":
            out[key] = value
            continue
        if key == "properties":
            out[key] = {k: _convert(v, defs) for k, v in value.items()}
            continue
        out[key] = _convert(value, defs)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if not any(k in out for k in ("type", "anyOf", "x-kubernetes-preserve-unknown-fields")):
        # `Any` in the models: free-form JSON, kept as the user wrote it.
        desc = out.get("description")
        out = {"x-kubernetes-preserve-unknown-fields": True}
        if desc:
            out["description"] = desc
    return out


def _keys_as_cel(node: dict[str, Any]) -> dict[str, Any]:
    """A map whose keys are constrained (`patternProperties`, `propertyNames`), which a
    structural schema cannot say: its values' schema becomes `additionalProperties` and the
    rule on its keys a CEL rule."""
    if "patternProperties" not in node and "propertyNames" not in node:
        return node
    node = dict(node)
    rules: list[str] = []
    patterns = node.pop("patternProperties", {})
    if patterns:
        ((pattern, values),) = patterns.items()
        node["additionalProperties"] = values
        rules.append(f"k.matches(r'{pattern}')")
    keys = node.pop("propertyNames", {})
    if "enum" in keys:
        rules.append("k in [" + ", ".join(f"'{k}'" for k in keys["enum"]) + "]")
    if "maxLength" in keys:
        rules.append(f"size(k) <= {keys['maxLength']}")
    if "pattern" in keys:
        rules.append(f"k.matches(r'{keys['pattern']}')")
    rule = {"rule": f"self.all(k, {' && '.join(rules)})", "message": "a key is not allowed here"}
    node["x-kubernetes-validations"] = [*node.get("x-kubernetes-validations", []), rule]
    return node


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(mode="validation")
    converted: dict[str, Any] = _convert(raw, raw.get("$defs", {}))
    return converted


def _crd(
    kind: str,
    plural: str,
    short: list[str],
    spec: type[BaseModel],
    status: type[BaseModel],
    columns: list[dict[str, Any]],
    name_pattern: str = grammar.NAME_PATTERN,
    name_rule: str = grammar.NAME_RULE,
) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short,
                "categories": ["kubetask"],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "required": ["spec"],
                            # The name becomes a subject token and a key: the API's grammar.
                            "x-kubernetes-validations": [
                                {
                                    "rule": f"self.metadata.name.matches('{name_pattern}')",
                                    "message": f"metadata.name: {name_rule}",
                                }
                            ],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": schema_of(spec),
                                "status": schema_of(status),
                            },
                        }
                    },
                }
            ],
        },
    }


def _col(name: str, path: str, type_: str = "string", priority: int = 0) -> dict[str, Any]:
    col: dict[str, Any] = {"name": name, "type": type_, "jsonPath": path}
    if priority:
        col["priority"] = priority
    return col


AGE = _col("Age", ".metadata.creationTimestamp", "date")


def crds() -> dict[str, dict[str, Any]]:
    return {
        "taskfunctions": _crd(
            "TaskFunction",
            "taskfunctions",
            ["tf", "taskfn"],
            TaskFunctionSpec,
            TaskFunctionStatus,
            [
                _col("Queue", ".status.queue"),
                _col("Concurrency", ".spec.maxConcurrency", "integer"),
                _col("Backlog", ".status.backlog", "integer"),
                _col("Ready", ".status.ready", "boolean"),
                AGE,
            ],
        ),
        "asyncconfigs": _crd(
            "AsyncConfig",
            "asyncconfigs",
            ["acfg"],
            AsyncConfigSpec,
            AsyncConfigStatus,
            [
                _col("Function", ".spec.function"),
                _col("Retries", ".spec.maxAsyncRetryAttempts", "integer"),
                _col("MaxAge", ".spec.maxAsyncEventAgeInSeconds", "integer"),
                _col("Ready", ".status.ready", "boolean"),
                AGE,
            ],
        ),
        "tasks": _crd(
            "Task",
            "tasks",
            ["ktask"],
            TaskSpec,
            TaskStatus,
            [
                _col("Function", ".spec.function"),
                _col("Phase", ".status.phase"),
                _col("Attempts", ".status.attempts", "integer"),
                AGE,
                _col("Duration", ".status.duration"),
                _col("Error", ".status.error", priority=1),
                _col("Pod", ".status.executor.pod", priority=1),
                _col("Node", ".status.executor.node", priority=1),
            ],
            grammar.TASK_ID_PATTERN,
            grammar.TASK_ID_RULE,
        ),
    }


def render(crd: dict[str, Any]) -> str:
    header = (
        "# Generated by `kubetask crds generate` from operator/kubetask/models.py. Do not edit.\n"
    )
    return header + yaml.safe_dump(crd, sort_keys=False, width=100)


# Where the manifests live: the top-level directory for `kubectl apply -f crds/`, and the chart's,
# from which Helm installs them.
OUTPUTS = (Path("crds"), Path("charts/kubetask/crds"))


def write_crds(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for plural, crd in crds().items():
        path = out / f"{API_GROUP}_{plural}.yaml"
        path.write_text(render(crd))
        written.append(path)
    return written
