"""Baselines: a plain arq Worker with perq's default worker settings, running a no-op or a chained task.

`python -m bench.arq_noop [CONCURRENCY]` with PERQ_REDIS_URL and PERQ_QUEUE set drains the queue (burst)
and exits. Settings are perq's defaults where perq sets one (max_jobs, poll_delay, keep_result=0, the JSON
serializer), so a ratio measures what perq does per job, not a tuning difference.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from arq.connections import RedisSettings
from arq.worker import Worker, func

from shared.config import Settings
from shared.queue import deserialize, serialize

TASK = "bench.noop"
CHAIN = "bench.chain"


async def noop(ctx: dict[str, Any], payload: Any) -> None:
    return None


def chain_job_id(chain: int, step: int) -> str:
    return f"chain:{chain}:{step}"


async def chain(ctx: dict[str, Any], payload: dict[str, Any]) -> None:
    """One step of a chain: wait like a model answer, then enqueue the next step (as perq hands on)."""
    redis = ctx["redis"]
    step, steps = payload["step"], payload["steps"]
    if step == 1:
        await redis.set("bench:chain:start", repr(time.time()), nx=True)
    await asyncio.sleep(payload["delayMs"] / 1000)
    if step < steps:
        following = {**payload, "step": step + 1}
        await redis.enqueue_job(CHAIN, following, _job_id=chain_job_id(payload["chain"], step + 1))
    else:
        await redis.set("bench:chain:end", repr(time.time()))


def main() -> None:
    settings = Settings()
    worker = Worker(
        functions=[func(noop, name=TASK), func(chain, name=CHAIN)],
        queue_name=settings.redis.queue,
        redis_settings=RedisSettings.from_dsn(settings.redis.url),
        job_serializer=serialize,
        job_deserializer=deserialize,
        keep_result=0,
        poll_delay=settings.worker.poll_delay,
        max_jobs=int(sys.argv[1]) if len(sys.argv) > 1 else settings.worker.concurrency,
        burst=True,
    )
    worker.run()


if __name__ == "__main__":
    main()
