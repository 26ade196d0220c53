"""The object model: the one source of truth for the CRDs, the HTTP API and the stored records.

Objects are shaped like Kubernetes resources (apiVersion/kind/metadata/spec/status) so the same
YAML works with `kubectl apply` and with `kubetask functions apply -f`. The account (tenant) is the
object's namespace. `crdgen.py` turns these classes into `crds/*.yaml`; FastAPI turns them into
the OpenAPI document; the data plane stores them as JSON.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    Strict,
    model_validator,
)

from . import grammar, quantities

API_GROUP = "kubetask.io"
API_VERSION = "v1alpha1"
GROUP_VERSION: Literal["kubetask.io/v1alpha1"] = "kubetask.io/v1alpha1"

MAX_TIMEOUT_SECONDS = 24 * 3600
MIN_TIMEOUT_SECONDS = 0.001

# Names that end up as NATS subject tokens, stream names and Kubernetes object names: the one
# grammar of `grammar.py`, so the CRDs, the OpenAPI document and the API enforce the same rule.
Name = Annotated[
    str, Field(min_length=1, max_length=grammar.NAME_MAX, pattern=grammar.NAME_PATTERN)
]
# Task ids are chosen by users (often a trace id); they become a NATS subject token and a KV key.
TaskId = Annotated[
    str, Field(min_length=1, max_length=grammar.TASK_ID_MAX, pattern=grammar.TASK_ID_PATTERN)
]
# Numbers are numbers: `true` is not 1 and `"3"` is not 3 (strict), and never NaN or infinite.
Number = Annotated[float, Strict(), AllowInfNan(False)]
Count = Annotated[int, Strict()]
Flag = Annotated[bool, Strict()]


def _time_not_number(value: Any) -> Any:
    """A time is an RFC 3339 string (or a datetime); pydantic would take a number as seconds
    since the epoch, which no caller of this API means."""
    if isinstance(value, int | float):
        raise ValueError("a time is an RFC 3339 string, not a number")
    return value


Timestamp = Annotated[datetime, BeforeValidator(_time_not_number)]


class KubeModel(BaseModel):
    """Strict about unknown fields, like a structural CRD schema with no preserve-unknown-fields."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# Kubernetes' grammar for label keys and values (annotation keys too), also where the API, not
# the API server, takes the object: the same objects go both ways.
LabelKey = Annotated[
    str,
    Field(
        max_length=253,
        pattern=grammar.LABEL_KEY_PATTERN,
    ),
]
LabelValue = Annotated[str, Field(max_length=63, pattern=grammar.LABEL_VALUE_PATTERN)]


class ObjectMeta(KubeModel):
    name: Name
    namespace: Name | None = Field(
        default=None,
        description="The account (tenant) owning the object; the API fills in the caller's.",
    )
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    annotations: dict[LabelKey, str] = Field(default_factory=dict)
    model_config = ConfigDict(extra="ignore")


class TaskMeta(ObjectMeta):
    """A task's name is its id: chosen by the client (often a trace id) or generated."""

    name: TaskId


def utf8_bytes(value: str) -> int:
    return len(value.encode(errors="surrogatepass"))


def _at_most(limit: int, what: str) -> AfterValidator:
    """The kernel counts bytes; a schema's maxLength counts characters, so it can only be the
    outer bound (a character is up to four bytes), and this says the rest."""

    def check(value: str) -> str:
        if (size := utf8_bytes(value)) > limit:
            raise ValueError(f"{what} may be at most {limit:,} bytes (UTF-8), not {size:,}")
        return value

    return AfterValidator(check)


# What reaches an exec call as an argument, a variable's value or a directory: no NUL byte,
# which no process can be given, and no longer than the kernel takes (`grammar`); a command
# past either was accepted and then failed every attempt with "could not start".
ProcessText = Annotated[
    str,
    Field(max_length=grammar.ARGUMENT_MAX_BYTES, pattern=grammar.PROCESS_TEXT_PATTERN),
    _at_most(grammar.ARGUMENT_MAX_BYTES, "an argument"),
]
ProcessPath = Annotated[
    str,
    Field(max_length=grammar.PATH_MAX_BYTES, pattern=grammar.PROCESS_TEXT_PATTERN),
    _at_most(grammar.PATH_MAX_BYTES, "a path"),
]

