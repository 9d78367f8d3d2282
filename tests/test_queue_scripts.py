"""The worker's Lua scripts against a real Redis, including one that forgot them (restarted, flushed).

The hand-over runs its scripts (the events', the enqueues) inside a pipeline by SHA only; a Redis that does
not know them refuses just those calls, which run again in order once loaded, while the rest of the pipeline
ran once. The jobs it writes are the jobs arq writes, so arq workers read them.
"""

from __future__ import annotations

import json
import logging
import time
import tomllib
from pathlib import Path

import pytest
from arq.jobs import deserialize_job_raw

from shared.queue import STEP_TASK, StepTask, cancel_key, deserialize, events_channel, step_job_id
from shared.queue.broker import ArqRedis, enqueue_step, in_progress_key_prefix, job_key_prefix
from worker.queue import scripts
from worker.queue.leases import pick_up
from worker.queue.steps import RedisStepQueue
from worker.step_queue import HandOver


def _task(job: str, step: int = 2) -> StepTask:
    return StepTask(job_id=job, run_id="r1", step_number=step)


async def test_hand_over_to_a_redis_that_forgot_the_script_enqueues_once(redis: ArqRedis) -> None:
    queue, job = f"perq:test:scripts:{time.monotonic_ns()}", f"j{time.monotonic_ns()}"
    woken: list[str] = []
    steps = RedisStepQueue(redis, queue, woken.extend)
    await redis.script_flush()
    handed = HandOver(job, epoch=1, event_lines=['{"type":"x"}'], tasks=[_task(job)])
    assert await steps.hand_over(handed) is False
    assert await redis.xlen(events_channel(job)) == 1  # the events' call ran once, before the enqueue
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
    steps = RedisStepQueue(redis, queue, lambda _ids: None)
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


async def test_a_hand_over_takes_its_first_step_with_a_lease_and_a_counted_try(redis: ArqRedis) -> None:
    """Taken in the hand-over (`Taking`): the step is enqueued as arq would, leased to the taking worker,
    its try counted, its job's cancel mark (an older one) returned; a live duplicate is not taken."""
    from shared.queue.broker import in_progress_key_prefix
    from worker.queue.steps import FINISHING, Finish, Picked, Taking

    queue, job = f"perq:test:scripts:{time.monotonic_ns()}", f"j{time.monotonic_ns()}"
    await redis.set(cancel_key(job), "3")  # a cancel before the submission (epoch 5): stops nothing
    started: list[Picked] = []
    woken: list[str] = []
    steps = RedisStepQueue(redis, queue, woken.extend)
    steps.taking = Taking("w1", 5000, lambda: True, started.append, lambda _i: False)
    token = FINISHING.set(Finish("perq:none:r1:1"))
    try:
        assert await steps.hand_over(HandOver(job, epoch=5, tasks=[_task(job)])) is False
    finally:
        FINISHING.reset(token)
    arq_id = step_job_id(_task(job))
    assert [(p.arq_id, p.tries, p.cancel_mark) for p in started] == [(arq_id, 1, 3)] and woken == []
    assert await redis.get(in_progress_key_prefix + arq_id) == b"w1"
    assert 0 < await redis.pttl(in_progress_key_prefix + arq_id) <= 5000
    assert await redis.zrange(queue, 0, -1) == [arq_id.encode()]  # queued while it runs, as arq keeps it
    assert started[0].job == await redis.get(job_key_prefix + arq_id)
    token = FINISHING.set(Finish("perq:none:r1:1"))
    try:  # the same step again: live, so neither enqueued nor taken a second time
        assert await steps.hand_over(HandOver(job, epoch=5, tasks=[_task(job)])) is False
    finally:
        FINISHING.reset(token)
    assert len(started) == 1 and woken == [arq_id]


