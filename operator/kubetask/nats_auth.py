"""NATS users and what each may do: every component connects as its own user, allowed only the
subjects it needs, and function processes get no NATS credentials at all.

The table below is the single statement of who may publish and subscribe where; `kubetask dev`
writes it into nats-server's configuration, the Helm chart renders the same table
(`kubetask nats-config`), and docs/security.md explains it. Each user receives
replies on an inbox of its own (`_INBOX_<user>.>`), so no component can read another's replies.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from . import names, private_files

# Every queue subject of every account: submission publishes runnable tasks there.
_QUEUES = ["kt.q.>", "kt.qf.>", "kt.qp.>", "kt.qm.>"]
# Task records, functions and async configs (KV puts are publishes on `$KV.<bucket>.<key>`).
_RECORDS = ["$KV.kt_tasks.>"]
_REGISTRY = ["$KV.kt_functions.>", "$KV.kt_asyncconfigs.>", "$KV.kt_routes.>"]


@dataclass(frozen=True)
class Permissions:
    publish: list[str]
    subscribe: list[str] = field(default_factory=list)
    deny_publish: list[str] = field(default_factory=list)
    # May answer each message it received with a reply subject, once and within a few seconds,
    # and publish to no other inbox.
    answers: bool = False


# What registers functions, submits and stops tasks on users' behalf: the gateway and the operator.
_PLATFORM_API = Permissions(
    publish=[
        "$JS.API.>",
        "$JS.ACK.>",
        "$JS.FC.>",
        *_RECORDS,
        *_REGISTRY,
        *_QUEUES,
        "kt.ctl.stop.>",
        # The final line of a task it ended before it ran (`actions.stop`).
        names.ALL_LOGS,
        "kt.quarantine.>",
        # What it wrote to the audit trail per account (`usage_reports.py`).
        f"{names.USAGE_PREFIX}.>",
    ],
)

PERMISSIONS: dict[str, Permissions] = {
    # The HTTP API: records, queues, registry, stream and consumer management, stop requests,
    # and moving a function's backlog when its queue changes (`queue_moves.py`, hence acks).
    # It also hears what every component wrote per account to the history streams, to keep
    # each account to its quota there (`gateway/history_quota.py`).
    # It hears log lines as they are written, to follow a task's log without polling its
    # stream (`direct_reads.wakeups`).
    # It asks the dispatchers what holds a waiting task back (`holds.py`).
    "gateway": dataclasses.replace(
        _PLATFORM_API,
        publish=[*_PLATFORM_API.publish, f"{names.HOLDS_PREFIX}.>"],
        subscribe=[f"{names.USAGE_PREFIX}.>", names.ALL_LOGS],
    ),
    # Runs tasks: claims and finishes records, acks queue messages, schedules retries, writes
    # logs, hears stop requests. It may not delete or purge streams, nor touch the registry.
    "dispatcher": Permissions(
        publish=[
            "$JS.API.>",
            "$JS.ACK.>",
            "$JS.FC.>",
            *_RECORDS,
            *_QUEUES,
            "kt.qs.>",
            "kt.qfs.>",
            "kt.qps.>",
            "kt.qms.>",
            "$KV.kt_leases.>",
            names.ALL_LOGS,
            f"{names.USAGE_PREFIX}.>",
            "kt.quarantine.>",
        ],
        # Queue subjects: a dozing pull watches its function's for the next task (`pull.py`).
        # A gateway's questions about what holds a function's tasks back, which it answers.
        subscribe=["kt.ctl.stop.>", *_QUEUES, f"{names.HOLDS_PREFIX}.>"],
        deny_publish=["$JS.API.STREAM.DELETE.>", "$JS.API.STREAM.PURGE.>"],
        answers=True,
    ),
    # Delivers subject destinations: the accounts' `out.` namespaces and nothing else (plus the
    # one API call that says whether a stream captures the subject).
    "destinations": Permissions(publish=["out.>", "$JS.API.STREAM.NAMES"]),
    # The Kubernetes operator: what the gateway may, since it registers functions and submits
    # and stops Tasks on users' behalf; it hears the gateways' counts of each account's
    # records, to hold kubectl-applied Tasks to the record quota (`record_reports.py`).
    "operator": dataclasses.replace(_PLATFORM_API, subscribe=[names.RECORD_USAGE_SUBJECT]),
    # People and tests: everything (kept in the data directory, given to no component).
    "admin": Permissions(publish=[">"], subscribe=[">"]),
}


def inbox_prefix(user: str) -> str:
    return f"_INBOX_{user}"


def user_entry(user: str, password: str) -> dict[str, object]:
    perms = PERMISSIONS[user]
    publish: dict[str, list[str]] = {"allow": perms.publish}
    if perms.deny_publish:
        publish["deny"] = perms.deny_publish
    subscribe = (
        perms.subscribe if user == "admin" else [*perms.subscribe, inbox_prefix(user) + ".>"]
    )
    permissions: dict[str, object] = {"publish": publish, "subscribe": {"allow": subscribe}}
    if perms.answers:
        permissions["allow_responses"] = {"max": 1, "expires": "5s"}
    return {"user": user, "password": password, "permissions": permissions}


def password_variable(user: str) -> str:
    """The environment variable nats-server reads a user's password from (the Helm chart)."""
    return f"KT_{user.upper()}_PASSWORD"


