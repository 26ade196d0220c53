"""Prometheus metrics, labelled by account and function. Each process exposes its own; a
Prometheus scrape of the gateway and every dispatcher sums them."""

from __future__ import annotations

import functools
from typing import TypeVar

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

LABELS = ("account", "function")

SUBMITTED = Counter("kubetask_tasks_submitted_total", "Tasks accepted by the gateway.", LABELS)
SUCCEEDED = Counter("kubetask_tasks_succeeded_total", "Tasks that ended Succeeded.", LABELS)
FAILED = Counter("kubetask_tasks_failed_total", "Tasks that ended Failed.", LABELS)
STOPPED = Counter("kubetask_tasks_stopped_total", "Tasks stopped by a user.", LABELS)
RETRIED = Counter(
    "kubetask_tasks_retried_total", "Failed attempts that were scheduled again.", LABELS
)
# Named as in the seeds (Function Compute's metric) so dashboards built for it carry over.
EXPIRED_DROPPED = Counter(
    "AsyncEventExpiredDropped",
    "Tasks dropped unrun because they waited longer than maxAsyncEventAgeInSeconds.",
    LABELS,
)
RUNNING = Gauge("kubetask_tasks_running", "Attempts running in this dispatcher.", LABELS)
BACKLOG = Gauge("kubetask_backlog", "Tasks waiting in the function's queue.", LABELS)
WINDOW = Gauge(
    "kubetask_dispatch_window",
    "Tasks of the function this dispatcher may keep in flight (AIMD, dispatch/aimd.py).",
    LABELS,
)
DEDICATED = Gauge(
    "kubetask_queue_dedicated",
    "1 while the platform has given an `auto` function a queue of its own (queue_routes.py).",
    LABELS,
)
QUEUE_MOVES = Counter(
    "kubetask_queue_assignments_total",
    "Times the platform moved an `auto` function's queue, by where to (dedicated, account).",
    [*LABELS, "to"],
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
BUSY = Counter(
    "kubetask_executor_busy_total",
    "Attempts an executor answered busy (429/503): handed back, no attempt spent.",
    LABELS,
)
SUBMIT_TO_START = Histogram(
    "kubetask_submit_to_start_seconds",
    "From submission to the start of the first attempt.",
    LABELS,
    buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
EXECUTION = Histogram(
    "kubetask_execution_duration_seconds",
    "Duration of one attempt.",
    LABELS,
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 1800, 3600, 86400),
)
DESTINATION_FAILURES = Counter(
    "kubetask_destination_delivery_failures_total",
    "Destination deliveries that were retried.",
    LABELS,
)


M = TypeVar("M", bound=MetricWrapperBase)


@functools.cache
def of(metric: M, account: str, function: str) -> M:
    """`metric.labels(account, function)`, remembered: the dispatcher touches four metrics per
    task, and `labels()` validates and locks each time. Label sets are never removed."""
    return metric.labels(account, function)