# A command line's first word is the program exec looks for: an empty one is never found, and
# one longer than a path is never opened, so a function with either was accepted and then
# failed every attempt with "could not start".
PROGRAM_NAMED: dict[str, JsonValue] = {
    "rule": "size(self) == 0 || self[0] != ''",
    "message": "the program to run (the command's first word) may not be empty",
}
PROGRAM_A_PATH: dict[str, JsonValue] = {
    "rule": f"size(self) == 0 || size(self[0]) <= {grammar.PATH_MAX_BYTES}",
    "message": f"the program to run (the command's first word) is a path: at most "
    f"{grammar.PATH_MAX_BYTES:,} bytes",
}


def _program_named(command: list[str]) -> list[str]:
    if command and not command[0]:
        raise ValueError(PROGRAM_NAMED["message"])
    if command and (size := utf8_bytes(command[0])) > grammar.PATH_MAX_BYTES:
        raise ValueError(f"{PROGRAM_A_PATH['message']} (UTF-8), not {size:,}")
    return command


CommandLine = Annotated[
    list[ProcessText],
    AfterValidator(_program_named),
    # Said twice for two readers: `prefixItems` for the API's JSON Schema (a client generating
    # requests from it sent `[""]`), the CEL rule for the CRD, whose schemas cannot hold it.
    # The first word is not checked by `items` once `prefixItems` names it, so it says all.
    Field(
        json_schema_extra={
            "prefixItems": [
                {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": grammar.PATH_MAX_BYTES,
                    "pattern": grammar.PROCESS_TEXT_PATTERN,
                }
            ],
            "x-kubernetes-validations": [PROGRAM_NAMED, PROGRAM_A_PATH],
        }
    ),
]


# Said twice: CEL for the API server, `_fits` for the API (and, counting bytes where CEL counts
# characters, for the operator).
VARIABLE_FITS: dict[str, JsonValue] = {
    "rule": "size(self.name) + 1 + (has(self.value) ? size(self.value) : 0) <= "
    f"{grammar.VARIABLE_MAX_BYTES}",
    "message": f"a variable, as NAME=value, may be at most {grammar.VARIABLE_MAX_BYTES:,} bytes",
}


class EnvVar(KubeModel):
    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra={"x-kubernetes-validations": [VARIABLE_FITS]},
    )

    name: str = Field(
        min_length=1, max_length=grammar.VARIABLE_MAX_BYTES, pattern=grammar.ENV_NAME_PATTERN
    )
    value: ProcessText = ""

    @model_validator(mode="after")
    def _fits(self) -> EnvVar:
        size = len(self.name) + 1 + utf8_bytes(self.value)
        if size > grammar.VARIABLE_MAX_BYTES:
            raise ValueError(f"{VARIABLE_FITS['message']} (UTF-8), not {size:,}")
        return self


# What a function may ask of the pod it runs in on Kubernetes (`executors/pod_template.py`): a
# validated subset of a pod template. Everything else (volumes, host access, privileges, the
# pod's own security context) stays the platform's to decide.
ObjectName = Annotated[
    str, Field(min_length=1, max_length=253, pattern=grammar.OBJECT_NAME_PATTERN)
]
Quantity = Annotated[str, Field(max_length=64, pattern=grammar.QUANTITY_PATTERN)]
ResourceName = Literal["cpu", "memory", "ephemeral-storage"]

# The rules twice: CEL for the API server, `_sane` for the API.
RESOURCE_RULES: list[dict[str, JsonValue]] = [
    {
        "rule": " && ".join(
            f"(!has(self.{side}) || self.{side}.all(k, "
            f"quantity(self.{side}[k]).compareTo(quantity('{quantities.MAX}')) < 0))"
            for side in ("requests", "limits")
        ),
        "message": f"a resource quantity must be below {quantities.MAX}",
    },
    {
        "rule": "!has(self.requests) || !has(self.limits) || self.requests.all(k, "
        "!(k in self.limits) || "
        "quantity(self.requests[k]).compareTo(quantity(self.limits[k])) <= 0)",
        "message": "a resource's request may not exceed its limit",
    },
]