async def test_a_step_taken_in_a_hand_over_whose_events_are_refused_still_starts(
    redis: ArqRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """The take succeeded but the job's stream refused the events (it is not a stream): that is logged, not
    raised, and the step the hand-over took runs, not left leased to no one."""
    from worker.queue.steps import FINISHING, Finish, Picked, Taking

    queue, job = f"perq:test:scripts:{time.monotonic_ns()}", f"j{time.monotonic_ns()}"
    await redis.set(events_channel(job), "not a stream")
    started: list[Picked] = []
    steps = RedisStepQueue(redis, queue, lambda _ids: None)
    steps.taking = Taking("w1", 5000, lambda: True, started.append, lambda _i: False)
    finish = Finish("perq:none:r1:1")
    token = FINISHING.set(finish)
    try:
        with caplog.at_level(logging.WARNING, logger="perq.worker"):
            handed = HandOver(job, epoch=1, event_lines=['{"type":"x"}'], tasks=[_task(job)])
            assert await steps.hand_over(handed) is False
    finally:
        FINISHING.reset(token)
    assert [p.arq_id for p in started] == [step_job_id(_task(job))] and finish.done
    assert f"could not publish the events of job {job}" in caplog.text and "WRONGTYPE" in caplog.text


async def test_a_hand_over_with_nothing_to_enqueue_publishes_and_finishes_in_one_call(
    redis: ArqRedis,
) -> None:
    """`publish.lua`: the step's events in order on its job's stream, which lives minutes once the job
    stopped (a day while it runs), and the step finished as arq's finish_job does (its lease, try counter
    and job deleted, its id off the queue), by a Redis that had forgotten the script too."""
    from arq.constants import retry_key_prefix

    from shared.events import STREAM_TTL_AFTER_STOP_S, STREAM_TTL_S
    from worker.queue.steps import FINISHING, Finish

    queue, job = f"perq:test:scripts:{time.monotonic_ns()}", f"j{time.monotonic_ns()}"
    arq_id = step_job_id(_task(job, 1))
    assert await enqueue_step(redis, _task(job, 1), queue)
    finish = Finish(arq_id)
    await redis.set(in_progress_key_prefix + arq_id, "w1")
    await redis.set(retry_key_prefix + arq_id, "1")
    other = step_job_id(_task(job, 7))  # another step of the queue: left alone
    assert await enqueue_step(redis, _task(job, 7), queue)
    steps = RedisStepQueue(redis, queue, lambda _ids: None)
    await redis.script_flush()
    lines = ['{"type":"a"}', '{"type":"b"}', '{"type":"c"}']
    token = FINISHING.set(finish)
    try:  # a step handing nothing on while its job runs on (a parallel delegate): the stream lives a day
        assert await steps.hand_over(HandOver(job, epoch=1, event_lines=lines[:1], tasks=[])) is False
        assert finish.done
    finally:
        FINISHING.reset(token)
    assert STREAM_TTL_AFTER_STOP_S < await redis.ttl(events_channel(job)) <= STREAM_TTL_S
    assert not await redis.exists(
        in_progress_key_prefix + arq_id, retry_key_prefix + arq_id, job_key_prefix + arq_id
    )
    assert await redis.zrange(queue, 0, -1) == [other.encode()]
    await redis.set(in_progress_key_prefix + other, "w1")
    # a step that stops its job, handing nothing on: its events, the shorter lifetime, and its own finish
    token = FINISHING.set(Finish(other))
    try:
        handed = HandOver(job, epoch=1, event_lines=lines[1:], stopped=True)
        assert await steps.hand_over(handed) is False
    finally:
        FINISHING.reset(token)
    entries = await redis.xrange(events_channel(job))
    assert [fields[b"e"].decode() for _id, fields in entries] == lines
    assert 0 < await redis.ttl(events_channel(job)) <= STREAM_TTL_AFTER_STOP_S
    assert await redis.zcard(queue) == 0 and not await redis.exists(in_progress_key_prefix + other)


async def test_a_worker_loads_every_script_so_none_is_refused_alone(redis: ArqRedis) -> None:
    """A Redis that knows the enqueue (an earlier release's worker loaded it) but not the events' call would
    enqueue a step before its events are published: a worker loads every script at its start."""
    await redis.script_flush()
    await redis.script_load(scripts.ENQUEUE.body)
    await scripts.load_scripts(redis)
    assert await redis.script_exists(*(s.sha for s in scripts.SCRIPTS)) == [True] * len(scripts.SCRIPTS)


async def test_a_take_whose_hand_over_was_cancelled_on_its_way_is_dropped_after_it(redis: ArqRedis) -> None:
    """The hand-over's caller is cancelled while its batch is on its way (here behind another caller's, on a
    slow connection): the take still happens after the cancel, so the lease drop that undoes it goes through
    the same batches, after it. The step stays queued for any worker, its lease gone."""
    import asyncio

    from tests.support.pipelines import Late
    from worker.queue.batch import Batches
    from worker.queue.scripts import load_scripts
    from worker.queue.steps import FINISHING, Finish, Picked, Taking, drops_settled

    await load_scripts(redis)
    queue, job = f"perq:test:scripts:{time.monotonic_ns()}", f"j{time.monotonic_ns()}"
    started: list[Picked] = []
    steps = RedisStepQueue(redis, queue, lambda _ids: None)
    steps.batches = Batches(Late(redis, 0.2))
    steps.taking = Taking("w1", 5000, lambda: True, started.append, lambda _i: False)
    ahead = asyncio.ensure_future(steps.batches.send([("PING",)]))  # away at once, alone, for 0.2 s
    await asyncio.sleep(0.01)
    token = FINISHING.set(Finish("perq:none:r1:1"))
    try:  # asked while `ahead` is away: the hand-over goes in the sender's first batch
        handing = asyncio.ensure_future(steps.hand_over(HandOver(job, epoch=1, tasks=[_task(job)])))
    finally:
        FINISHING.reset(token)
    await ahead  # back after 0.2 s: the sender takes the hand-over's batch, away for 0.2 s more
    for _ in range(100):
        if not steps.batches._asked and steps.batches._sender is not None:
            break
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.05)
    assert not handing.done()
    handing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handing
    await drops_settled(5)
    arq_id = step_job_id(_task(job))
    assert started == []
    assert await redis.zscore(queue, arq_id) is not None  # taken on the server after the cancel, then freed
    assert not await redis.exists(in_progress_key_prefix + arq_id)


async def test_a_hand_over_whose_finish_fails_raises_and_leaves_the_step_unfinished(redis: ArqRedis) -> None:
    """The events' call also finishes a step that hands nothing on: an error there is the hand-over's own
    (raised, the step not marked finished, so the worker finishes or retries it), unlike a refused event."""
    from redis.exceptions import ResponseError

    from worker.queue.steps import FINISHING, Finish

    queue, job = f"perq:test:scripts:{time.monotonic_ns()}", f"j{time.monotonic_ns()}"
    await redis.set(queue, "not a queue")  # the finish's ZREM is refused
    finish = Finish(step_job_id(_task(job, 1)))
    steps = RedisStepQueue(redis, queue, lambda _ids: None)
    token = FINISHING.set(finish)
    try:
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await steps.hand_over(HandOver(job, epoch=1, event_lines=['{"type":"x"}'], stopped=True))
    finally:
        FINISHING.reset(token)
    assert not finish.done
