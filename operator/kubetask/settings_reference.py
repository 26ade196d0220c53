"""The settings reference: every KUBETASK_* variable a component reads, what it does, its
default and the values it takes (`kubetask settings`; docs/settings.md is its `--markdown`).

What each setting means is written here once. Its default and range are not: the readers note
them as they read (`known_settings.py`), and a test holds this table and the readers to the
same names, so a setting can be neither added without a word here nor left here once gone.
"""

from __future__ import annotations

import os

from .known_settings import KNOWN, Known

# (title, [(variable, what it does)]), in the order a reader meets them.
SECTIONS: list[tuple[str, list[tuple[str, str]]]] = [
    (
        "Connections and credentials",
        [
            ("KUBETASK_NATS_URL", "The NATS server every component connects to."),
            ("KUBETASK_NATS_USER", "This component's NATS user (`nats_auth.PERMISSIONS`)."),
            ("KUBETASK_NATS_PASSWORD", "That user's password."),
            (
                "KUBETASK_DESTINATIONS_NATS_USER",
                "The user a dispatcher publishes subject destinations as: it may publish only "
                "in the accounts' `out.` namespaces.",
            ),
            ("KUBETASK_DESTINATIONS_NATS_PASSWORD", "That user's password."),
            (
                "KUBETASK_METRICS_TOKEN",
                "Reads every series of every component's `/metrics`; without it, the gateway "
                "shows an account its own series and everyone the platform's.",
            ),
            (
                "KUBETASK_STREAM_REPLICAS",
                "Copies JetStream keeps of every stream and bucket: 3 on a three-server NATS "
                "cluster, so that losing one server loses no task.",
            ),
        ],
    ),
    (
        "Requests (gateway)",
        [
            (
                "KUBETASK_MAX_PAYLOAD",
                "Bytes a task's payload may take (`413` past it); a request body may take "
                "64 KiB more.",
            ),
            ("KUBETASK_MAX_RESULT", "Bytes a task's result may take; past it the attempt fails."),
            (
                "KUBETASK_MAX_HEADER_BYTES",
                "Bytes a request's line and headers may take (`431` past it).",
            ),
            (
                "KUBETASK_REQUEST_TIMEOUT",
                "Seconds a request may take to arrive whole, from its first byte (`408`).",
            ),
            (
                "KUBETASK_MAX_CONNECTIONS",
                "Connections a gateway holds at once (default 10,000, or half the open-file "
                "limit where that is lower); past them the credential holding the most gives "
                "up an idle one, and with none idle a new one is a `503`.",
            ),
            (
                "KUBETASK_PAGE_MAX_BYTES",
                "A page of a list ends before the record that would take it past this many "
                "bytes (one record at least).",
            ),
            (
                "KUBETASK_INDEX_PATH",
                "The gateway's SQLite task index, kept across restarts so that a restart reads "
                "only what changed; empty, it is kept in memory and rebuilt at each start.",
            ),
            (
                "KUBETASK_SWEEP_GRACE",
                "Seconds after which an accepted task whose publish was lost (a crash between "
                "record and queue) is published again.",
            ),
            (
                "KUBETASK_DEDUP_WINDOW",
                "Seconds of JetStream's publish de-duplication; a task id is unique however "
                "old, this only makes a republish after a crash harmless.",
            ),
        ],
    ),
    (
        "Back-pressure and quotas, per account",
        [
            (
                "KUBETASK_ACCOUNT_MAX_BACKLOG",
                "Tasks an account may keep waiting in a queue; past it, `429` with "
                "`Retry-After` from the queue's drain rate. 0: no limit.",
            ),
            (
                "KUBETASK_ACCOUNT_MAX_RATE",
                "Tasks an account may submit a second (`429` past it). 0: no limit.",
            ),
            (
                "KUBETASK_ACCOUNT_MAX_CHANGES",
                "Changes (PUT, DELETE) an account may make to its functions and AsyncConfigs a "
                "second, at each gateway (`429` past it; admins are not counted) and at the "
                "operator (kubectl changes past it are applied in turn). 0: no limit.",
            ),
            (
                "KUBETASK_ACCOUNT_CHANGES_BURST",
                "How many of those changes an account may make at once.",
            ),
            (
                "KUBETASK_ACCOUNT_BACKLOG_LIMITS",
                "Accounts with a backlog limit of their own (a batch account); 0 lifts it.",
            ),
            (
                "KUBETASK_ACCOUNT_RATE_LIMITS",
                "Accounts with a rate limit of their own (a paid tier); 0 lifts it.",
            ),
            (
                "KUBETASK_ACCOUNT_MAX_CONCURRENCY",
                "Attempts an account's functions may run at once, all together, split over "
                "the live dispatchers so that the parts add up to it (below their number, some "
                "get none); past it its tasks wait, Queued, saying why. 0: no limit.",
            ),
            (
                "KUBETASK_ACCOUNT_CONCURRENCY_LIMITS",
                "Accounts with a concurrency limit of their own (`gold=5000,free=10`); 0 lifts it.",
            ),
            (
                "KUBETASK_QUEUE_MAX_MSGS",
                "Tasks one queue (stream) holds; a full queue refuses new tasks with `429` "
                "rather than drop old ones.",
            ),
            (
                "KUBETASK_ACCOUNT_MAX_FUNCTIONS",
                "Functions an account may register (`409` past it).",
            ),
            (
                "KUBETASK_ACCOUNT_MAX_OWN_QUEUES",
                "Streams of an account's functions' own (dedicated queues and partitions) it "
                "may hold (`409` past it; no more of its functions are moved to one).",
            ),
            (
                "KUBETASK_ACCOUNT_MAX_REGISTERED_BYTES",
                "Bytes an account's functions and AsyncConfigs may take as stored (`409`).",
            ),
            (
                "KUBETASK_ACCOUNT_MAX_RECORD_BYTES",
                "Bytes of task records an account may keep, payloads and results in; past "
                "them its submissions get `429` until tasks are deleted or expire.",
            ),
            (
                "KUBETASK_ACCOUNT_MAX_LOG_STREAMS",
                "Log reads an account may have open at once on one gateway (`429`).",
            ),
            (
                "KUBETASK_QUEUE_MAX_FUNCTIONS",
                "Functions that may share one queue (its consumers); registering one more "
                "there is a `409`.",
            ),
        ],
    ),
    (
        "Fairness across accounts",
        [
            (
                "KUBETASK_FAIRNESS",
                "While several accounts have work, each gets a share of every dispatcher and "
                "gateway in proportion to its weight; off: first come, first served.",
            ),
            ("KUBETASK_ACCOUNT_WEIGHTS", "Accounts weighing other than 1 (`gold=4,silver=2`)."),
            (
                "KUBETASK_DISPATCH_FAIR_SLOTS",
                "Attempts in flight a dispatcher shares among the accounts active at once "
                "(at least four per unit of weight).",
            ),
            (
                "KUBETASK_DISPATCH_LEND_AFTER",
                "Seconds an attempt counts against its account's share; after that its place "
                "is lent back, so long jobs are not held to the share, while a few slots and "
                "processes of the node stay kept for every other active account.",
            ),
            (
                "KUBETASK_GATEWAY_FAIR_SLOTS",
                "Requests a gateway works on at once, shared the same way; the rest of an "
                "account's wait their turn in arrival order.",
            ),
        ],
    ),
    (
        "Queues",
        [
            (
                "KUBETASK_DEDICATE_BACKLOG",
                "A function left at `queueMode: auto` with this many tasks waiting is moved "
                "to a queue of its own.",
            ),
            (
                "KUBETASK_RECYCLE_AFTER",
                "Seconds idle after which a function moved to a queue of its own goes back.",
            ),
            (
                "KUBETASK_ROUTE_PERIOD",
                "Seconds between two looks at the queues' backlogs for moves.",
            ),
            (
                "KUBETASK_SMALL_ACCOUNTS",
                "Accounts whose `auto` functions start in the stream small accounts share "
                "(`KT_QM`) instead of one of their own.",
            ),
            (
                "KUBETASK_LEASE_TTL",
                "Seconds after which a partition whose dispatcher stopped renewing its lease "
                "is taken over by another.",
            ),
            (
                "KUBETASK_PULL_IDLE_EXPIRES",
                "A function's empty pull request is followed by a longer one, up to this many "
                "seconds; once one this long ends empty, the function holds no request and "
                "watches its queue subject instead.",
            ),
            (
                "KUBETASK_CONSUMER_IDLE",
                "Seconds after which nats-server removes an idle function's consumer (its "
                "next task re-creates it); 0 keeps consumers.",
            ),
        ],
    ),
    (
        "Dispatch",
        [
            (
                "KUBETASK_ACK_WAIT",
                "Seconds a claimed task may go without its dispatcher's heartbeat before "
                "another dispatcher takes it: how long a crash holds a running task.",
            ),
            (
                "KUBETASK_NODE_SLOTS",
                "Attempts a dispatcher runs at once, all functions together (default 128 per "
                "core).",
            ),
            (
                "KUBETASK_NODE_PROCESSES",
                "Command processes a dispatcher runs at once (default 32 per core, at most one "
                "per 64 MB of available memory).",
            ),
            (
                "KUBETASK_NODE_INSTANCES",
                "Warm instances a dispatcher keeps (default 8 per core, at most one per 128 MB "
                "available); the longest idle is stopped for a new one.",
            ),
            (
                "KUBETASK_AIMD_START",
                "A warm function's dispatch window (tasks in flight per dispatcher) at first "
                "and after an idle spell.",
            ),
            (
                "KUBETASK_AIMD_INCREASE",
                "What the window grows by: per completed task below its threshold, per "
                "window's worth above it, while the window is full and nobody pushed back.",
            ),
            (
                "KUBETASK_AIMD_DECREASE",
                "What the window is multiplied by when executors push back (429 or 503).",
            ),
            (
                "KUBETASK_AIMD_PERIOD",
                "Seconds of the window in which busy answers are counted.",
            ),
            (
                "KUBETASK_AIMD_BUSY_RATE",
                "The share of busy answers in a period that, with the count below, shrinks "
                "the window; fewer only stop it growing.",
            ),
            (
                "KUBETASK_AIMD_BUSY_COUNT",
                "The busy answers in a period that, with the share above, shrink the window: "
                "one isolated error never does.",
            ),
            (
                "KUBETASK_AIMD_IDLE_PERIODS",
                "Periods without work after which the window halves toward its start.",
            ),
            (
                "KUBETASK_WEBHOOK_DENIED_NETWORKS",
                "Networks no webhook destination may reach (by default the clouds' metadata "
                "and link-local addresses).",
            ),
        ],
    ),
    (
        "Functions on one host",
        [
            (
                "KUBETASK_EXECUTOR",
                "What runs `command` functions: `local` processes beside the dispatcher, or "
                "`kubernetes`, a pod per attempt.",
            ),
            (
                "KUBETASK_FUNCTION_USERS",
                "`accounts` (as root): each account's functions run as a user of its own, "
                "away from the platform and each other; `platform`: as the platform's user.",
            ),
            (
                "KUBETASK_ACCOUNT_MAX_PROCESSES",
                "Processes an account's functions hold at once on a host.",
            ),
            (
                "KUBETASK_ACCOUNT_MAX_SOCKETS",
                "Internet sockets an account's functions hold at once on a host (accounts "
                "mode: each may hold a port of the host's ephemeral range); 0: no cap.",
            ),
            (
                "KUBETASK_FUNCTIONS_MAX_SOCKETS",
                "Internet sockets all accounts' functions hold together on a host (accounts "
                "mode); a share is of the host's ephemeral port range "
                "(`net.ipv4.ip_local_port_range`). 0: no cap.",
            ),
            (
                "KUBETASK_FUNCTION_MAX_OPEN_FILES",
                "Descriptors each process of a tenant's function may hold open, soft and hard "
                "(accounts mode); at most the dispatcher's own hard limit.",
            ),
            (
                "KUBETASK_FUNCTIONS_MAX_PROCESSES",
                "Processes all functions hold together on a host (as root, the v1 `pids` "
                "group over the accounts'); a share is of the smaller of `kernel.pid_max` and "
                "`kernel.threads-max`. 0: no cap.",
            ),
            (
                "KUBETASK_ACCOUNT_MAX_CONNECTIONS",
                "Connections an account's functions hold open at once on a host (accounts "
                "mode: the host's connection tracking table, which full drops every new "
                "connection of the host); 0: no cap.",
            ),
            (
                "KUBETASK_FUNCTIONS_MAX_CONNECTIONS",
                "Connections all accounts' functions hold open together on a host (accounts "
                "mode); a share is of the table's size (`net.netfilter.nf_conntrack_max`). "
                "0: no cap.",
            ),
            (
                "KUBETASK_ACCOUNT_MAX_MEMORY",
                "Memory an account's functions hold together on a host, their `/tmp` in; 0: "
                "no limit.",
            ),
            (
                "KUBETASK_ACCOUNT_SCRATCH",
                "Size of each account's own `/tmp` (accounts mode); 0 keeps the host's.",
            ),
            (
                "KUBETASK_ACCOUNT_USER_NAMESPACES",
                "Tenants' functions may make user namespaces (accounts mode; off: a seccomp "
                "filter refuses them, as Docker's default profile does).",
            ),
            (
                "KUBETASK_ACCOUNT_CPU",
                "Each account's function processes in a CPU group of its own, weighted as the "
                "account (as root, with a v1 `cpu` controller).",
            ),
            (
                "KUBETASK_FUNCTION_DENIED_NETWORKS",
                "Networks no tenant's function may connect to (firewall rules; on Kubernetes "
                "the account's NetworkPolicy).",
            ),
            (
                "KUBETASK_PLATFORM_PORTS",
                "Ports of the platform's servers on the host besides NATS's and the "
                "dispatcher's metrics' (`kubetask dev` adds its gateway's): no tenant's "
                "function may listen there, and tenants' functions may connect there.",
            ),
            (
                "KUBETASK_FUNCTION_HOST_PORTS",
                "Ports of the host's own servers (not the platform's) that answer tenants' "
                "functions (accounts mode); the others do not.",
            ),
        ],
    ),
    (
        "Functions on Kubernetes",
        [
            (
                "KUBETASK_IMAGE",
                "The image of the runtime sidecar, and of a function that names none; to the "
                "operator, the image of the gateways and dispatchers it makes (`kubetask:dev` "
                "there by default). The chart sets both to its image.",
            ),
            (
                "KUBETASK_RUNTIME_ADDRESS",
                "Where sidecars call their dispatcher back (default: the dispatcher pod's IP).",
            ),
            ("KUBETASK_RUNTIME_PORT", "The port they call it back on."),
            ("KUBETASK_JOB_TTL_SECONDS", "Seconds a finished attempt's Job is kept."),
            (
                "KUBETASK_POD_START_TIMEOUT",
                "Seconds an attempt's pod may take to start its function, image pull in; past "
                "them the attempt fails.",
            ),
            (
                "KUBETASK_RUNTIME_LOST_AFTER",
                "Seconds without a sidecar's heartbeat after which its attempt is lost (its "
                "node gone).",
            ),
        ],
    ),
    (
        "The operator (set by the Helm chart)",
        [
            ("KUBETASK_NAMESPACE", "The namespace of the platform's own Deployments."),
            ("KUBETASK_RELEASE", "The Helm release the objects it makes belong to."),
            ("KUBETASK_TOKENS_SECRET", "The Secret holding the API tokens."),
            (
                "KUBETASK_NATS_USERS_SECRET",
                "The Secret holding the NATS passwords of the Deployments it makes.",
            ),
            ("KUBETASK_GATEWAY_REPLICAS", "Gateways it runs."),
            (
                "KUBETASK_CONFIG_MAP",
                "The ConfigMap of the chart's platform settings, given to gateways and "
                "dispatchers as their environment; empty outside the chart.",
            ),
            (
                "KUBETASK_CONFIG_CHECKSUM",
                "Its content's checksum, put on the pods it configures so that a change rolls "
                "them.",
            ),
            ("KUBETASK_DISPATCHER_MIN", "Dispatchers it keeps at least."),
            ("KUBETASK_DISPATCHER_MAX", "Dispatchers it runs at most."),
            (
                "KUBETASK_DISPATCHER_TARGET_BACKLOG",
                "Tasks waiting or running per dispatcher it scales toward (and never fewer "
                "dispatchers than partitions with work).",
            ),
            (
                "KUBETASK_DISPATCHER_COOLDOWN",
                "Seconds after the last change before the dispatchers are scaled down (up is "
                "at once).",
            ),
            ("KUBETASK_SCALE_INTERVAL", "Seconds between two looks at the backlog for scaling."),
        ],
    ),
    (
        "History",
        [
            (
                "KUBETASK_RETENTION_SECONDS",
                "Records, audit trail and logs are kept this long after a task's last change.",
            ),
            ("KUBETASK_ACCOUNT_RETENTION", "Accounts that keep their history for less."),
            (
                "KUBETASK_HISTORY_COMPRESSION",
                "Records, audit trail and logs stored S2-compressed.",
            ),
            (
                "KUBETASK_LOG_RATE",
                "Characters a second one attempt may log; past it, and its burst, lines are "
                "dropped and counted in its log.",
            ),
            ("KUBETASK_LOG_BURST", "Characters one attempt may log at once."),
            (
                "KUBETASK_ACCOUNT_LOG_RATE",
                "Characters a second of an account's output (all its tasks) a dispatcher "
                "reads, a line counting 100 besides; past it their writes wait.",
            ),
            ("KUBETASK_ACCOUNT_LOG_BURST", "Characters of it read at once."),
            (
                "KUBETASK_DISPATCHER_LOG_RATE",
                "Characters a second of every account's output together, shared equally by "
                "those printing.",
            ),
            (
                "KUBETASK_LOGS_MAX_BYTES",
                "Disk all logs take together; past it the oldest lines go first. Unset, "
                "`kubetask dev` holds it to a quarter of JetStream's storage on its disk.",
            ),
            (
                "KUBETASK_EVENTS_MAX_BYTES",
                "Disk the audit trail takes; past it the oldest revisions go first. Unset, "
                "`kubetask dev` holds it to an eighth of JetStream's storage on its disk.",
            ),
            (
                "KUBETASK_STORE_MAX_BYTES",
                "Bytes JetStream may store (its `max_file_store`); past 90% of them submissions "
                "are refused with `507`, past 95% no attempt starts, so the tasks accepted keep "
                "room to finish (the history streams counted at their caps). `kubetask "
                "dev` sets it to 30% of its disk (its files and the task index take more again), "
                "the chart to `nats.jetstream.maxFile` with one NATS server; 0: not known, "
                "nothing refused before JetStream itself is full. The gateway's "
                "task index keeps its write-ahead log to an eighth of it (at most 40 MiB).",
            ),
            (
                "KUBETASK_ACCOUNT_MAX_LOG_BYTES",
                "Log lines one account keeps, as written; past them its own oldest go first.",
            ),
            (
                "KUBETASK_ACCOUNT_MAX_EVENTS_BYTES",
                "Audit trail one account keeps, as written; past it its own oldest goes first.",
            ),
        ],
    ),
    (
        "kubetask dev",
        [
            (
                "KUBETASK_DEV_NATS_BATCH",
                "nats-server under the kernel's `SCHED_BATCH` policy, so that its wake-ups do "
                "not preempt the gateway or a dispatcher mid-task.",
            ),
        ],
    ),
]

