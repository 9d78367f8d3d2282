"""perq runs its steps itself (`PerqWorker._run`), not through arq's `run_job`: each arq guarantee perq
relies on, against a real Redis, with a stand-in for the step runtime.

- one try at a time: a leased step is not taken again; a lapsed lease is, with its try counter incremented;
- `Retry(defer=...)` leaves the step queued, that much later, its lease dropped and its try counter kept;
- `max_tries`: a step tried too often fails without running, and is removed;
- an expired (or foreign) job is failed and removed, as arq does;
- a job's id stays unique while it lives: enqueueing it again while it runs is refused;
- jobs written by arq's own `enqueue_job` and by perq's hand-over both run;
- the hand-over finishes the step in its own round trip, except when the job was cancelled: then the step
  is finished after the step's cancel handling;
- a step cancelled by arq's shutdown (SIGTERM past the grace period) stays queued, its lease dropped, and
  its next try counts one more.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from arq.constants import retry_key_prefix
from redis.exceptions import ConnectionError as RedisConnectionError

from shared.config import RedisSection, Settings, WorkerSection
from shared.models import now_ms
from shared.queue import StepTask, cancel_key, events_channel, step_job_id
from shared.queue.broker import ArqRedis, enqueue_step, in_progress_key_prefix, job_key_prefix
from tests.support.localredis import LocalRedis
from worker.queue.leases import Picked, pick_up
from worker.queue.steps import Finish, RedisStepQueue
from worker.queue.worker import MAX_TRIES, PerqWorker, Wake
from worker.step_queue import HandOver

Behaviour = Callable[["FakeRuntime", StepTask, int], Awaitable[None]]


class FakeRuntime:
    """What `step` asks of the runtime, with the step's behaviour given by the test."""

    def __init__(self, queue: RedisStepQueue, behaviour: Behaviour) -> None:
        self.queue = queue
        self.behaviour = behaviour
        self.attempts: list[tuple[StepTask, int]] = []
        self.failed: list[StepTask] = []  # jobs stopped by `step` for a step that kept failing

    async def run_step(self, task: StepTask, *, attempt: int, cancel_mark: Any) -> None:
        self.attempts.append((task, attempt))
        await self.behaviour(self, task, attempt)

    async def io(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    def fail_job(self, task: StepTask, error: Exception) -> None:
        self.failed.append(task)


async def _done(_rt: FakeRuntime, _task: StepTask, _attempt: int) -> None:
    return None


class Harness:
    def __init__(self, redis: ArqRedis, url: str, behaviour: Behaviour = _done, lease_s: float = 5) -> None:
        self.redis = redis
        self.queue = f"perq:test:own:{time.monotonic_ns()}"
        self.job = f"j{time.monotonic_ns()}"
        settings = Settings(
            redis=RedisSection(url=url, queue=self.queue), worker=WorkerSection(lease_seconds=lease_s)
        )
        self.wake = Wake()
        queue = RedisStepQueue(redis, self.queue, self.wake)
        self.runtime = FakeRuntime(queue, behaviour)
        self.worker = PerqWorker(settings, redis, self.runtime, self.wake)  # type: ignore[arg-type]
        queue.taking = self.worker.taking()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):  # arq's handlers, installed on the test's loop
            loop.remove_signal_handler(sig)

    def task(self, step: int = 1) -> StepTask:
        return StepTask(job_id=self.job, run_id="r1", step_number=step)

    async def take(self, step: int = 1, owner: str = "w1", lease_s: float = 5) -> list[Picked]:
        ids = [step_job_id(self.task(step))]
        return await pick_up(self.redis, self.queue, ids, room=10, lease_s=lease_s, owner=owner)

    async def keys_of(self, step: int = 1) -> dict[str, bool]:
        arq_id = step_job_id(self.task(step))
        return {
            "queued": await self.redis.zscore(self.queue, arq_id) is not None,
            "job": bool(await self.redis.exists(job_key_prefix + arq_id)),
            "lease": bool(await self.redis.exists(in_progress_key_prefix + arq_id)),
            "tries": bool(await self.redis.exists(retry_key_prefix + arq_id)),
        }


GONE = {"queued": False, "job": False, "lease": False, "tries": False}


