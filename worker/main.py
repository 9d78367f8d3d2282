"""The worker process: arq's Worker with the changes perq needs (arq-notes A.6, A.11, D.4).

- a step's lease is short and renewed while it runs, so a worker killed mid-step hands its step to another
  worker within `PERQ_LEASE_SECONDS`, not after arq's job_timeout + 10 s;
- the poll loop sleeps until the next poll *or* until this worker enqueued a step, so a job's next step
  starts at once instead of after arq's poll delay, and it takes all ready steps in one round trip;
- losing Redis does not kill the worker: it logs, waits and reconnects;
- what Redis forgot is enqueued again from the job store (worker/reconcile.py), and leases are renewed with
  SET, so a Redis that lost them gets back those of the steps still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from typing import Any

from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from arq.worker import Retry, Worker, func
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.config import Settings
from shared.queue import (
    CANCEL_PREFIX,
    STEP_ID_PREFIX,
    STEP_TASK,
    PayloadError,
    StepTask,
    deserialize,
    serialize,
)
from shared.redisurl import redis_settings
from shared.store import JobStore
from worker.heartbeat import heartbeat, new_worker_id
from worker.loop import StepInterrupted
from worker.reconcile import reconcile_forever
from worker.redis_queue import RedisStepQueue
from worker.runtime import UNKNOWN, Runtime
from worker.supervisor import Supervisor, default_processes

log = logging.getLogger("perq.worker")
REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError)
REDIS_DOWN = (*REDIS_ERRORS, OSError)  # in the poll loop, socket errors mean the same
PICK_UP = """
local taken = {}
local room = tonumber(ARGV[3])
for i = 6, #ARGV do
  if #taken >= 3 * room then break end
  local id = ARGV[i]
  local score = redis.call('zscore', KEYS[1], id)
  if score and tonumber(score) <= tonumber(ARGV[1]) and redis.call('exists', KEYS[2] .. id) == 0 then
    redis.call('psetex', KEYS[2] .. id, ARGV[2], ARGV[5])
    local job = string.match(id, '^' .. ARGV[4] .. '([^:]+):')
    local mark = job and redis.call('get', KEYS[3] .. job) or ''
    taken[#taken + 1] = id
    taken[#taken + 1] = score
    taken[#taken + 1] = mark
  end
end
return taken
"""
# renew the leases this worker holds, and only those: a worker that paused past its lease may find that
# another worker has taken the step over, and must not extend that worker's lease as if it were its own
RENEW = """
local renewed = 0
for i, key in ipairs(KEYS) do
  local owner = redis.call('get', key)
  if owner == false or owner == ARGV[2] then
    -- SET, not PEXPIRE: a Redis that lost its data gets the lease of a step still running back
    redis.call('set', key, ARGV[2], 'px', ARGV[1])
    renewed = renewed + 1
  end
end
return renewed
"""
# a step that fails outside the loop (its run could not even be loaded) is tried this often, then its job
# is stopped with the error
STEP_ATTEMPTS = 3
# arq's own timeout must never fire first: a step bounds itself and ends its run with an error instead
ARQ_STEP_TIMEOUT_S = 24 * 3600


async def step(ctx: dict[str, Any], payload: Any) -> None:
    """The arq task: one step of one run. The payload is validated before anything else happens."""
    try:
        task = StepTask.model_validate(payload)
    except Exception as e:
        log.error("rejected queue payload %r: %s", str(payload)[:200], e)
        raise PayloadError(f"invalid step payload: {e}") from e
    runtime: Runtime = ctx["perq"]
    try:
        known = runtime.cancel_marks.pop(ctx.get("job_id", ""), UNKNOWN)
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


class PerqWorker(Worker):
    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        self.settings = settings
        self.wake = asyncio.Event()
        self.fresh: list[str] = []  # arq ids of steps this worker enqueued since its last look
        super().__init__(
            functions=[func(step, name=STEP_TASK, timeout=ARQ_STEP_TIMEOUT_S, max_tries=1000)],
            queue_name=settings.queue,
            redis_settings=redis_settings(settings.redis_url),
            job_serializer=serialize,
            job_deserializer=deserialize,
            keep_result=0,
            poll_delay=settings.poll_delay,
            max_jobs=settings.concurrency,
            job_completion_wait=int(settings.grace_seconds),
            health_check_interval=10,
            on_startup=self._startup,
            on_shutdown=self._shutdown,
            **kwargs,
        )
        self.in_progress_timeout_s = settings.lease_seconds
        # the value of this worker's in-progress keys: whose lease it is
        self.lease_owner = new_worker_id()

    # --- start-up -----------------------------------------------------------------------------------

    async def _startup(self, ctx: dict[str, Any]) -> None:
        ctx["perq"] = Runtime(
            store=JobStore.open(self.settings.storage, fsync=self.settings.store_fsync),
            queue=RedisStepQueue(ctx["redis"], self.settings.queue, self.enqueued),
            pool=_skill_pool(),
            env=dict(os.environ),
        )

    async def _shutdown(self, ctx: dict[str, Any]) -> None:
        runtime: Runtime | None = ctx.get("perq")
        if runtime is not None:
            runtime.close()
        if runtime is not None and runtime.pool is not None:
            close = getattr(runtime.pool, "close", None)
            if close is not None:
                await close()

    # --- the poll loop ------------------------------------------------------------------------------

    async def main(self) -> None:
        while True:
            try:
                await self._main()
                return
            except REDIS_DOWN as e:
                log.warning("redis unreachable (%s); retrying in 1 s", e)
                await asyncio.sleep(1)

    async def _main(self) -> None:
        if self._pool is None:
            from arq.connections import create_pool

            self._pool = await create_pool(
                self.redis_settings,
                job_deserializer=self.job_deserializer,
                job_serializer=self.job_serializer,
                default_queue_name=self.queue_name,
                expires_extra_ms=self.expires_extra_ms,
            )
            self.ctx["redis"] = self._pool
            if self.on_startup:
                await self.on_startup(self.ctx)
            # what start-up made (modules, the skill pool) lives as long as the process: keep it out of the
            # collector's full passes, which each step's allocations trigger (bench: step handoff, +15%)
            gc.collect()
            gc.freeze()
        lease = asyncio.create_task(self._renew_leases())
        # perq: a heartbeat key per worker (worker/heartbeat.py), counted by `perq status --queue`
        beat = asyncio.create_task(heartbeat(self.pool, self.queue_name, self.tasks, self.max_jobs))
        # perq: the queue rebuilt from the store after Redis forgot (worker/reconcile.py)
        mend = asyncio.create_task(
            reconcile_forever(
                self.pool,
                self.ctx["perq"].store,
                self.queue_name,
                period_s=self.settings.reconcile_period,
                settle_s=self.settings.lease_seconds / 2,
                enqueued=self.enqueued,
                errors=REDIS_DOWN,
            )
        )
        loop = asyncio.get_running_loop()
        next_poll = 0.0
        try:
            while True:
                self.wake.clear()
                fresh, self.fresh = self.fresh, []
                try:
                    if loop.time() >= next_poll:
                        next_poll = loop.time() + self.poll_delay_s
                        await self._poll_iteration()
                    elif fresh and self.allow_pick_jobs:
                        # steps this worker just enqueued: take them by id, without reading the queue
                        await self.start_jobs([i.encode() for i in fresh])
                except REDIS_DOWN as e:
                    log.warning("redis unreachable (%s); retrying", e)
                    await asyncio.sleep(1)
                    continue
                if self.burst and await self._burst_done():
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), max(next_poll - loop.time(), 0))
        finally:
            lease.cancel()
            beat.cancel()
            mend.cancel()

    def enqueued(self, arq_ids: list[str]) -> None:
        """This worker's steps enqueued what follows them: look at once (the pick-up script decides)."""
        self.fresh.extend(arq_ids)
        self.wake.set()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """Take ready steps in one round trip: arq's own pick-up costs four round trips per job.

        The script makes, for each id, arq's check (still queued, due, not in progress elsewhere) and sets
        the in-progress key, atomically, so workers sharing the queue never take the same step twice.
        """
        room = self.max_jobs - self.job_counter
        # every id goes to the script, which stops when the room is full: ids ahead in the queue may be
        # running elsewhere, and arq's own loop likewise walks past them
        candidates = [i for i in (j.decode() for j in job_ids) if i not in self.tasks]
        if room <= 0 or not candidates:
            return
        lease_ms = int(self.in_progress_timeout_s * 1000)
        keys = [self.queue_name, in_progress_key_prefix, CANCEL_PREFIX]
        args = [str(timestamp_ms()), str(lease_ms), str(room), STEP_ID_PREFIX, self.lease_owner, *candidates]
        taken: list[bytes] = await self.pool.eval(PICK_UP, 3, *keys, *args)  # type: ignore[misc]
        runtime: Runtime = self.ctx["perq"]
        for job_id_b, score, mark in zip(taken[::3], taken[1::3], taken[2::3], strict=True):
            job_id = job_id_b.decode()
            # the job's cancel mark, read in the same round trip: the step need not ask again
            runtime.cancel_marks[job_id] = int(mark) if mark else None
            await self.sem.acquire()
            self.job_counter += 1
            task = self.loop.create_task(self.run_job(job_id, int(float(score))))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task

    async def _burst_done(self) -> bool:
        if 0 <= self.max_burst_jobs <= self._jobs_started():
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            return True
        if await self.pool.zcard(self.queue_name) == 0:
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            return await self.pool.zcard(self.queue_name) == 0
        return False

    async def _renew_leases(self) -> None:
        """Keep the in-progress key of every running step alive; a dead worker's keys lapse in one lease."""
        lease_ms = int(self.settings.lease_seconds * 1000)
        while True:
            await asyncio.sleep(self.settings.lease_seconds / 3)
            running = [job_id for job_id, t in self.tasks.items() if not t.done()]
            if not running:
                continue
            try:
                keys = [in_progress_key_prefix + job_id for job_id in running]
                await self.pool.eval(RENEW, len(keys), *keys, str(lease_ms), self.lease_owner)  # type: ignore[misc]
            except REDIS_DOWN as e:
                log.warning("could not renew leases: %s", e)


def _skill_pool() -> Any:
    """The MCP skill pool, when the mcp SDK is installed (it is imported only by workers)."""
    try:
        from worker.skills.mcp.pool import McpSkillPool
    except ImportError:
        return None
    return McpSkillPool()


def run_worker(*, burst: bool = False, concurrency: int | None = None, processes: int | None = None) -> None:
    settings = Settings()
    if concurrency is not None:
        settings.worker.concurrency = concurrency
    level = logging.getLevelName(settings.worker.log_level)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    processes = processes or settings.worker.processes or default_processes()
    if processes > 1:
        # one worker per process beside each other, each with its own event loop, leases and heartbeat
        args = [*(["--burst"] if burst else []), "--concurrency", str(settings.worker.concurrency)]
        raise SystemExit(Supervisor(processes, args, burst=burst).run())
    # arq logs two lines per arq job, that is per step: only when asked for DEBUG
    logging.getLogger("arq.worker").setLevel(level if level == logging.DEBUG else max(level, logging.WARNING))
    worker = PerqWorker(settings, burst=burst)
    worker.run()
