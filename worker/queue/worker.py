"""The worker's queue loop: arq's Worker running perq's steps, with perq's pick-up, leases and wake-up.

arq handles SIGTERM and SIGINT (stop taking steps, wait up to the grace period, cancel the rest) and writes
its health-check key. perq owns everything else, without overriding arq's internals beyond `main`:

- perq runs its steps itself, with arq's semantics (`_run`): the pick-up script reads each job and counts
  its try with the lease, and a step that hands over is finished in the hand-over's round trip
  (`steps.py`), where arq's `run_job` costs three more round trips and its bookkeeping per job. What arq
  guarantees is kept: one try at a time (the lease), a try counter that a re-run after a lapsed lease or a
  SIGTERM increments, `max_tries`, `Retry(defer=...)` re-queued with its delay, an id unique while its job
  key lives, expired or unreadable jobs failed and removed, and a step cancelled by arq's shutdown left
  queued with its lease dropped;
- the poll loop takes all ready steps in one round trip, and sleeps until the next poll *or* until this
  worker enqueued a step, so a job's next step starts at once instead of after the poll delay;
- a step's lease is short and renewed while it runs (`leases.py`), so a worker killed mid-step hands its
  step to another worker within `PERQ_LEASE_SECONDS`, not after arq's job timeout + 10 s;
- losing Redis does not kill the worker: it logs and retries with a growing, jittered back-off;
- the worker's own concurrency limit and its count of running steps (arq's `tasks`, which its signal
  handlers read), its heartbeat key, and reconciliation (`worker/reconcile.py`) run beside the loop.

What is used of arq beyond its documented API is listed in `arq_private.py` and checked at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from arq.jobs import deserialize_job_raw
from arq.worker import Retry, Worker, func
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.config import Settings
from shared.models import now_ms
from shared.queue import STEP_TASK, PayloadError, StepTask, deserialize, serialize
from shared.queue.broker import ArqRedis, open_pool
from worker.heartbeat import heartbeat, new_worker_id
from worker.loop import StepInterrupted
from worker.queue.arq_private import arq_mismatches, arq_version
from worker.queue.leases import pick_up, renew_leases
from worker.queue.scripts import load_scripts
from worker.queue.steps import FINISHING, Finish, Picked, RedisStepQueue, Taking, drops_settled
from worker.reconcile import reconcile_forever
from worker.runtime import UNKNOWN, Runtime, collector_for_steps
from worker.step_queue import StepQueue

log = logging.getLogger("perq.worker")
REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError)
REDIS_DOWN = (*REDIS_ERRORS, OSError)  # in the poll loop, socket errors mean the same
# a step that fails outside the loop (its run could not even be loaded) is tried this often, then its job
# is stopped with the error
STEP_ATTEMPTS = 3
# arq's own timeout must never fire first: a step bounds itself and ends its run with an error instead
ARQ_STEP_TIMEOUT_S = 24 * 3600
# a step tried more often than this (worker deaths, SIGTERMs, Retry) fails without running, as arq's max_tries
MAX_TRIES = 1000
RETRY_COUNTER_S = 88400  # the lifetime of arq's try counter, as arq and pick_up.lua set it
# health_check_interval: arq's health-check key is rewritten this often (the bench waits for it)
HEALTH_CHECK_S = 10
# how long a stopping worker waits for its lease drops still on their way (each is one batch's round trip)
DROPS_WAIT_S = 2.0


async def step(ctx: dict[str, Any], payload: Any) -> None:
    """The arq task: one step of one run. The payload is validated before anything else happens."""
    try:
        task = StepTask.model_validate(payload)
    except Exception as e:
        log.error("rejected queue payload %r: %s", str(payload)[:200], e)
        raise PayloadError(f"invalid step payload: {e}") from e
    runtime: Runtime = ctx["perq"]
    try:
        known = ctx.get("cancel_mark", UNKNOWN)
        await runtime.run_step(task, attempt=ctx.get("job_try", 1), cancel_mark=known)
    except (*REDIS_ERRORS, StepInterrupted) as e:
        # the step's checkpoint may be written already; running it again is safe and hands the job on
        log.warning(
            "redis failed during step %s of run %s (%s); it will run again", task.step_number, task.run_id, e
        )
        raise Retry(defer=1) from e
    except Exception as e:
        attempt = ctx.get("job_try", 1)
        log.exception("step %s of run %s failed (attempt %s)", task.step_number, task.run_id, attempt)
        if attempt < STEP_ATTEMPTS:
            raise Retry(defer=2 * attempt) from e
        await runtime.io(runtime.fail_job, task, e)
        raise


async def _drops_before_close(ctx: dict[Any, Any]) -> None:
    """arq's on_shutdown, run once every step has ended and before the pool closes: the lease drops of takes
    that could not start (a step cut short in its hand-over) still reach Redis."""
    await drops_settled(DROPS_WAIT_S)


class Backoff:
    """How long to wait while Redis is unreachable: 0.05 s at first, doubling up to `cap_s`, jittered so
    that workers do not all come back at once; a success starts it over."""

    def __init__(self, what: str, *, base_s: float = 0.05, cap_s: float = 1.0) -> None:
        self.what = what
        self.failures = 0
        self.delays = EqualJitterBackoff(cap=cap_s, base=base_s)

    async def wait(self, error: BaseException) -> None:
        self.failures += 1
        delay = self.delays.compute(self.failures)
        log.warning("%s: redis unreachable (%s); retrying in %.2f s", self.what, error, delay)
        await asyncio.sleep(delay)

    def reset(self) -> None:
        self.failures = 0


class Wake:
    """The steps this worker enqueued since its loop last looked: the loop takes them at once."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.fresh: list[str] = []  # arq ids

    def __call__(self, arq_ids: list[str]) -> None:
        self.fresh.extend(arq_ids)
        self.event.set()

    def take(self) -> list[str]:
        self.event.clear()
        fresh, self.fresh = self.fresh, []
        return fresh