# Defaults that depend on the machine, in words: the generated reference must not.
IN_WORDS = {
    "KUBETASK_NODE_SLOTS": "128 per core",
    "KUBETASK_NODE_PROCESSES": "32 per core",
    "KUBETASK_NODE_INSTANCES": "8 per core",
    "KUBETASK_MAX_CONNECTIONS": "10000",
    "KUBETASK_ACCOUNT_MAX_CONNECTIONS": "a sixteenth of the host's nf_conntrack_max",
    "KUBETASK_RUNTIME_ADDRESS": "the pod's IP",
}


def read_all() -> dict[str, Known]:
    """Read every setting, as the components do, so that each reader notes its own; raises
    ValueError naming the first that does not parse or is out of range."""
    from . import sched_batch
    from .controllers.context import OperatorConfig
    from .dispatch.aimd import AimdSettings
    from .dispatch.node_budget import BudgetSettings
    from .executors import account_scratch
    from .executors.function_users import FunctionUsers
    from .executors.kubernetes_jobs import JobSettings
    from .queue_routes import RouteSettings
    from .settings import Settings

    OperatorConfig()  # first: where it reads a setting a component reads too, theirs is said
    Settings()
    AimdSettings()
    BudgetSettings()
    RouteSettings()
    FunctionUsers()
    JobSettings()
    account_scratch.size_setting()
    sched_batch.wanted()
    return KNOWN