class Resources(KubeModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"x-kubernetes-validations": [*RESOURCE_RULES]}
    )

    requests: dict[ResourceName, Quantity] = Field(default_factory=dict, max_length=3)
    limits: dict[ResourceName, Quantity] = Field(default_factory=dict, max_length=3)

    @model_validator(mode="after")
    def _sane(self) -> Resources:
        values = {
            side: {k: quantities.value(v) for k, v in quantity.items()}
            for side, quantity in (("requests", self.requests), ("limits", self.limits))
        }
        if any(v >= quantities.MAX_VALUE for side in values.values() for v in side.values()):
            raise ValueError(str(RESOURCE_RULES[0]["message"]))
        limits = values["limits"]
        if any(k in limits and v > limits[k] for k, v in values["requests"].items()):
            raise ValueError(str(RESOURCE_RULES[1]["message"]))
        return self


class SourceRef(KubeModel):
    name: ObjectName = Field(description="A ConfigMap or Secret in the function's namespace.")
    optional: Flag | None = None


ONE_ENV_SOURCE: dict[str, JsonValue] = {
    "rule": "has(self.configMapRef) != has(self.secretRef)",
    "message": "exactly one of configMapRef or secretRef must be set",
}


class EnvFromSource(KubeModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"x-kubernetes-validations": [ONE_ENV_SOURCE]}
    )

    configMapRef: SourceRef | None = None
    secretRef: SourceRef | None = None
    prefix: str | None = Field(default=None, max_length=253, pattern=grammar.ENV_NAME_PATTERN)

    @model_validator(mode="after")
    def _one_source(self) -> EnvFromSource:
        if (self.configMapRef is None) == (self.secretRef is None):
            raise ValueError(ONE_ENV_SOURCE["message"])
        return self


# Kubernetes' own rules for a pod's tolerations (it refuses the pod otherwise, at the first
# attempt): the rules twice, CEL for the API server, `_as_kubernetes_would` for the API.
TOLERATION_RULES: list[dict[str, JsonValue]] = [
    {
        "rule": "has(self.key) || (has(self.operator) && self.operator == 'Exists')",
        "message": "a toleration without a key matches every taint: its operator must be Exists",
    },
    {
        "rule": "!has(self.operator) || self.operator != 'Exists' || !has(self.value) "
        "|| self.value == ''",
        "message": "a toleration with operator Exists has no value",
    },
    {
        "rule": "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
        "message": "tolerationSeconds needs effect NoExecute",
    },
]


class Toleration(KubeModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"x-kubernetes-validations": [*TOLERATION_RULES]}
    )

    key: LabelKey | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: LabelValue | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    # The pod's field is an int64, but the API server reads a CRD's bounds as float64 (2^63 - 1
    # became -2^63): the integers a float carries exactly (2^53 s is 285 million years).
    tolerationSeconds: Count | None = Field(default=None, ge=-(2**53), le=2**53)

    @model_validator(mode="after")
    def _as_kubernetes_would(self) -> Toleration:
        if self.key is None and self.operator != "Exists":
            raise ValueError(str(TOLERATION_RULES[0]["message"]))
        if self.operator == "Exists" and self.value:
            raise ValueError(str(TOLERATION_RULES[1]["message"]))
        if self.tolerationSeconds is not None and self.effect != "NoExecute":
            raise ValueError(str(TOLERATION_RULES[2]["message"]))
        return self


class QueueMode(StrEnum):
    """Where a function's tasks wait: the account's shared stream, a stream of its own, the one
    stream small accounts share (`shared`), or (`auto`) the account's stream — the small
    accounts' one for an account the platform lists as small — until the function's backlog
    would crowd its neighbours, when the platform gives it a stream of its own and takes it
    back once idle (`queue_routes.py`)."""

    auto = "auto"
    account = "account"
    dedicated = "dedicated"
    shared = "shared"


class ServerSpec(KubeModel):
    """A warm, long-lived instance that receives invocations over HTTP and serves many tasks."""

    command: CommandLine = Field(
        min_length=1,
        description="Starts the server; it must listen on $PORT.",
    )
    concurrency: Count = Field(
        default=1, ge=1, le=1000, description="Invocations one instance takes at once."
    )
    maxInstances: Count = Field(default=4, ge=1, le=100)
    invokePath: str = Field(
        default="/invoke", max_length=grammar.HTTP_PATH_MAX, pattern=grammar.HTTP_PATH_PATTERN
    )
    readinessPath: str = Field(
        default="/healthz", max_length=grammar.HTTP_PATH_MAX, pattern=grammar.HTTP_PATH_PATTERN
    )
    startupTimeoutSeconds: Number = Field(default=30, gt=0, le=600)
    idleSeconds: Number = Field(
        default=300, gt=0, description="An instance idle this long is stopped."
    )


