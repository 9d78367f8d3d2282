"""The worker's Lua scripts against a real Redis, including one that forgot them (restarted, flushed).

The hand-over runs its enqueue script inside a pipeline by SHA only; a Redis that does not know the script
refuses just those calls, which run again once it is loaded, while the rest of the pipeline (the events)
ran once. The jobs it writes are the jobs arq writes, so arq workers read them.
"""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path

from arq.jobs import deserialize_job_raw

from shared.queue import STEP_TASK, StepTask, cancel_key, deserialize, events_channel, step_job_id
from shared.queue.broker import ArqRedis, enqueue_step, in_progress_key_prefix, job_key_prefix
from worker.queue import scripts
from worker.queue.leases import pick_up
from worker.queue.steps import RedisStepQueue
from worker.step_queue import HandOver


async def _ignore(_arq_ids: list[str]) -> None:
    pass


def _task(job: str, step: int = 2) -> StepTask:
    return StepTask(job_id=job, run_id="r1", step_number=step)


async def test_hand_over_to_a_redis_that_forgot_the_script_enqueues_once(redis: ArqRedis) -> None:
    queue, job = f"perq:test:scripts:{time.monotonic_ns()}", f"j{time.monotonic_ns()}"
    woken: list[str] = []

    async def wake(arq_ids: list[str]) -> None:
        woken.extend(arq_ids)

    steps = RedisStepQueue(redis, queue, wake)
    await redis.script_flush()
    handed = HandOver(job, epoch=1, event_lines=['{"type":"x"}'], tasks=[_task(job)])
    assert await steps.hand_over(handed) is False
    assert await redis.xlen(events_channel(job)) == 1  # the pipeline's other commands ran once
    assert await redis.zrange(queue, 0, -1) == [step_job_id(_task(job)).encode()]
    assert woken == [step_job_id(_task(job))]
    # the same step again is a no-op (a live duplicate id), and so is a producer's enqueue of it
    assert await steps.hand_over(HandOver(job, epoch=1, tasks=[_task(job)])) is False
    assert await enqueue_step(redis, _task(job), queue) is False
    assert await redis.zcard(queue) == 1
    # what was written is arq's own job format, with perq's JSON payload
    raw = await redis.get(job_key_prefix + step_job_id(_task(job)))
    function, args, kwargs, _try, _enqueued = deserialize_job_raw(raw, deserializer=deserialize)
    assert (function, kwargs) == (STEP_TASK, {}) and StepTask.model_validate(args[0]) == _task(job)
    assert json.loads(raw)["f"] == STEP_TASK


async def test_hand_over_refuses_a_cancelled_job(redis: ArqRedis) -> None:
    queue, job = f"perq:test:scripts:{time.monotonic_ns()}", f"j{time.monotonic_ns()}"
    await redis.set(cancel_key(job), "5")
    steps = RedisStepQueue(redis, queue, _ignore)
    assert await steps.hand_over(HandOver(job, epoch=5, tasks=[_task(job)])) is True
    assert await redis.zcard(queue) == 0
    # a cancel before the submission the step descends from stops nothing
    assert await steps.hand_over(HandOver(job, epoch=6, tasks=[_task(job)])) is False
    assert await redis.zcard(queue) == 1


async def test_pick_up_takes_due_steps_once_and_marks_the_owner(redis: ArqRedis) -> None:
    queue, job = f"perq:test:scripts:{time.monotonic_ns()}", f"j{time.monotonic_ns()}"
    tasks = [_task(job, n) for n in (2, 3, 4)]
    for t in tasks:
        assert await enqueue_step(redis, t, queue)
    await redis.set(cancel_key(job), "7")
    await redis.script_flush()
    ids = [step_job_id(t) for t in tasks]
    picked = await pick_up(redis, queue, ids, room=2, lease_s=5, owner="worker-a")
    assert [p.arq_id for p in picked] == ids[:2] and all(p.cancel_mark == 7 for p in picked)
    assert await redis.get(in_progress_key_prefix + ids[0]) == b"worker-a"
    # another worker gets only what is left
    again = await pick_up(redis, queue, ids, room=5, lease_s=5, owner="worker-b")
    assert [p.arq_id for p in again] == ids[2:]


def test_every_lua_file_is_packaged() -> None:
    """The Docker image installs perq non-editable: the scripts must be package data, or workers fail."""
    root = Path(__file__).resolve().parent.parent
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    folder = root / "worker" / "queue"
    packaged = {p for pattern in patterns["worker.queue"] for p in folder.glob(pattern)}
    assert set(folder.glob("*.lua")) <= packaged
    used = {s.name for s in vars(scripts).values() if isinstance(s, scripts.LuaScript)}
    assert {p.stem for p in packaged} == used