async def test_one_try_at_a_time_and_a_lapsed_lease_runs_again_with_its_try_counted(
    redis: ArqRedis, redis_server: LocalRedis
) -> None:
    h = Harness(redis, redis_server.url)
    assert await enqueue_step(redis, h.task(), h.queue)  # arq's own enqueue_job wrote it
    first = await h.take(owner="w1", lease_s=0.2)
    assert [p.tries for p in first] == [1] and first[0].job is not None
    assert await h.take(owner="w2") == []  # leased: no second try meanwhile
    await asyncio.sleep(0.3)  # w1 died: its lease lapses
    again = await h.take(owner="w2")
    assert [p.tries for p in again] == [2]
    await h.worker._run(again[0])
    assert [(t, a) for t, a in h.runtime.attempts] == [(h.task(), 2)]
    assert await h.keys_of() == GONE
    assert h.worker.jobs_complete == 1


async def test_retry_with_defer_requeues_later_with_the_lease_dropped(
    redis: ArqRedis, redis_server: LocalRedis
) -> None:
    async def redis_lost(_rt: FakeRuntime, _task: StepTask, _attempt: int) -> None:
        raise RedisConnectionError("lost")  # `step` turns it into Retry(defer=1)

    h = Harness(redis, redis_server.url, redis_lost)
    assert await enqueue_step(redis, h.task(), h.queue)
    picked = await h.take()
    before = now_ms()
    await h.worker._run(picked[0])
    score = await redis.zscore(h.queue, step_job_id(h.task()))
    assert score is not None and before + 900 <= score <= now_ms() + 1100
    assert await h.keys_of() == {"queued": True, "job": True, "lease": False, "tries": True}
    assert await h.take() == []  # not due yet
    await redis.zadd(h.queue, {step_job_id(h.task()): now_ms()})
    assert [p.tries for p in await h.take()] == [2]
    assert h.worker.jobs_retried == 1


async def test_a_step_tried_too_often_fails_without_running(
    redis: ArqRedis, redis_server: LocalRedis
) -> None:
    h = Harness(redis, redis_server.url)
    assert await enqueue_step(redis, h.task(), h.queue)
    await redis.set(retry_key_prefix + step_job_id(h.task()), MAX_TRIES)
    picked = await h.take()
    assert picked[0].tries == MAX_TRIES + 1
    await h.worker._run(picked[0])
    assert h.runtime.attempts == []
    assert await h.keys_of() == GONE
    assert h.worker.jobs_failed == 1


async def test_an_expired_or_foreign_job_is_failed_and_removed(
    redis: ArqRedis, redis_server: LocalRedis
) -> None:
    h = Harness(redis, redis_server.url)
    await redis.zadd(h.queue, {step_job_id(h.task()): now_ms()})  # its job key expired
    await h.worker._run((await h.take())[0])
    assert await h.keys_of() == GONE
    await redis.enqueue_job("not_a_step", _job_id=step_job_id(h.task(2)), _queue_name=h.queue)
    await h.worker._run((await h.take(2))[0])
    assert await h.keys_of(2) == GONE
    assert h.runtime.attempts == [] and h.worker.jobs_failed == 2


async def test_the_hand_over_finishes_the_step_and_its_successor_runs(
    redis: ArqRedis, redis_server: LocalRedis
) -> None:
    seen: dict[str, Any] = {}

    async def hand_on(rt: FakeRuntime, task: StepTask, _attempt: int) -> None:
        # while the step runs, its id is live: enqueueing it again is refused (arq's uniqueness)
        seen["duplicate"] = await enqueue_step(redis, task, rt.queue.queue_name)
        if task.step_number == 1:
            await rt.queue.hand_over(HandOver(task.job_id, epoch=1, tasks=[h.task(2)]))
            seen["after"] = await h.keys_of(1)

    h = Harness(redis, redis_server.url, hand_on)
    assert await enqueue_step(redis, h.task(), h.queue)
    await h.worker._run((await h.take())[0])
    assert seen == {"duplicate": False, "after": GONE}  # finished inside the hand-over's round trip
    # the job perq's hand-over wrote is taken in the same round trip, into the handing step's room
    second = h.worker.tasks.get(step_job_id(h.task(2)))
    assert second is not None and h.wake.take() == []
    await second
    assert [(t.step_number, attempt) for t, attempt in h.runtime.attempts] == [(1, 1), (2, 1)]
    assert await h.keys_of(1) == GONE and await h.keys_of(2) == GONE
    assert h.worker.jobs_complete == 2


