"""Prometheus metrics, labelled by account and function. Each process exposes its own; a
Prometheus scrape of the gateway and every dispatcher sums them. Who may read which series is
`exposition`'s to decide (docs/security.md, "Metrics")."""

from __future__ import annotations

import contextlib
import functools
import hmac
import socket
import sys
import threading
from collections.abc import Iterator
from socketserver import ThreadingMixIn
from typing import Any, Literal, TypeVar, get_args
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric

from .models import QueueMode
from .peer_shares import PeerShares

LABELS = ("account", "function")
M = TypeVar("M", bound=MetricWrapperBase)
# Every metric labelled by account and function alone, marked where it is made: `forget` drops
# a deleted function's series from each, and a list kept apart from the metrics could miss one.
_PER_FUNCTION: list[MetricWrapperBase] = []


def _per_function(metric: M) -> M:
    _PER_FUNCTION.append(metric)
    return metric


SUBMITTED = _per_function(
    Counter("kubetask_tasks_submitted_total", "Tasks accepted by the gateway.", LABELS)
)
SUCCEEDED = _per_function(
    Counter("kubetask_tasks_succeeded_total", "Tasks that ended Succeeded.", LABELS)
)
FAILED = _per_function(Counter("kubetask_tasks_failed_total", "Tasks that ended Failed.", LABELS))
STOPPED = _per_function(Counter("kubetask_tasks_stopped_total", "Tasks stopped by a user.", LABELS))
RETRIED = _per_function(
    Counter("kubetask_tasks_retried_total", "Failed attempts that were scheduled again.", LABELS)
)
# Named as in the seeds (Function Compute's metric) so dashboards built for it carry over.
EXPIRED_DROPPED = _per_function(
    Counter(
        "AsyncEventExpiredDropped",
        "Tasks dropped unrun because they waited longer than maxAsyncEventAgeInSeconds.",
        LABELS,
    )
)
RUNNING = _per_function(
    Gauge("kubetask_tasks_running", "Attempts running in this dispatcher.", LABELS)
)
BACKLOG = _per_function(Gauge("kubetask_backlog", "Tasks waiting in the function's queue.", LABELS))
WINDOW = _per_function(
    Gauge(
        "kubetask_dispatch_window",
        "Tasks of the function this dispatcher may keep in flight (AIMD, dispatch/aimd.py).",
        LABELS,
    )
)
DEDICATED = _per_function(
    Gauge(
        "kubetask_queue_dedicated",
        "1 while the platform has given an `auto` function a queue of its own (queue_routes.py).",
        LABELS,
    )
)
QUEUE_MOVES = Counter(
    "kubetask_queue_assignments_total",
    "Times the platform moved an `auto` function's queue, by where to (dedicated, account).",
    [*LABELS, "to"],
)
ThrottleReason = Literal["rate", "backlog", "records", "queue-full"]
THROTTLED = Counter(
    "kubetask_submissions_throttled_total",
    "Submissions refused with 429, by why: rate (the account's submission rate), backlog (its "
    "queue's backlog, its heaviest senders first), records (its record quota), queue-full.",
    [*LABELS, "reason"],
)
CHANGES_THROTTLED = Counter(
    "kubetask_changes_throttled_total",
    "Changes of an account's functions and AsyncConfigs refused with 429: past its change rate "
    "(KUBETASK_ACCOUNT_MAX_CHANGES, gateway/change_rate.py).",
    ["account"],
)
HISTORY_QUOTA_PURGES = Counter(
    "kubetask_history_quota_purges_total",
    "Times an account's oldest log lines (KT_LOGS) or audit revisions (KT_EVENTS) were purged "
    "to keep it within its quota (gateway/history_quota.py).",
    ["account", "stream"],
)
NODE_RUNNING = Gauge(
    "kubetask_node_running",
    "Attempts this dispatcher runs now, all or processes only (dispatch/node_budget.py).",
    ["kind"],
)
NODE_WAITING = Gauge(
    "kubetask_node_waiting",
    "Tasks delivered to this dispatcher waiting for a slot of its node budget.",
)
LEASES_HELD = Gauge(
    "kubetask_partition_leases_held",
    "Partitions of partitioned functions this dispatcher holds the lease of (dispatch/leases.py).",
)
BUSY = _per_function(
    Counter(
        "kubetask_executor_busy_total",
        "Attempts an executor answered busy (429/503): handed back, no attempt spent.",
        LABELS,
    )
)
SUBMIT_TO_START = _per_function(
    Histogram(
        "kubetask_submit_to_start_seconds",
        "From submission to the start of the first attempt.",
        LABELS,
        buckets=(
            0.001,
            0.002,
            0.005,
            0.01,
            0.025,
            0.05,
            0.1,
            0.25,
            0.5,
            1,
            2.5,
            5,
            10,
            30,
            60,
            300,
        ),
    )
)
EXECUTION = _per_function(
    Histogram(
        "kubetask_execution_duration_seconds",
        "Duration of one attempt.",
        LABELS,
        buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 1800, 3600, 86400),
    )
)
DESTINATION_FAILURES = _per_function(
    Counter(
        "kubetask_destination_delivery_failures_total",
        "Destination deliveries that were retried.",
        LABELS,
    )
)