def server_config(passwords: dict[str, str] | None) -> str:
    """The `authorization` block of nats-server's configuration (its format accepts JSON).
    Without passwords, each is a reference to `password_variable(user)`, which nats-server
    fills in from its environment: that is the chart's file, passwords coming from a Secret."""
    placeholder = "@@{}@@"
    users = [
        user_entry(user, passwords[user] if passwords else placeholder.format(user))
        for user in PERMISSIONS
    ]
    text = "authorization: " + json.dumps({"users": users}, indent=2) + "\n"
    if passwords is None:
        for user in PERMISSIONS:
            text = text.replace(f'"{placeholder.format(user)}"', "$" + password_variable(user))
    return text


CHART_FILE = Path(__file__).resolve().parents[2] / "charts/kubetask/files/nats-authorization.conf"


def load_or_create(path: Path) -> dict[str, str]:
    """Every user's password, generated on first use and kept (0600) for the next start."""
    stored: dict[str, str] = {}
    if path.exists():
        stored = json.loads(path.read_text())
    missing = [u for u in PERMISSIONS if u not in stored]
    if missing:
        stored.update({u: secrets.token_urlsafe(24) for u in missing})
        private_files.write(path, json.dumps(stored, indent=2))
    return stored


def write_server_config(
    path: Path, passwords: dict[str, str], max_file_store: int | None = None
) -> Path:
    """With `max_file_store`, JetStream's storage (`store_budget.py`), besides the users."""
    text = server_config(passwords)
    if max_file_store is not None:
        text += f"jetstream {{ max_file_store: {max_file_store} }}\n"
    private_files.write(path, text)
    return path


def env_for(user: str, passwords: dict[str, str], secrets_dir: Path) -> dict[str, str]:
    """The variables a component reads its credentials from (`settings.Settings`): the user
    and the path of a 0600 file holding its password, so that the password is not in the
    process's environment (which /proc shows to processes of the same user)."""

    def password_file(of: str) -> str:
        path = secrets_dir / f"{of}.password"
        if not path.exists() or path.read_text() != passwords[of]:
            private_files.write(path, passwords[of])
        return str(path)

    env = {"KUBETASK_NATS_USER": user, "KUBETASK_NATS_PASSWORD_FILE": password_file(user)}
    if user == "dispatcher":
        env["KUBETASK_DESTINATIONS_NATS_USER"] = "destinations"
        env["KUBETASK_DESTINATIONS_NATS_PASSWORD_FILE"] = password_file("destinations")
    return env
