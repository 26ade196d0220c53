"""The operator's own series, served on `kubetask operator --metrics-port`. Defined here, which
only the operator imports, rather than in `metrics.py`, so that the gateway and the dispatchers
do not export a scaler's gauges at zero.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

HANDLED = Counter(
    "kubetask_operator_handled_total",
    "Runs of the operator's handlers, by kind (TaskFunction, AsyncConfig, Task) and outcome: "
    "done, retried (a temporary error: throttled, its function not registered yet), failed "
    "(retried too, after kopf's back-off).",
    ["kind", "outcome"],
)
BACKLOG = Gauge(
    "kubetask_operator_backlog",
    "Tasks waiting or running in every function's queues, at the operator's last count.",
)
DISPATCHERS_WANTED = Gauge(
    "kubetask_operator_dispatchers_wanted",
    "Dispatcher replicas the operator wants for that backlog (KUBETASK_DISPATCHER_MIN to MAX; "
    "lowered only after KUBETASK_DISPATCHER_COOLDOWN).",
)