class PerqWorker(Worker):
    """arq's Worker with perq's loop (`main`); made by `serve` on an open pool with a ready runtime."""

    def __init__(
        self, settings: Settings, redis: ArqRedis, runtime: Runtime, wake: Wake, *, burst: bool = False
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.runtime = runtime
        self.wake = wake
        self.until_empty = burst
        self.concurrency = settings.worker.concurrency
        self.read_limit = max(5 * settings.worker.concurrency, 100)  # ids read per poll, as arq reads them
        self.lease_owner = new_worker_id()  # the value of this worker's in-progress keys: whose lease it is
        super().__init__(
            functions=[func(step, name=STEP_TASK, timeout=ARQ_STEP_TIMEOUT_S, max_tries=MAX_TRIES)],
            queue_name=settings.redis.queue,
            redis_pool=redis,
            ctx={"redis": redis, "perq": runtime},
            job_serializer=serialize,
            job_deserializer=deserialize,
            keep_result=0,
            max_jobs=settings.worker.concurrency,
            job_completion_wait=int(settings.worker.grace_seconds),
            health_check_interval=HEALTH_CHECK_S,
            on_shutdown=_drops_before_close,
        )
        problems = arq_mismatches(self)
        if problems:
            found = "; ".join(problems)
            raise RuntimeError(f"arq {arq_version()} is not the arq perq was built for: {found}")

    async def main(self) -> None:
        """perq's poll loop, with its services beside it; returns when a burst drained the queue."""
        queue = self.settings.redis.queue
        lease_s = self.settings.worker.lease_seconds
        services = [
            asyncio.create_task(
                renew_leases(self.redis, self._running, lease_s=lease_s, owner=self.lease_owner)
            ),
            # a heartbeat key per worker, counted by `perq status --queue`
            asyncio.create_task(heartbeat(self.redis, queue, self.tasks, self.concurrency)),
            # the queue rebuilt from the store after Redis forgot
            asyncio.create_task(
                reconcile_forever(
                    self.redis,
                    self.runtime.store,
                    queue,
                    period_s=self.settings.worker.reconcile_period,
                    settle_s=lease_s / 2,
                    enqueued=self.wake,
                    errors=REDIS_DOWN,
                )
            ),
        ]
        loop = asyncio.get_running_loop()
        outage = Backoff("the poll loop")
        next_poll = 0.0
        try:
            while True:
                fresh = self.wake.take()
                try:
                    if loop.time() >= next_poll:
                        next_poll = loop.time() + self.settings.worker.poll_delay
                        await self._poll()
                    elif fresh and self.allow_pick_jobs:
                        # steps this worker just enqueued: take them by id, without reading the queue
                        await self._take(fresh)
                    if self.until_empty and await self._drained():
                        return
                except REDIS_DOWN as e:
                    await outage.wait(e)
                    continue
                outage.reset()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.event.wait(), max(next_poll - loop.time(), 0))
        finally:
            for service in services:
                service.cancel()

    async def _poll(self) -> None:
        if self.allow_pick_jobs and len(self.tasks) < self.concurrency:
            due = await self.redis.zrangebyscore(
                self.settings.redis.queue, min=float("-inf"), max=now_ms(), start=0, num=self.read_limit
            )
            await self._take([arq_id.decode() for arq_id in due])
        await self.record_health()

    def taking(self) -> Taking:
        """How this worker's steps take the steps they hand on, in the hand-over (`steps.Taking`)."""
        lease_ms = int(self.settings.worker.lease_seconds * 1000)
        return Taking(
            self.lease_owner, lease_ms, lambda: self.allow_pick_jobs, self._start, lambda i: i in self.tasks
        )

    async def _take(self, arq_ids: list[str]) -> None:
        """Take what the pick-up script gives of these steps, up to the room left, and run each with arq."""
        room = self.concurrency - len(self.tasks)
        candidates = [i for i in arq_ids if i not in self.tasks]
        if room <= 0 or not candidates:
            return
        picked = await pick_up(
            self.redis,
            self.settings.redis.queue,
            candidates,
            room=room,
            lease_s=self.settings.worker.lease_seconds,
            owner=self.lease_owner,
        )
        for p in picked:
            self._start(p)

    def _start(self, picked: Picked) -> None:
        """Run a taken step in a task of its own, counted in the worker's room."""
        # a context of its own: a step taken in another step's hand-over must not see that step's variables
        task = asyncio.create_task(self._run(picked), context=contextvars.Context())
        self.tasks[picked.arq_id] = task
        task.add_done_callback(functools.partial(self._finished, picked.arq_id))

    async def _run(self, picked: Picked) -> None:
        """Run one taken step as arq's `run_job` would, its outcome recorded as arq's `finish_job` records
        it (keep_result 0: no result is kept). A step that handed over was finished in that round trip."""
        arq_id, tries = picked.arq_id, picked.tries
        finish = Finish(arq_id)
        if picked.job is None:
            log.warning("job %s expired", arq_id)
            return await self._failed(finish)
        try:
            function, args, kwargs, enqueued_try, _ = deserialize_job_raw(
                picked.job, deserializer=deserialize
            )
        except Exception:
            log.exception("deserializing job %s failed", arq_id)
            return await self._failed(finish)
        if function != STEP_TASK:
            log.warning("job %s, function %r not found", arq_id, function)
            return await self._failed(finish)
        if enqueued_try and enqueued_try > tries:  # arq's `_job_try`: the counter starts there
            tries = enqueued_try
            await self.redis.setex(finish.keys()[1], RETRY_COUNTER_S, str(tries))
        if tries > MAX_TRIES:
            log.warning("%s max retries %d exceeded", arq_id, MAX_TRIES)
            return await self._failed(finish)
        ctx = {
            "redis": self.redis,
            "perq": self.runtime,
            "job_id": arq_id,
            "job_try": tries,
            "score": picked.score,
            # the job's cancel mark, read in the pick-up's round trip: the step need not ask again
            "cancel_mark": picked.cancel_mark,
        }
        token = FINISHING.set(finish)  # the hand-over finishes the step with its enqueue
        try:
            await self._outcome(step(ctx, *args, **kwargs), finish, picked.score)
        finally:
            FINISHING.reset(token)

    async def _outcome(self, running: Awaitable[None], finish: Finish, score: int) -> None:
        """Await the step and record its outcome as arq's `run_job` does."""
        try:
            await running
        except Retry as e:
            if finish.done:  # handed over already: nothing is left to run again
                return
            self.jobs_retried += 1
            defer = e.defer_score + (now_ms() - score) if e.defer_score else None
            log.info("%s retrying in %.2f s", finish.arq_id, (e.defer_score or 0) / 1000)
            await asyncio.shield(self._finish(finish, retry=True, defer_ms=defer))
        except asyncio.CancelledError:
            # arq's shutdown: the step stays queued, its lease dropped, so another worker runs it now. The
            # cancel ends here, as in arq's run_job: shutdown gathers every step's task and must see each
            # one finish, or it stops at the first and leaves the others' leases (and exits non-zero)
            if not finish.done:  # else it handed over already: only its record's refresh was cut short
                self.jobs_retried += 1
                log.info("%s cancelled, will be run again", finish.arq_id)
                await asyncio.shield(self._finish(finish, retry=True))
        except Exception:
            log.exception("%s failed", finish.arq_id)
            await self._failed(finish)
        else:
            self.jobs_complete += 1
            if not finish.done:
                await asyncio.shield(self._finish(finish))

    async def _failed(self, finish: Finish) -> None:
        self.jobs_failed += 1
        await asyncio.shield(self._finish(finish))

    async def _finish(self, finish: Finish, *, retry: bool = False, defer_ms: int | None = None) -> None:
        """arq's `finish_job`: a retried step stays queued (`defer_ms` later) with its lease dropped, and
        its try counter kept; any other is deleted with its lease and try counter and taken off the queue."""
        async with self.redis.pipeline(transaction=True) as tr:
            if retry:
                if defer_ms:  # only while still queued: a hand-over whose reply was lost may have finished it
                    tr.zadd(self.settings.redis.queue, {finish.arq_id: defer_ms}, xx=True, incr=True)
                tr.delete(finish.keys()[0])
            else:
                tr.delete(*finish.keys())
                tr.zrem(self.settings.redis.queue, finish.arq_id)
            await tr.execute()
        finish.done = True

    def _finished(self, arq_id: str, task: asyncio.Task[Any]) -> None:
        """A step's task ended: its room is free at once (arq's SIGTERM drain waits for `tasks` to empty).
        `_run` handles the step's own errors; one here is failing to record the outcome (Redis lost
        meanwhile): the step's lease lapses and it runs again."""
        if self.tasks.get(arq_id) is task:
            del self.tasks[arq_id]
        if not task.cancelled() and task.exception() is not None:
            log.warning("step %s: could not record its outcome: %r", arq_id, task.exception())

    def _running(self) -> list[str]:
        return [arq_id for arq_id, t in self.tasks.items() if not t.done()]

    async def _drained(self) -> bool:
        queue = self.settings.redis.queue
        if await self.redis.zcard(queue) == 0:
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            return await self.redis.zcard(queue) == 0
        return False


