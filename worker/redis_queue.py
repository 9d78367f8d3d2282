"""How a worker's steps talk to Redis: the cancel check, journaled answers, and the hand-over.

The hand-over is one round trip: the step's events go onto the job's stream and every step that follows is
enqueued by a small script that does what arq's `enqueue_job` does (refuse a live duplicate id, write the
job, add it to the queue) without arq's WATCH round trips, and refuses to enqueue for a cancelled job.
arq workers cannot tell these jobs from the ones `enqueue_job` writes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from arq.constants import expires_extra_ms, job_key_prefix, result_key_prefix
from arq.jobs import serialize_job

from shared.events import add_events
from shared.models import now_ms
from shared.queue import STEP_TASK, cancel_key, serialize, step_job_id
from worker.step_queue import HandOver

ANSWER_TTL_S = 24 * 3600

ENQUEUE = """
local cancelled = redis.call('get', KEYS[4])
if cancelled and tonumber(cancelled) >= tonumber(ARGV[5]) then return -1 end
if redis.call('exists', KEYS[1], KEYS[2]) > 0 then return 0 end
redis.call('psetex', KEYS[1], ARGV[3], ARGV[1])
redis.call('zadd', KEYS[3], ARGV[2], ARGV[4])
return 1
"""


class RedisStepQueue:
    def __init__(self, redis: Any, queue_name: str, enqueued: Callable[[list[str]], None]) -> None:
        self.redis = redis
        self.queue_name = queue_name
        self.enqueued = enqueued  # tells this worker's poll loop, which takes the steps at once

    async def is_cancelled(self, job_id: str, epoch: int) -> bool:
        """Whether `perq cancel` came after the submission this run descends from."""
        cancelled = await self.redis.get(cancel_key(job_id))
        return cancelled is not None and int(cancelled) >= epoch

    async def hand_over(self, handed: HandOver) -> bool:
        tasks, epoch = handed.tasks, handed.epoch
        if not (handed.event_lines or tasks or handed.answered):
            return False
        now = now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            if handed.event_lines:
                add_events(pipe, handed.job_id, handed.event_lines, stopped=handed.stopped)
            for task in tasks:
                arq_id = step_job_id(task)
                payload = serialize_job(STEP_TASK, (task.to_dict(),), {}, None, now, serializer=serialize)
                keys = [job_key_prefix + arq_id, result_key_prefix + arq_id, self.queue_name]
                args = [payload, now, expires_extra_ms, arq_id, epoch]
                # EVAL, not a registered script: redis-py would add a SCRIPT EXISTS round trip to every
                # pipeline, and Redis caches the compiled script anyway
                pipe.eval(ENQUEUE, 4, *keys, cancel_key(handed.job_id), *args)
            if handed.answered:
                pipe.delete(*handed.answered)
            replies = await pipe.execute()
        if tasks:
            self.enqueued([step_job_id(t) for t in tasks])
        return -1 in replies

    async def save_answer(self, key: str, data: bytes) -> None:
        await self.redis.set(key, data, ex=ANSWER_TTL_S)

    async def load_answer(self, key: str) -> bytes | None:
        value = await self.redis.get(key)
        return bytes(value) if value is not None else None