EXACTLY_ONE_RUNTIME: dict[str, JsonValue] = {
    "rule": "has(self.command) != has(self.server)",
    "message": "exactly one of spec.command or spec.server must be set",
}


def _only(present: str, absent: str, kind: str) -> dict[str, JsonValue]:
    return {
        "required": [present],
        "properties": {present: {"type": kind}, absent: {"type": "null"}},
    }


PARTITION_RULES: list[dict[str, JsonValue]] = [
    {
        "rule": "self.partitions <= 1 || self.queueMode != 'account'",
        "message": "a partitioned function has queues of its own: queueMode must be auto or "
        "dedicated",
    },
    {
        "rule": "self.partitions <= self.maxConcurrency",
        "message": "partitions may not exceed maxConcurrency (each partition runs at least one "
        "task at a time)",
    },
]


class TaskFunctionSpec(KubeModel):
    # The rule twice: CEL for the API server, `anyOf` for the OpenAPI document (crdgen drops it).
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [EXACTLY_ONE_RUNTIME, *PARTITION_RULES],
            "anyOf": [_only("command", "server", "array"), _only("server", "command", "object")],
        },
    )

    command: CommandLine | None = Field(
        default=None,
        min_length=1,
        description="Run one process per task: payload (JSON) on stdin, result on stdout, "
        "exit code 0 = success. For long batch work.",
    )
    server: ServerSpec | None = Field(
        default=None, description="Warm server mode, for short tasks."
    )
    env: list[EnvVar] = Field(default_factory=list)
    workingDir: ProcessPath | None = None
    image: str | None = Field(
        default=None,
        max_length=512,
        pattern=grammar.IMAGE_PATTERN,
        description="On Kubernetes, the image the function's container runs (default: kubetask's "
        "own); `command` runs in it unchanged. The local executor ignores it.",
    )
    imagePullPolicy: Literal["Always", "IfNotPresent", "Never"] | None = None
    resources: Resources | None = None
    envFrom: list[EnvFromSource] = Field(default_factory=list, max_length=32)
    serviceAccountName: ObjectName | None = Field(
        default=None,
        description="On Kubernetes, the function's pods run as this service account of its "
        "namespace, with its token mounted; without one, no token is mounted.",
    )
    nodeSelector: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=32)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    timeoutSeconds: Number = Field(
        default=300,
        ge=MIN_TIMEOUT_SECONDS,
        le=MAX_TIMEOUT_SECONDS,
        description="Per-attempt limit, from 1 ms up to 24 h.",
    )
    maxConcurrency: Count = Field(default=10, ge=1, le=10000, description="Across all dispatchers.")
    maxStartsPerSecond: Number | None = Field(
        default=None,
        gt=0,
        le=1_000_000,
        description="At most this many of its tasks started a second (in bursts of up to a "
        "second's worth), for a function calling something with a rate limit of its own; the "
        "others wait Queued. Split evenly over the dispatchers consuming it.",
    )
    queueMode: QueueMode = QueueMode.auto
    partitions: Count = Field(
        default=1,
        ge=1,
        le=64,
        description="Split the function's queue into this many streams, each consumed by one "
        "dispatcher at a time (leased), for a function too hot for one stream or one "
        "dispatcher; each partition runs up to maxConcurrency / partitions tasks at once.",
    )

    @model_validator(mode="after")
    def _exactly_one_runtime(self) -> TaskFunctionSpec:
        if (self.command is None) == (self.server is None):
            raise ValueError(EXACTLY_ONE_RUNTIME["message"])
        # PARTITION_RULES, which the API server checks as CEL, in Python.
        if self.partitions > 1 and self.queueMode is QueueMode.account:
            raise ValueError(str(PARTITION_RULES[0]["message"]))
        if self.partitions > self.maxConcurrency:
            raise ValueError(str(PARTITION_RULES[1]["message"]))
        return self


class Condition(KubeModel):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    lastTransitionTime: Timestamp | None = None


class QueueAssignment(KubeModel):
    """Where the platform put an `auto` function's tasks, and why."""

    mode: QueueMode = Field(
        description="`dedicated`: a stream of its own; `shared`: the stream small accounts share."
    )
    reason: str = Field(description="What made the platform move it, for a person.")
    since: Timestamp


