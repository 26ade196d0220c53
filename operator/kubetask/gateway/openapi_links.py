"""OpenAPI links: where an answer's id leads. A submitted task's `metadata.name` is the id its
own operations take, and its `metadata.namespace` the account; a stored function or async
config the same. Without them the document said nothing of how one call feeds the next, and a
client following it (a generated SDK, a stateful API fuzzer such as schemathesis) could reach a
task's operations only with ids it guessed, all of them 404.

The targets are named by path and method and looked up in the generated document, so a
renamed route fails here, at start, instead of leaving a link to nothing.
"""

from __future__ import annotations

from typing import Any

NAME, ACCOUNT = "$response.body#/metadata/name", "$response.body#/metadata/namespace"
TASK = {"path.task_id": NAME, "query.account": ACCOUNT}
OBJECT = {"path.name": NAME, "query.account": ACCOUNT}
# A list's first item, where a client starts from what is already there.
FIRST = "$response.body#/0/metadata/name", "$response.body#/0/metadata/namespace"
FIRST_TASK = "$response.body#/items/0/metadata/name", "$response.body#/items/0/metadata/namespace"

Target = tuple[str, str, dict[str, str], dict[str, Any] | None]


def _task_operations(parameters: dict[str, str]) -> list[Target]:
    return [
        (method, "/v1/tasks/{task_id}" + tail, parameters, None)
        for method, tail in (
            ("get", ""),
            ("get", "/events"),
            ("get", "/logs"),
            ("post", "/stop"),
            ("post", "/pause"),
            ("post", "/resume"),
            ("delete", ""),
        )
    ]


# (method, path, answer's status) → (method, path, parameters, request body) it leads to.
LINKS: dict[tuple[str, str, str], list[Target]] = {
    ("post", "/v1/tasks", "202"): _task_operations(TASK),
    ("get", "/v1/tasks", "200"): _task_operations(
        {"path.task_id": FIRST_TASK[0], "query.account": FIRST_TASK[1]}
    ),
    ("get", "/v1/functions", "200"): [
        ("post", "/v1/tasks", {"query.account": FIRST[1]}, {"function": FIRST[0]}),
        ("get", "/v1/functions/{name}", {"path.name": FIRST[0], "query.account": FIRST[1]}, None),
    ],
    ("put", "/v1/functions/{name}", "200"): [
        ("post", "/v1/tasks", {"query.account": ACCOUNT}, {"function": NAME}),
        (
            "put",
            "/v1/asyncconfigs/{name}",
            OBJECT,
            {"metadata": {"name": NAME}, "spec": {"function": NAME}},
        ),
        ("get", "/v1/functions/{name}", OBJECT, None),
        ("delete", "/v1/functions/{name}", OBJECT, None),
    ],
    ("put", "/v1/asyncconfigs/{name}", "200"): [
        ("get", "/v1/asyncconfigs/{name}", OBJECT, None),
        ("delete", "/v1/asyncconfigs/{name}", OBJECT, None),
    ],
}


def add(doc: dict[str, Any]) -> None:
    paths = doc["paths"]
    for (method, path, status), targets in LINKS.items():
        links = paths[path][method]["responses"][status].setdefault("links", {})
        for target_method, target_path, parameters, body in targets:
            operation_id = paths[target_path][target_method]["operationId"]
            link: dict[str, Any] = {"operationId": operation_id, "parameters": parameters}
            if body is not None:
                link["requestBody"] = body
            links[_link_name(operation_id)] = link


def _link_name(operation_id: str) -> str:
    """`get_task_v1_tasks__task_id__get` → `get_task`: FastAPI's ids end with the route."""
    return operation_id.split("_v1_", 1)[0]