async def test_events_the_stream_refuses_leave_the_hand_over_standing(
    redis: ArqRedis, redis_server: LocalRedis, caplog: Any
) -> None:
    """A step's live events are a copy of what the store holds: when the job's stream refuses them (its key
    holds something else), that is logged, and the hand-over stands. The step that handed on is finished and
    not tried again, and on its last try it does not stop the job that moved on; the last step, which hands
    nothing on and is finished by the events' own call, is finished all the same."""

    async def hand_on(rt: FakeRuntime, task: StepTask, _attempt: int) -> None:
        lines = [f'{{"type":"step{task.step_number}"}}']
        if task.step_number == 1:
            await rt.queue.hand_over(HandOver(task.job_id, epoch=1, event_lines=lines, tasks=[h.task(2)]))
        else:
            await rt.queue.hand_over(HandOver(task.job_id, epoch=1, event_lines=lines, stopped=True))

    h = Harness(redis, redis_server.url, hand_on)
    await redis.set(events_channel(h.job), "not a stream")
    assert await enqueue_step(redis, h.task(), h.queue)
    await redis.set(retry_key_prefix + step_job_id(h.task()), 2)  # taken at its third try: the last
    with caplog.at_level(logging.WARNING, logger="perq.worker"):
        await h.worker._run((await h.take())[0])
        second = h.worker.tasks.get(step_job_id(h.task(2)))
        assert second is not None
        await second
    assert [(t.step_number, attempt) for t, attempt in h.runtime.attempts] == [(1, 3), (2, 1)]
    assert h.runtime.failed == []
    assert await h.keys_of(1) == GONE and await h.keys_of(2) == GONE
    assert (h.worker.jobs_complete, h.worker.jobs_retried, h.worker.jobs_failed) == (2, 0, 0)
    assert caplog.text.count("could not publish the events") == 2
    # the key that is no stream is left as it was, its lifetime too
    assert await redis.get(events_channel(h.job)) == b"not a stream"
    assert await redis.ttl(events_channel(h.job)) == -1


async def test_a_fan_out_takes_its_first_step_and_leaves_the_rest_to_the_loop(
    redis: ArqRedis, redis_server: LocalRedis
) -> None:
    """The handing step's room is one step: the first it hands on runs here at once (leased to this
    worker, its try counted), the others wait for the poll loop, where the worker's room decides."""

    async def hand_on(rt: FakeRuntime, task: StepTask, _attempt: int) -> None:
        if task.step_number == 1:
            await rt.queue.hand_over(HandOver(task.job_id, epoch=1, tasks=[h.task(2), h.task(3)]))

    h = Harness(redis, redis_server.url, hand_on)
    assert await enqueue_step(redis, h.task(), h.queue)
    await h.worker._run((await h.take())[0])
    second = h.worker.tasks.get(step_job_id(h.task(2)))
    assert second is not None and step_job_id(h.task(3)) not in h.worker.tasks
    assert h.wake.take() == [step_job_id(h.task(3))]
    assert (await h.keys_of(3))["queued"] and not (await h.keys_of(3))["lease"]
    await second
    assert [(t.step_number, attempt) for t, attempt in h.runtime.attempts] == [(1, 1), (2, 1)]
    assert await h.keys_of(2) == GONE


async def test_a_draining_worker_takes_nothing_it_hands_on(redis: ArqRedis, redis_server: LocalRedis) -> None:
    """After SIGTERM (arq stops picking jobs), a step still hands on, but leaves its successor queued for
    another worker."""

    async def hand_on(rt: FakeRuntime, task: StepTask, _attempt: int) -> None:
        if task.step_number == 1:
            await rt.queue.hand_over(HandOver(task.job_id, epoch=1, tasks=[h.task(2)]))

    h = Harness(redis, redis_server.url, hand_on)
    assert await enqueue_step(redis, h.task(), h.queue)
    h.worker.allow_pick_jobs = False
    await h.worker._run((await h.take())[0])
    assert h.worker.tasks == {} and h.wake.take() == [step_job_id(h.task(2))]
    assert await h.keys_of(2) == {"queued": True, "job": True, "lease": False, "tries": False}


