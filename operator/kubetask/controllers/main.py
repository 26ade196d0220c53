"""`kubetask operator`: connect to NATS, own the Deployments, run the kopf handlers."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from .. import metrics
from ..cancellation import cancel_and_wait
from ..gateway.change_rate import ChangeRate
from ..gateway.record_quota import LAG, RecordQuota
from ..gateway.store_room import StoreRoom
from ..gateway.throttle import Throttle
from ..plane import DataPlane
from ..record_reports import NEAR, REPORT_EVERY, Heard
from ..settings import Settings
from . import asyncconfigs, network_policies, taskfunctions, tasks, warm_pools  # noqa: F401  (registers the handlers)
from .context import OperatorConfig
from .deployments import ensure_deployments, scale_forever


@kopf.on.startup()
async def startup(memo: Any, settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.posting.level = logging.INFO
    settings.persistence.finalizer = "kubetask.io/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetask.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kubetask.io")
    cfg = OperatorConfig()
    plane_settings = Settings()
    memo.plane = await DataPlane.connect(plane_settings, "kubetask-operator")
    # kubectl-applied Tasks wait on the account's back-pressure as HTTP submissions do.
    memo.throttle = Throttle(plane_settings, memo.plane.depth)
    # kubectl-applied TaskFunctions and AsyncConfigs change as often as PUTs may.
    memo.changes = ChangeRate(
        plane_settings.account_max_changes, plane_settings.account_changes_burst
    )
    # And to the record quota, with the counts the gateways say, a report later than theirs.
    heard = Heard()
    memo.hearing = asyncio.create_task(heard.run(memo.plane.nc))
    limit = plane_settings.account_max_record_bytes
    memo.records = RecordQuota(
        limit, heard, lag=LAG + REPORT_EVERY, unlisted_bytes=int(limit * NEAR)
    )
    # And to the room kept in JetStream's storage for the tasks accepted.
    memo.store_room = StoreRoom(memo.plane)
    await memo.store_room.read()
    memo.store_reading = asyncio.create_task(memo.store_room.run())
    memo.config = cfg
    await ensure_deployments(cfg, plane_settings.nats_url)
    memo.scaler = asyncio.create_task(scale_forever(cfg, memo.plane))
    memo.warm = memo.policies = None
    if cfg.executor == "kubernetes":  # functions run in pods of their accounts' namespaces
        memo.warm = asyncio.create_task(warm_pools.keep_forever(cfg, memo.plane))
        memo.policies = asyncio.create_task(
            network_policies.keep_forever(memo.plane, cfg.namespace)
        )


@kopf.on.cleanup()
async def cleanup(memo: Any, **_: Any) -> None:
    await cancel_and_wait(memo.scaler, memo.warm, memo.policies, memo.hearing, memo.store_reading)
    await memo.plane.close()


def run(
    namespaces: list[str],
    all_namespaces: bool,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
) -> None:
    """With `metrics_port`, /metrics as a dispatcher serves it: every series with the metrics
    token, the platform's alone without (its pods are reachable from tenants' pods)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if metrics_port:
        metrics.serve(metrics_port, metrics_host, Settings().metrics_token)
    asyncio.run(
        kopf.operator(
            standalone=True,
            clusterwide=all_namespaces or not namespaces,
            namespaces=namespaces,
        )
    )
