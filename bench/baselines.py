"""Celery and Dramatiq no-op tasks with results stored in Redis — the baselines the throughput
benchmark measures in the same run. Imported by their worker processes and by the client."""

from __future__ import annotations

import os

import dramatiq
from celery import Celery
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

celery_app = Celery("bench", broker=REDIS_URL, backend=REDIS_URL)
celery_app.conf.update(
    worker_prefetch_multiplier=16, task_ignore_result=False, worker_hijack_root_logger=False
)


@celery_app.task(name="noop")
def celery_noop(x: int) -> dict[str, bool]:
    return {"ok": True}


dramatiq_broker = RedisBroker(url=REDIS_URL)
dramatiq_backend = RedisBackend(url=REDIS_URL)
dramatiq_broker.add_middleware(Results(backend=dramatiq_backend))
dramatiq.set_broker(dramatiq_broker)


@dramatiq.actor(store_results=True, max_retries=0)
def dramatiq_noop(x: int) -> dict[str, bool]:
    return {"ok": True}