async def test_a_cancelled_job_keeps_its_step_until_the_step_returns(
    redis: ArqRedis, redis_server: LocalRedis
) -> None:
    seen: dict[str, Any] = {}

    async def hand_on(rt: FakeRuntime, task: StepTask, _attempt: int) -> None:
        seen["refused"] = await rt.queue.hand_over(HandOver(task.job_id, epoch=1, tasks=[h.task(2)]))
        seen["after"] = await h.keys_of(1)

    h = Harness(redis, redis_server.url, hand_on)
    assert await enqueue_step(redis, h.task(), h.queue)
    await redis.set(cancel_key(h.job), 5)
    await h.worker._run((await h.take())[0])
    assert seen["refused"] is True and seen["after"]["queued"] and seen["after"]["lease"]
    assert await h.keys_of(1) == GONE and await h.keys_of(2) == GONE


async def test_a_step_cancelled_by_shutdown_stays_queued_and_counts_its_next_try(
    redis: ArqRedis, redis_server: LocalRedis
) -> None:
    started = asyncio.Event()

    async def slow(_rt: FakeRuntime, _task: StepTask, _attempt: int) -> None:
        started.set()
        await asyncio.sleep(30)

    h = Harness(redis, redis_server.url, slow)
    assert await enqueue_step(redis, h.task(), h.queue)
    running = asyncio.create_task(h.worker._run((await h.take())[0]))
    await started.wait()
    running.cancel()  # what arq's signal handler does to the steps still running past the grace period
    await running  # the step's task ends normally: arq's shutdown gathers every step and must see each end
    assert await h.keys_of() == {"queued": True, "job": True, "lease": False, "tries": True}
    assert [p.tries for p in await h.take(owner="w2")] == [2]


async def test_shutdown_past_the_grace_period_drops_every_running_steps_lease(
    redis: ArqRedis, redis_server: LocalRedis
) -> None:
    started = {1: asyncio.Event(), 2: asyncio.Event()}

    async def slow(_rt: FakeRuntime, task: StepTask, _attempt: int) -> None:
        started[task.step_number].set()
        await asyncio.sleep(30)

    h = Harness(redis, redis_server.url, slow)
    for step in (1, 2):
        assert await enqueue_step(redis, h.task(step), h.queue)
    picked = [*(await h.take(1)), *(await h.take(2))]
    running = [asyncio.create_task(h.worker._run(p)) for p in picked]
    await asyncio.gather(*(e.wait() for e in started.values()))
    for task in running:
        task.cancel()
    # what arq's close() does after cancelling: gather them all; none may raise, every lease must be gone
    await asyncio.gather(*running)
    for step in (1, 2):
        assert await h.keys_of(step) == {"queued": True, "job": True, "lease": False, "tries": True}


async def test_a_retry_after_a_finished_hand_over_does_not_queue_the_step_again(
    redis: ArqRedis, redis_server: LocalRedis
) -> None:
    h = Harness(redis, redis_server.url, _done)
    assert await enqueue_step(redis, h.task(), h.queue)
    [picked] = await h.take()
    finish = Finish(picked.arq_id)
    await h.worker._finish(finish)  # the hand-over finished it on the server; its reply was lost
    finish.done = False
    await h.worker._finish(finish, retry=True, defer_ms=1000)
    assert await h.keys_of() == GONE


async def test_a_take_that_comes_back_to_a_draining_worker_drops_its_lease(
    redis: ArqRedis, redis_server: LocalRedis
) -> None:
    """SIGTERM during the hand-over's round trip: the step it took is not started here; its lease goes at
    once (another worker takes it now, not after the lease), and it stays queued."""

    async def hand_on(rt: FakeRuntime, task: StepTask, _attempt: int) -> None:
        if task.step_number == 1:
            await rt.queue.hand_over(HandOver(task.job_id, epoch=1, tasks=[h.task(2)]))

    h = Harness(redis, redis_server.url, hand_on)
    asked = iter([True, False])  # allowed when the hand-over is sent, draining when its reply comes
    queue = h.runtime.queue
    assert isinstance(queue, RedisStepQueue) and queue.taking is not None
    queue.taking = dataclasses.replace(queue.taking, allowed=lambda: next(asked))
    assert await enqueue_step(redis, h.task(), h.queue)
    await h.worker._run((await h.take())[0])
    assert h.worker.tasks == {} and h.wake.take() == [step_job_id(h.task(2))]
    for _ in range(100):  # the lease is dropped by a task of its own
        if not (await h.keys_of(2))["lease"]:
            break
        await asyncio.sleep(0.01)
    assert await h.keys_of(2) == {"queued": True, "job": True, "lease": False, "tries": True}
    assert [p.tries for p in await h.take(2, owner="w2")] == [2]  # taken by another worker at once
