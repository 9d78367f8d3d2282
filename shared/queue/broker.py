"""The queue through arq: the arq keys perq reads, the Redis pool, and enqueueing a step.

This is the one module of the shared room that imports arq (`worker/queue/` is the worker's). The producer
opens its pool and enqueues a run's first step here; the worker's hand-over builds the same payload here
and writes it with its own script. Everything else reads arq's key names from here, so a rename in arq is
one line to change, and the contract test (`tests/test_arq_contract.py`) says so before a release does.
"""

from __future__ import annotations

import logging

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import (
    expires_extra_ms,
    health_check_key_suffix,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
)
from arq.jobs import serialize_job

from shared.queue.contract import STEP_TASK, StepTask, deserialize, serialize, step_job_id
from shared.queue.lean_pool import lean
from shared.redisurl import is_sentinel_url, parse_sentinel_url

__all__ = [
    "ArqRedis",
    "enqueue_step",
    "expires_extra_ms",
    "health_check_key_suffix",
    "in_progress_key_prefix",
    "job_key_prefix",
    "open_pool",
    "redis_settings",
    "result_key_prefix",
    "step_payload",
]


def redis_settings(url: str) -> RedisSettings:
    """arq's RedisSettings for a PERQ_REDIS_URL: arq's own Sentinel support for a Sentinel address."""
    if not is_sentinel_url(url):
        return RedisSettings.from_dsn(url)
    address = parse_sentinel_url(url)
    return RedisSettings(
        host=address.sentinels,  # arq takes the list of sentinels here
        sentinel=True,
        sentinel_master=address.master,
        database=address.database,
        username=address.username,
        password=address.password,
        ssl=address.ssl,
    )


async def open_pool(url: str, queue_name: str, *, connect_timeout_s: int = 2) -> ArqRedis:
    """A pool on the queue's Redis, answered by one PING: it raises at once when Redis is unreachable. Its
    commands cost less than redis-py's own (`lean_pool.py`).

    arq's create_pool would retry five times a second apart, logging each; the producer wants one fast
    answer and the worker retries with its own back-off, so neither lets arq retry.
    """
    settings = redis_settings(url)
    settings.conn_retries = 0
    settings.conn_timeout = connect_timeout_s
    logging.getLogger("arq.connections").setLevel(logging.ERROR)
    pool = await create_pool(
        settings, job_serializer=serialize, job_deserializer=deserialize, default_queue_name=queue_name
    )
    lean(pool.connection_pool)  # commands sent at less cost: see lean_pool.py
    return pool


def step_payload(task: StepTask, enqueue_time_ms: int) -> bytes:
    """The job arq stores for a step, exactly as `enqueue_job` would write it (so arq workers read it)."""
    return serialize_job(STEP_TASK, (task.to_dict(),), {}, None, enqueue_time_ms, serializer=serialize)


async def enqueue_step(redis: ArqRedis, task: StepTask, queue_name: str) -> bool:
    """Enqueue a step under its derived id. False when a job with that id is live (queued or running) or
    its result is kept: arq's `enqueue_job` refuses a duplicate id, which makes enqueueing the same step
    twice a no-op. A cancelled job is not checked here (a cancel stops earlier submissions only)."""
    arq_id = step_job_id(task)
    return (
        await redis.enqueue_job(STEP_TASK, task.to_dict(), _job_id=arq_id, _queue_name=queue_name) is not None
    )