# Each function's series, by metric: `of` hands them out, `forget` drops them.
_children: dict[tuple[str, str], dict[int, Any]] = {}


def of(metric: M, account: str, function: str) -> M:
    """`metric.labels(account, function)`, remembered: the dispatcher touches four metrics per
    task, and `labels()` validates and locks each time."""
    mine = _children.get((account, function))
    if mine is None:
        mine = _children[(account, function)] = {}
    child = mine.get(id(metric))
    if child is None:
        child = mine[id(metric)] = metric.labels(account, function)
    return child


def forget(account: str, function: str) -> None:
    """Drop a deleted function's series from this process. Kept, they were never freed: an
    account registering and deleting functions under new names grew every gateway's and
    dispatcher's memory, and every scrape, without bound. One removal per metric, not a scan
    of every series (`remove_by_labels` walks them all)."""
    _children.pop((account, function), None)
    for metric in _PER_FUNCTION:
        with contextlib.suppress(KeyError):
            metric.remove(account, function)
    for mode in QueueMode:
        with contextlib.suppress(KeyError):
            QUEUE_MOVES.remove(account, function, mode.value)
    for reason in get_args(ThrottleReason):
        with contextlib.suppress(KeyError):
            THROTTLED.remove(account, function, reason)


class _Seen:
    """The registry as one caller may read it: an admin all of it, an account its own series
    and the platform's (those of no account), anyone else only the platform's. Account and
    function names are a tenant's business: a neighbour must not learn them, or how busy they
    are, from the gateway every tenant can reach."""

    def __init__(self, source: Any, account: str | None) -> None:
        self.source = source
        self.account = account

    def collect(self) -> Iterator[Metric]:
        for family in self.source.collect():
            kept = Metric(family.name, family.documentation, family.type, family.unit)
            kept.samples = [
                s for s in family.samples if s.labels.get("account", self.account) == self.account
            ]
            yield kept


def exposition(account: str | None, admin: bool, names: list[str] | None = None) -> bytes:
    """This process's metrics in Prometheus' text format, as the caller may see them; only the
    series `names` when given (Prometheus' `name[]`: a page of 10,000 functions' series is
    large)."""
    source = REGISTRY.restricted_registry(names) if names else REGISTRY
    return generate_latest(source if admin else _Seen(source, account))


def is_scraper(token: str | None, authorization: str | None) -> bool:
    """Whether `authorization` carries the metrics token (`KUBETASK_METRICS_TOKEN`), which
    reads every series of every component, and nothing else."""
    if not token or not authorization:
        return False
    return hmac.compare_digest(authorization.encode(), f"Bearer {token}".encode())


# A dispatcher's metrics port is reachable by tenants' code, and each connection is a thread
# of the dispatcher's (`peer_shares.py`): one address holds at most this many, and one that
# sends or reads nothing for REQUEST_SECONDS is closed. Prometheus scrapes one at a time.
METRICS_PER_PEER = 8
REQUEST_SECONDS = 10.0


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def server_activate(self) -> None:
        super().server_activate()
        self.shares = PeerShares(METRICS_PER_PEER, "metrics port")
        self.admitted: dict[Any, str] = {}

    def verify_request(self, request: Any, client_address: Any) -> bool:
        peer = str(client_address[0])
        if not self.shares.admit(peer):
            return False
        self.admitted[request] = peer
        return True

    def shutdown_request(self, request: Any) -> None:
        peer = self.admitted.pop(request, None)
        if peer is not None:
            self.shares.release(peer)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away or sent nothing in time is the client's business; the
        default printed a traceback to stderr for each."""
        if not isinstance(sys.exception(), OSError):
            super().handle_error(request, client_address)


class _Quiet(WSGIRequestHandler):
    timeout = REQUEST_SECONDS

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve(port: int, host: str, token: str | None, sock: socket.socket | None = None) -> WSGIServer:
    """A dispatcher's /metrics, in a thread of its own (the event loop never waits on a
    scrape): every series with the metrics token, the platform's only without it. Tenants'
    code can reach this port (a process beside the dispatcher, a pod in the cluster). On
    `sock`, a listening socket `kubetask dev` holds (`held_sockets.py`), if given."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        admin = is_scraper(token, environ.get("HTTP_AUTHORIZATION"))
        names = parse_qs(environ.get("QUERY_STRING", "")).get("name[]")
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
        return [exposition(None, admin, names)]

    server = make_server(host, port, app, _Server, _Quiet) if sock is None else _on(sock, app)
    # The poll interval only bounds how long `shutdown()` waits (a dispatcher never calls it:
    # the thread dies with the process; tests do); the default half second woke an idle
    # dispatcher twice a second for nothing.
    forever = functools.partial(server.serve_forever, poll_interval=5)
    threading.Thread(target=forever, name="metrics", daemon=True).start()
    return server


def _on(sock: socket.socket, app: Any) -> WSGIServer:
    """`make_server` on a socket that is already listening: everything it does but the bind."""
    host, port = sock.getsockname()[:2]
    server = _Server((host, port), _Quiet, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.server_name, server.server_port = str(host), int(port)
    server.setup_environ()
    server.server_activate()
    server.set_app(app)
    return server