class TaskFunctionStatus(KubeModel):
    observedGeneration: Count | None = None
    conditions: list[Condition] = Field(default_factory=list)
    queue: str | None = Field(default=None, description="The JetStream stream holding its tasks.")
    queueAssignment: QueueAssignment | None = Field(
        default=None,
        description="Set while the platform has moved an `auto` function to a queue of its own.",
    )
    backlog: Count | None = None
    ready: Flag | None = None


class KubeObject(KubeModel):
    metadata: ObjectMeta

    @property
    def account(self) -> str:
        return self.metadata.namespace or "default"


class TaskFunction(KubeObject):
    apiVersion: Literal["kubetask.io/v1alpha1"] = GROUP_VERSION
    kind: Literal["TaskFunction"] = "TaskFunction"
    spec: TaskFunctionSpec
    status: TaskFunctionStatus | None = None

    @property
    def name(self) -> str:
        return self.metadata.name


class DestinationKind(StrEnum):
    function = "function"
    subject = "subject"
    webhook = "webhook"


SUBJECT_DESTINATION = re.compile(grammar.SUBJECT_DESTINATION_PATTERN)


DESTINATION_RULES: list[JsonValue] = [
    {
        "rule": f"self.kind != 'function' || self.target.matches('{grammar.NAME_PATTERN}')",
        "message": "a function destination is a function name of the same account",
    },
    {
        "rule": f"self.kind != 'subject' || self.target.matches('{SUBJECT_DESTINATION.pattern}')",
        "message": "a subject destination is a literal subject in 'out.<account>.'",
    },
    {
        # A raw CEL string: the pattern's backslashes are the regular expression's.
        "rule": f"self.kind != 'webhook' || self.target.matches(r'{grammar.WEBHOOK_PATTERN}')",
        "message": f"a webhook destination is {grammar.WEBHOOK_RULE}",
    },
]