def _default(name: str, known: Known) -> str:
    return IN_WORDS.get(name) or known.default


def rows(known: dict[str, Known]) -> list[tuple[str, str, str]]:
    """(variable, its value here, its default) for `kubetask settings`: a secret's value is
    only said to be set."""
    out = []
    for _, entries in SECTIONS:
        for name, _ in entries:
            value = os.environ.get(name) or (
                "(from a file)" if os.environ.get(name + "_FILE") else ""
            )
            if value and known[name].secret:
                value = "(set)"
            out.append((name, value or "-", _default(name, known[name]) or "-"))
    return out


def markdown(known: dict[str, Known]) -> str:
    lines = [
        "# Settings",
        "",
        "<!-- Generated by `kubetask settings --markdown` from operator/kubetask/"
        "settings_reference.py; do not edit. -->",
        "",
        "Every component reads its settings from `KUBETASK_*` environment variables, checked "
        "before it starts: one that does not parse, is not finite or is out of its range stops "
        "`kubetask dev`, `kubetask gateway` and `kubetask dispatcher` at once, naming it. "
        "`kubetask settings` shows the value each has in the environment it runs in. Sizes are "
        "in bytes and times in seconds unless a setting says otherwise. `kubetask dev` sets the "
        "NATS URL, users and passwords, the metrics token, `KUBETASK_INDEX_PATH` (in its data "
        "directory) and its own ports in `KUBETASK_PLATFORM_PORTS` for its components itself; "
        "the rest it passes on from its environment.",
    ]
    for title, entries in SECTIONS:
        lines += ["", f"## {title}", "", "| Variable | Default | Takes | What it does |"]
        lines.append("|---|---|---|---|")
        for name, meaning in entries:
            k = known[name]
            default = _default(name, k)
            cells = (f"`{name}`", f"`{default}`" if default else "-", k.takes, meaning)
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