async def serve(
    settings: Settings, runtime_for: Callable[[StepQueue], Runtime], *, burst: bool = False
) -> None:
    """Run a worker on the queue until a burst drained it or a signal stopped it.

    Redis unreachable at start is waited for; `runtime_for` makes the step runtime on the worker's queue.
    """
    opening = Backoff("opening the queue")
    while True:
        try:
            redis = await open_pool(settings.redis.url, settings.redis.queue, connect_timeout_s=1)
        except REDIS_DOWN as e:
            await opening.wait(e)
            continue
        try:
            await load_scripts(redis)
            break
        except REDIS_DOWN as e:
            await redis.aclose()
            await opening.wait(e)
    wake = Wake()
    queue = RedisStepQueue(redis, settings.redis.queue, wake)
    runtime = runtime_for(queue)
    try:
        worker = PerqWorker(settings, redis, runtime, wake, burst=burst)
        queue.taking = worker.taking()
        with collector_for_steps():  # close() too: after an error, it waits for the steps still running
            try:
                await worker.async_run()
            except asyncio.CancelledError:
                pass  # arq's signal handler stopped the loop; close() hands back or waits for what still runs
            finally:
                await worker.close()
    finally:
        runtime.close()
        close = getattr(runtime.pool, "close", None)
        if close is not None:
            await close()