class Destination(KubeModel):
    """Where a finished task's record goes: another function, a NATS subject, or a webhook URL."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": DESTINATION_RULES,
            "anyOf": [
                {"properties": {"kind": {"const": kind}, "target": {"pattern": pattern}}}
                for kind, pattern in (
                    ("function", grammar.NAME_PATTERN),
                    ("subject", SUBJECT_DESTINATION.pattern),
                    ("webhook", grammar.WEBHOOK_PATTERN),
                )
            ],
        },
    )

    kind: DestinationKind
    target: str = Field(
        min_length=1,
        max_length=2048,
        description="function: a function name in the same account; subject: a NATS subject; "
        "webhook: an http(s) URL.",
    )

    @model_validator(mode="after")
    def _target_fits_kind(self) -> Destination:
        if self.kind is DestinationKind.function and not grammar.is_name(self.target):
            raise ValueError(f"function destination {self.target!r} is not a valid function name")
        if self.kind is DestinationKind.webhook:
            problem = grammar.webhook_problem(self.target)
            if problem is not None:
                raise ValueError(problem)
        if self.kind is DestinationKind.subject and not SUBJECT_DESTINATION.fullmatch(self.target):
            raise ValueError(
                f"subject destination {self.target!r} must be a literal subject in an account's "
                f"namespace, '{grammar.DESTINATION_ROOT}.<account>.<token>[.<token>...]'"
            )
        return self


class DestinationConfig(KubeModel):
    onSuccess: Destination | None = None
    onFailure: Destination | None = None


class RetryBackoff(KubeModel):
    initialSeconds: Number = Field(default=1.0, ge=0, le=3600)
    multiplier: Number = Field(default=2.0, ge=1, le=10)
    maxSeconds: Number = Field(default=300, ge=0, le=86400)

    def delay(self, failed_attempts: int) -> float:
        """Delay before the retry that follows the given number of failed attempts (1-based)."""
        raw = self.initialSeconds * self.multiplier ** max(0, failed_attempts - 1)
        return float(min(raw, self.maxSeconds))


class AsyncConfigSpec(KubeModel):
    function: Name = Field(description="The function (same account) this configuration applies to.")
    destinationConfig: DestinationConfig = Field(default_factory=DestinationConfig)
    maxAsyncEventAgeInSeconds: Count = Field(
        default=86400,
        ge=1,
        le=7 * 86400,
        description="A task that waited longer than this before being dequeued is dropped unrun.",
    )
    maxAsyncRetryAttempts: Count = Field(
        default=3, ge=0, le=100, description="Retries after the first failed attempt; 0 = never."
    )
    retryBackoff: RetryBackoff = Field(default_factory=RetryBackoff)


class AsyncConfigStatus(KubeModel):
    observedGeneration: Count | None = None
    conditions: list[Condition] = Field(default_factory=list)
    ready: Flag | None = None


class AsyncConfig(KubeObject):
    apiVersion: Literal["kubetask.io/v1alpha1"] = GROUP_VERSION
    kind: Literal["AsyncConfig"] = "AsyncConfig"
    spec: AsyncConfigSpec
    status: AsyncConfigStatus | None = None


DEFAULT_ASYNC_CONFIG = AsyncConfigSpec(function="default")


class TaskPhase(StrEnum):
    Pending = "Pending"
    Queued = "Queued"
    Running = "Running"
    Retrying = "Retrying"
    Paused = "Paused"
    Stopping = "Stopping"
    Succeeded = "Succeeded"
    Failed = "Failed"
    Expired = "Expired"
    Stopped = "Stopped"


class StageTimestamps(KubeModel):
    submitted: Timestamp | None = None
    enqueued: Timestamp | None = None
    dispatched: Timestamp | None = None
    started: Timestamp | None = None
    finished: Timestamp | None = None


class ExecutorRef(KubeModel):
    backend: str = Field(description="local or kubernetes")
    dispatcher: str = Field(description="Id of the dispatcher that runs the attempt.")
    host: str = ""
    instance: str | None = Field(default=None, description="Warm instance or pod name.")
    pod: str | None = Field(
        default=None, description="On Kubernetes, the pod the attempt runs in (`kubetask login`)."
    )
    namespace: str | None = Field(default=None, description="That pod's namespace.")
    container: str | None = Field(default=None, description="The container running the attempt.")
    node: str | None = Field(default=None, description="The node that pod runs on.")


class Waiting(KubeModel):
    """Why a task that waits is waiting — worked out when it is read, never stored."""

    queue: str = Field(description="The JetStream stream it waits in.")
    partition: Count | None = Field(
        default=None, description="Which of its function's partitions, when it has several."
    )
    position: Count | None = Field(
        default=None,
        description="About how many of its function's tasks are ahead of it in its queue (its "
        "partition, for a partitioned function), plus one.",
    )
    reason: str


class TaskStatus(KubeModel):
    phase: TaskPhase = TaskPhase.Pending
    attempts: Count = 0
    timestamps: StageTimestamps = Field(default_factory=StageTimestamps)
    result: Any | None = None
    error: str | None = None
    exitCode: Count | None = None
    stdoutTail: str | None = Field(
        default=None, description="The last 2 KiB a failed attempt wrote to stdout."
    )
    stderrTail: str | None = Field(
        default=None, description="The last 2 KiB a failed attempt wrote to stderr."
    )
    duration: str | None = Field(default=None, description="Of the last attempt, for display.")
    nextAttemptAt: Timestamp | None = None
    executor: ExecutorRef | None = None
    observedGeneration: Count | None = None
    conditions: list[Condition] = Field(default_factory=list)
    waiting: Waiting | None = Field(
        default=None, description="For a waiting task read from the API: where and why."
    )


class TaskSpec(KubeModel):
    function: Name
    payload: Any | None = Field(default=None, description="Any JSON value, given to the function.")


class Task(KubeObject):
    apiVersion: Literal["kubetask.io/v1alpha1"] = GROUP_VERSION
    kind: Literal["Task"] = "Task"
    metadata: TaskMeta
    spec: TaskSpec
    status: TaskStatus = Field(default_factory=TaskStatus)

    @property
    def id(self) -> str:
        return self.metadata.name


class TaskEvent(KubeModel):
    """One change of a task's record, as the audit trail keeps it (`GET /v1/tasks/{id}/events`)."""

    time: Timestamp = Field(description="When the change was stored.")
    phase: TaskPhase | None = Field(default=None, description="None: the record was deleted.")
    attempts: Count = 0
    executor: ExecutorRef | None = None
    error: str | None = Field(default=None, description="First line of the error, if any.")


class TaskSubmission(KubeModel):
    """Body of `POST /v1/tasks`."""

    function: Name
    id: TaskId | None = Field(
        default=None,
        description="Client-chosen id (e.g. a trace id); a second submission with it returns 409.",
    )
    payload: Any | None = None


class TaskList(KubeModel):
    items: list[Task]
    cursor: str | None = Field(default=None, description="Pass as ?cursor= to get the next page.")


