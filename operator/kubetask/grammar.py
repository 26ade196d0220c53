"""The one grammar for every name a user can set that reaches a NATS subject, stream or KV key.

Accounts, functions and async configs are DNS-1123 labels (they are Kubernetes namespaces and
object names too); task ids are a little wider because users put trace ids in them. Neither
admits `.`, `*`, `>`, whitespace, control or non-ASCII characters, so a valid name is always
exactly one subject token and can never widen a subscription or step into another account's
keys. Every entrance — HTTP, CLI, CRD schema, token creation, queue messages — checks names
against these patterns before any NATS call; nothing else is ever interpolated into a subject.

Subject destinations are confined to the account's own namespace, `out.<account>.>`; the
platform's subjects (`kt.…`, `$…`, `_INBOX…`) and other accounts' namespaces are unreachable.
"""

from __future__ import annotations

import re

NAME_MAX = 63
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
NAME_RULE = "lowercase letters, digits and '-', 1-63 characters, starting and ending alphanumeric"

TASK_ID_MAX = 128
TASK_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"
TASK_ID_RULE = "letters, digits, '-' and '_', 1-128 characters, starting alphanumeric"

# A task-id prefix in a list query: the start of a task id, possibly empty.
ID_PREFIX_PATTERN = r"^([A-Za-z0-9][A-Za-z0-9_-]{0,127})?$"

DESTINATION_ROOT = "out"
SUBJECT_MAX = 255
SUBJECT_TOKEN = r"[A-Za-z0-9_-]{1,64}"
# Any account's destination namespace (schemas and CRDs); which account is checked in code.
SUBJECT_DESTINATION_PATTERN = rf"^{DESTINATION_ROOT}[.]{NAME_PATTERN[1:-1]}([.]{SUBJECT_TOKEN})+$"
_SUBJECT_TOKEN = re.compile(SUBJECT_TOKEN)

# A path (and query) a warm instance is asked on: it is written into an HTTP request line as it
# is, so only RFC 3986's path and query characters; a space, CR or LF would split the request.
HTTP_PATH_MAX = 2048
HTTP_PATH_PATTERN = r"^/[-A-Za-z0-9._~!$&'()*+,;=:@%/?]*$"

# A webhook destination: http(s), a host name or address, a port, then visible ASCII only. No
# user:password part (deprecated by RFC 3986, and each HTTP client treats it its own way), and
# no space or control character, which the HTTP client would quote or drop into another URL.
WEBHOOK_PATTERN = (
    r"^https?://([A-Za-z0-9_]([-A-Za-z0-9_.]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]+\])"
    r"(:[0-9]{1,5})?([/?#][!-~]*)?$"
)
WEBHOOK_RULE = (
    "an http(s) URL: a host, an optional port, then visible ASCII characters only "
    "(no spaces, no user:password@)"
)
_WEBHOOK = re.compile(WEBHOOK_PATTERN)

# Kubernetes' grammars for what a function asks of its pod and its processes.
LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_VALUE_PATTERN = r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$"
OBJECT_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
IMAGE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$"
# Kubernetes' resource quantities (`quantities.py`): its suffixes only, so no `K` and no `mi`.
QUANTITY_PATTERN = r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?$"
# No NUL byte: no process can be given an argument, variable or directory holding one.
PROCESS_TEXT_PATTERN = r"^[^\x00]*$"
# The kernel's bounds on what exec is given, in bytes without the closing NUL: one argument, or
# one variable as `NAME=value`, is at most MAX_ARG_STRLEN (32 pages), and a path (the program,
# the working directory) at most PATH_MAX. Past either, every attempt failed to start
# (`Argument list too long`, `File name too long`). A variable is held to less than an
# argument: a tenant's crosses the user switch under a longer name (`KT_HELD_<name>`,
# `executors/function_users.py`).
ARGUMENT_MAX_BYTES = 131_071
VARIABLE_MAX_BYTES = ARGUMENT_MAX_BYTES - 64
PATH_MAX_BYTES = 4_095

_NAME = re.compile(NAME_PATTERN)
_TASK_ID = re.compile(TASK_ID_PATTERN)

# What a value outside a pattern is told, in words, rather than the regular expression.
RULES = {
    NAME_PATTERN: NAME_RULE,
    TASK_ID_PATTERN: TASK_ID_RULE,
    ID_PREFIX_PATTERN: f"the start of a task id: {TASK_ID_RULE}",
    HTTP_PATH_PATTERN: "a path starting with '/', in RFC 3986 path and query characters",
    WEBHOOK_PATTERN: WEBHOOK_RULE,
    LABEL_KEY_PATTERN: "a Kubernetes label key: an optional DNS prefix and '/', then up to 63 "
    "letters, digits, '-', '_' and '.', starting and ending alphanumeric",
    LABEL_VALUE_PATTERN: "a Kubernetes label value: up to 63 letters, digits, '-', '_' and '.', "
    "starting and ending alphanumeric",
    OBJECT_NAME_PATTERN: "a Kubernetes object name: lowercase letters, digits, '-' and '.'",
    ENV_NAME_PATTERN: "letters, digits and '_', not starting with a digit",
    IMAGE_PATTERN: "an image reference: letters, digits and . _ / : @ -",
    PROCESS_TEXT_PATTERN: "no NUL character",
    QUANTITY_PATTERN: "a Kubernetes quantity such as 500m, 2, 64Mi or 1e3",
    SUBJECT_DESTINATION_PATTERN: f"a subject in the account's namespace, {DESTINATION_ROOT}."
    "<account>.<token>[.<token>...], tokens of letters, digits, '-' and '_'",
}


def is_name(value: object) -> bool:
    """An account, function or async-config name (a DNS-1123 label)."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def is_task_id(value: object) -> bool:
    return isinstance(value, str) and _TASK_ID.fullmatch(value) is not None


def webhook_problem(url: str) -> str | None:
    """Why `url` may not be a webhook destination, or None when it may."""
    match = _WEBHOOK.fullmatch(url)
    if match is None:
        return f"a webhook destination is {WEBHOOK_RULE}"
    if match.group(3) and int(match.group(3)[1:]) > 65535:
        return "a webhook destination's port is at most 65535"
    return None


def destination_namespace(account: str) -> str:
    """The subjects an account's subject destinations may name: `out.<account>.` + tokens."""
    return f"{DESTINATION_ROOT}.{account}."


def subject_destination_problem(account: str, subject: str) -> str | None:
    """Why `subject` may not be a destination of `account`, or None when it may."""
    namespace = destination_namespace(account)
    if len(subject) > SUBJECT_MAX:
        return f"subject destinations are at most {SUBJECT_MAX} characters"
    if not subject.startswith(namespace):
        return (
            f"subject destinations of account {account!r} must start with {namespace!r} "
            "(the platform's own subjects and other accounts' are not reachable)"
        )
    tokens = subject[len(namespace) :].split(".")
    if not all(_SUBJECT_TOKEN.fullmatch(t) for t in tokens):
        return (
            f"after {namespace!r} a subject destination is one or more '.'-separated tokens of "
            "letters, digits, '-' and '_' (no wildcards)"
        )
    return None