# The record delivered to destinations; field names follow DESIGN.md §4 (Lambda's record).
class RequestContext(KubeModel):
    requestId: str
    functionArn: str
    condition: Literal["Success", "RetriesExhausted", "EventAgeExceeded", "Stopped"]
    approximateInvokeCount: Count


class ResponseContext(KubeModel):
    statusCode: Count
    functionError: str | None = None


class DestinationRecord(KubeModel):
    version: Literal["1.0"] = "1.0"
    timestamp: Timestamp
    requestContext: RequestContext
    requestPayload: Any | None = None
    responseContext: ResponseContext
    responsePayload: Any | None = None


class QueueLoad(KubeModel):
    queue: str = Field(description="The JetStream stream.")
    waiting: int = Field(description="Tasks waiting in it, as last read.")
    drainPerSecond: float = Field(description="Tasks leaving it per second, recently.")


class AccountLimits(KubeModel):
    """`GET /v1/limits`: an account's back-pressure limits and how close it is to them."""

    account: str
    maxBacklog: int = Field(
        description="Tasks that may wait in one queue (the account's own limit if it has one, "
        "else the platform's); 0 = no limit."
    )
    throttleFrom: int = Field(
        description="From this backlog, the functions sending most are refused (429) with "
        "rising probability; at maxBacklog, every submission to the queue is."
    )
    maxRate: float = Field(
        description="Submissions per second (the account's own limit if it has one, else the "
        "platform's); 0 = no limit."
    )
    maxConcurrency: int = Field(
        description="Attempts its functions may run at once, all together (its own limit if it "
        "has one, else the platform's), split evenly over the live dispatchers, rounded down "
        "and at least one each; past it tasks wait, Queued. 0 = no limit."
    )
    running: int = Field(
        description="Its tasks Running now, as the gateway's task index has them (what its "
        "concurrency limit counts, give or take the index's lag)."
    )
    maxChanges: float = Field(
        description="Changes (PUT, DELETE) of its functions and AsyncConfigs per second, past "
        "a burst of changesBurst (429 beyond); 0 = no limit. Admins are not counted."
    )
    changesBurst: int = Field(description="Changes it may make at once.")
    weight: float = Field(
        description="The account's weight in fair sharing: while accounts compete for a "
        "dispatcher or a gateway, each gets a share of it in proportion to its weight."
    )
    fairness: bool = Field(description="Whether fair sharing across accounts is on.")
    retentionSeconds: float = Field(
        description="How long the account's task records, audit trail and logs are kept after"
        " a task's last change."
    )
    functions: int = Field(description="Functions the account has registered.")
    maxFunctions: int = Field(description="Functions it may register.")
    ownQueues: int = Field(
        description="Streams of its functions' own (dedicated queues and partitions)."
    )
    maxOwnQueues: int = Field(description="Streams of their own its functions may hold.")
    logStreams: int = Field(
        description="Log reads it has open on the gateway that answered, where the limit is "
        "kept (each gateway keeps its own)."
    )
    maxLogStreams: int = Field(
        description="Log reads (`logs -f`) it may keep open at once on one gateway."
    )
    records: int = Field(description="Task records it keeps (until deleted or expired).")
    recordBytes: int = Field(description="Bytes they take as stored, payloads and results in.")
    maxRecordBytes: int = Field(
        description="Bytes its records may take; past them submissions are refused (429)."
    )
    maxLogBytes: int = Field(
        description="Bytes of log lines it may keep, as written; past them its oldest go first."
    )
    maxEventsBytes: int = Field(
        description="Bytes of audit trail (record revisions) it may keep, as written; past "
        "them its oldest revisions go first."
    )
    registeredBytes: int = Field(description="Bytes its functions and AsyncConfigs take stored.")
    maxRegisteredBytes: int = Field(description="Bytes they may take.")
    queues: list[QueueLoad]


class ErrorBody(KubeModel):
    """The one body of every 4xx and 5xx answer."""

    error: str = Field(description="What went wrong, for a person.")
    field: str | None = Field(default=None, description="The input at fault, when one is.")
    phase: TaskPhase | None = Field(
        default=None, description="409 on a task action: the phase that forbids it."
    )
    task: Task | None = Field(default=None, description="409 on submit: the existing task.")
    retryAfter: Count | None = Field(
        default=None,
        description="429, 503 and 507: seconds to wait before retrying (as the header).",
    )
