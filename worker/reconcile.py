"""Reconciliation: the job store is the record of what should run; the queue is rebuilt from it.

Redis can forget (a restart without persistence, a snapshot that missed the last seconds, a failover to a
replica that lagged, a FLUSHALL). The store cannot: every queued or running job has, derivable from its
checkpoints alone, the units of work it waits on. `next_units` derives them for one job; `reconcile`
compares them with the queue and enqueues those that are neither waiting nor leased by a live worker,
through the hand-over workers use, with the same deterministic arq ids, so a race with a live enqueue is a
no-op. `reconcile_forever` is the worker's service: one pass at start-up, then one per period, taken in turn
by whichever worker holds a short lock. A worker's pass derives only the jobs without a step in the queue
(the others have their records read): a worker starting beside a full queue must not spend its first second
reading five files of every queued job (bench: throughput).

What a unit may be:
  - the next step of a run whose latest checkpoint is `proceeding`, or the first step of a run that has
    its initial checkpoint and nothing more;
  - a step that is recorded but whose hand-on never happened (delegates not started, a parent whose
    delegates all finished not resumed, a job record still `running` after its last checkpoint ended the
    job): running such a step again finds its checkpoint and only hands the job on.

A cancelled job is never enqueued; while a step of it may still run, each pass puts its cancel mark back in
a Redis that forgot it, so that step cannot hand the job on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

from shared.models import Checkpoint, Job, derived_id, now_ms
from shared.queue import CANCEL_MARK_TTL_S, STEP_ID_PREFIX, StepTask, cancel_key, step_job_id
from shared.queue.broker import in_progress_key_prefix
from shared.store import JobStore, StoreError
from worker.queue.steps import RedisStepQueue
from worker.step_queue import HandOver

log = logging.getLogger("perq.reconcile")
UNFINISHED = ("queued", "running")
RETURNS_TO_PARENT = ("completed", "stoppedByError")


@dataclass(frozen=True)
class Unit:
    """One unit of work a job waits on: a step to enqueue, and why the store says so."""

    task: StepTask
    reason: str

    @property
    def arq_id(self) -> str:
        return step_job_id(self.task)


@dataclass
class Recovery:
    """A unit found neither queued nor leased, and what became of it."""

    unit: Unit
    epoch: int
    outcome: str  # "enqueued", "would enqueue" (dry run), "refused: cancelled"

    def to_dict(self) -> dict[str, Any]:
        task = self.unit.task
        return {
            "jobId": task.job_id,
            "runId": task.run_id,
            "stepNumber": task.step_number,
            "arqId": self.unit.arq_id,
            "reason": self.unit.reason,
            "outcome": self.outcome,
        }


# --- what a job waits on, from the store alone ------------------------------------------------------


def next_units(store: JobStore, job: Job, *, cancelled: bool = False) -> list[Unit]:
    """The units of work a queued or running job waits on; none for a job in any other status.

    With `cancelled`, also what a cancelled job would wait on: where a step that still runs after the cancel
    is found. Only runs of the job's current submission count (their run setting carries the job's epoch):
    runs of an earlier one were stopped or finished before the job was continued.
    """
    if job.status not in UNFINISHED and not (cancelled and job.status == "cancelled"):
        return []
    checkpoints, _damaged = store.list_checkpoints(job.id, messages=False)
    current: list[str] = []
    for run_id in sorted(store.list_runs(job.id)):
        setting = store.load_run_setting(job.id, run_id)
        if setting is not None and (job.epoch is None or setting.epoch == job.epoch):
            current.append(run_id)
    latest: dict[str, Checkpoint] = {}
    for cp in checkpoints:  # sorted by step number: the last one seen of a run is its latest
        if cp.run_id in current:
            latest[cp.run_id] = cp

    units: list[Unit] = []
    for run_id in current:
        end = latest.get(run_id)
        if end is None:
            # only where the run starts counts, not its conversation (a pass reads every unfinished job)
            initial = store.load_initial_checkpoint(job.id, run_id, messages=False)
            if initial is not None:
                units.append(_unit(job.id, run_id, initial.step_number, "the run's first step is not queued"))
            # a run setting without an initial checkpoint: the step that began the run begins it again
            continue
        if end.status == "proceeding":
            units.append(
                _unit(
                    job.id,
                    run_id,
                    end.step_number + 1,
                    f"step {end.step_number} is recorded, step {end.step_number + 1} is not queued",
                )
            )
        elif end.status == "stoppedByDelegate":
            units += _after_delegation(store, job.id, end, latest)
        elif end.delegated_by is not None and end.status in RETURNS_TO_PARENT:
            continue  # the parent's checkpoint decides whether its resumption is missing
        else:
            # completed, stopped on an error, max steps or an interactive tool: the job should have settled
            units.append(
                _unit(
                    job.id,
                    run_id,
                    end.step_number,
                    f"step {end.step_number} ended the job ({end.status}) but its record says {job.status}",
                )
            )
    return units


def _unit(job_id: str, run_id: str, step_number: int, reason: str) -> Unit:
    return Unit(StepTask(job_id=job_id, run_id=run_id, step_number=step_number), reason)


def _begun(store: JobStore, job_id: str, run_id: str, latest: dict[str, Checkpoint]) -> bool:
    return run_id in latest or store.load_initial_checkpoint(job_id, run_id, messages=False) is not None


def _after_delegation(
    store: JobStore, job_id: str, parent: Checkpoint, latest: dict[str, Checkpoint]
) -> list[Unit]:
    """A checkpoint that delegated: its delegates not started, or all finished and the parent not resumed.

    Run ids are the ones the runtime derives: a delegate's from the parent checkpoint and the tool call,
    a parallel set's resumption from the parent checkpoint, a single delegate's from its last run.
    """
    targets = parent.delegate_to or []
    step = parent.step_number
    children = [derived_id("delegate", parent.id, t.tool_call_id) for t in targets]
    if not all(_begun(store, job_id, run_id, latest) for run_id in children):
        return [
            _unit(job_id, parent.run_id, step, f"step {step} delegated, but its delegates were not started")
        ]
    # the last checkpoint of each delegate's chain of runs returns to this parent
    ends = {
        cp.delegated_by.tool_call_id: cp
        for cp in latest.values()
        if cp.delegated_by is not None
        and cp.delegated_by.checkpoint_id == parent.id
        and cp.status in RETURNS_TO_PARENT
    }
    if not targets or len(ends) < len(targets):
        return []  # delegates still at work: their own runs say what they wait on
    if len(targets) > 1:
        resume = derived_id("fan-in", parent.id)
    else:
        resume = derived_id("return", ends[targets[0].tool_call_id].run_id)
    if _begun(store, job_id, resume, latest):
        return []  # the resumption is a run of its own
    # a delegate that ends again leaves its result (if lost) and resumes the parent once all are in
    reported = set()
    for data in store.load_fan_in_results(job_id, parent.id):
        try:
            reported.add(json.loads(data)["toolCallId"])
        except (ValueError, KeyError, TypeError):
            continue
    rerun = [cp for call, cp in ends.items() if call not in reported] if len(targets) > 1 else []
    rerun = rerun or [max(ends.values(), key=lambda cp: cp.step_number)]
    why = f"the delegates of step {step} finished, but it was not resumed"
    return [_unit(job_id, cp.run_id, cp.step_number, why) for cp in rerun]


# --- against the queue ------------------------------------------------------------------------------


async def _missing(redis: Any, queue_name: str, units: list[Unit]) -> list[Unit]:
    """The units neither waiting in the queue nor leased (a worker's in-progress key)."""
    if not units:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for unit in units:
            pipe.zscore(queue_name, unit.arq_id)
            pipe.exists(in_progress_key_prefix + unit.arq_id)
        replies = await pipe.execute()
    return [
        unit
        for unit, score, leased in zip(units, replies[::2], replies[1::2], strict=True)
        if score is None and not leased
    ]


def _derive(
    store: JobStore, job_ids: Iterable[str], queued: Collection[str] = ()
) -> dict[str, tuple[Job, list[Unit] | None]]:
    """Each unfinished (or cancelled, unsettled) job's record and units; a job in `queued` has its record
    read and its units not derived (None)."""
    found: dict[str, tuple[Job, list[Unit] | None]] = {}
    for job_id in job_ids:
        try:
            job = store.load_job(job_id)
            if job is not None and (job.status in UNFINISHED or job.status == "cancelled"):
                units = None if job_id in queued else next_units(store, job, cancelled=True)
                found[job_id] = (job, units)
        except (StoreError, ValueError) as e:  # one damaged job must not stop the others' recovery
            log.warning("cannot reconcile job %s: %s", job_id, e)
    return found


async def _queued_jobs(redis: Any, queue_name: str) -> set[str]:
    """The jobs with a step in the queue: waiting, or running (arq keeps a step there until it finishes)."""
    members = [m.decode() if isinstance(m, bytes) else m for m in await redis.zrange(queue_name, 0, -1)]
    return {m.removeprefix(STEP_ID_PREFIX).partition(":")[0] for m in members if m.startswith(STEP_ID_PREFIX)}


@dataclass
class Look:
    """The jobs read from the store (unfinished and cancelled-not-settled), and what Redis holds of them."""

    jobs: dict[str, Job]
    missing: list[Unit]  # units of unfinished jobs neither queued nor leased
    busy: set[str]  # jobs with a unit queued or leased (not thorough: with a step in the queue)


async def _look(
    redis: Any, store: JobStore, queue_name: str, job_ids: list[str], *, thorough: bool = True
) -> Look:
    """What the store says the jobs wait on, against the queue. Not `thorough`: a job with a step in the queue
    is taken as busy without deriving its units (a fifth of the reads): a job moves on from a step it has,
    and one whose steps were partly lost (a parallel delegate) is derived once its others are done."""
    queued = set() if thorough or not job_ids else await _queued_jobs(redis, queue_name)
    derived = await asyncio.to_thread(_derive, store, job_ids, queued)  # store reads never block the loop
    units = [u for _job, job_units in derived.values() for u in job_units or ()]
    missing = {u.arq_id for u in await _missing(redis, queue_name, units)}
    jobs = {k: job for k, (job, _u) in derived.items()}
    return Look(
        jobs=jobs,
        missing=[u for u in units if u.arq_id in missing and jobs[u.task.job_id].status in UNFINISHED],
        busy={u.task.job_id for u in units if u.arq_id not in missing}
        | {k for k, (_job, job_units) in derived.items() if job_units is None},
    )


async def _restore_cancel_marks(redis: Any, jobs: list[Job]) -> None:
    """A cancelled job's mark in Redis is what stops a step still running from handing the job on: a Redis
    that forgot it gets it back (the time of the cancel; a newer mark is kept)."""
    async with redis.pipeline(transaction=False) as pipe:
        for job in jobs:
            mark = str(job.finished_at or now_ms())
            pipe.set(cancel_key(job.id), mark, nx=True, ex=CANCEL_MARK_TTL_S)
        await pipe.execute()


async def reconcile(
    redis: Any,
    store: JobStore,
    queue_name: str,
    *,
    settle_s: float,
    dry_run: bool = False,
    enqueued: Callable[[list[str]], None] | None = None,
    thorough: bool = True,
) -> list[Recovery]:
    """One pass: enqueue every unit of an unfinished job that is neither queued nor leased.

    A unit must be missing twice, `settle_s` apart, with the store read again in between: after Redis lost
    its data, live workers re-assert the leases of the steps they run within a third of a lease, and a step
    that was handing its job on when the store was read has finished doing so. Cancelled jobs stay in the
    store's index of unfinished jobs until a pass sees nothing of theirs running, twice; until then each pass
    puts their cancel mark back in Redis if it is gone.

    Not `thorough` (the workers' passes): the first look derives only the jobs without a step in the queue
    (see `_look`); a worker starting beside a full queue reads one record per job, not five files.
    """
    unfinished = await asyncio.to_thread(store.list_unfinished)
    first = await _look(redis, store, queue_name, unfinished, thorough=thorough)
    cancelled = [job for job in first.jobs.values() if job.status == "cancelled"]
    if cancelled and not dry_run:
        await _restore_cancel_marks(redis, cancelled)
    idle = {job.id for job in cancelled if job.id not in first.busy}
    if not first.missing and not idle:
        return []
    await asyncio.sleep(settle_s)
    again = await _look(redis, store, queue_name, sorted({u.task.job_id for u in first.missing} | idle))
    if not dry_run:
        for job_id in sorted(idle):
            job = again.jobs.get(job_id)
            if job is not None and job.status == "cancelled" and job_id not in again.busy:
                await asyncio.to_thread(store.settle_unfinished, job_id)
    suspects = {u.arq_id for u in first.missing}
    missing = [u for u in again.missing if u.arq_id in suspects]
    queue = RedisStepQueue(redis, queue_name, enqueued or (lambda _ids: None))
    recoveries: list[Recovery] = []
    for job_id in sorted({u.task.job_id for u in missing}):
        job = again.jobs[job_id]
        units = [u for u in missing if u.task.job_id == job_id]
        epoch = job.epoch or 0
        outcome = "would enqueue"
        if not dry_run:
            # the workers' own hand-over: a live duplicate id is a no-op, a cancelled job refuses
            refused = await queue.hand_over(HandOver(job_id, epoch, tasks=[u.task for u in units]))
            outcome = "refused: cancelled" if refused else "enqueued"
        recoveries += [Recovery(unit=u, epoch=epoch, outcome=outcome) for u in units]
    return recoveries


# a workers' pass derives every unfinished job at least this often (in periods): see `reconcile_forever`
THOROUGH_EVERY = 10


def lock_key(queue_name: str) -> str:
    return f"perq:reconcile:{queue_name}"


async def reconcile_forever(
    redis: Any,
    store: JobStore,
    queue_name: str,
    *,
    period_s: float,
    settle_s: float,
    enqueued: Callable[[list[str]], None],
    errors: tuple[type[BaseException], ...] = (),
) -> None:
    """A worker's service: a pass at start-up, then one per period across all workers of the queue.

    The lock is taken for a period and never released, so however many workers there are, one pass runs per
    period; a worker that dies mid-pass leaves the lock to expire. A pass derives only the jobs with no step
    in the queue (`reconcile`, not thorough), except one every `THOROUGH_EVERY` periods across the queue's
    workers (never a worker's start-up pass): a step lost beside another still queued (a parallel delegate,
    a step of an earlier submission) waits at most that long.
    """
    starting = True
    while True:
        try:
            if await redis.set(lock_key(queue_name), b"1", nx=True, px=int(period_s * 1000)):
                every = int(THOROUGH_EVERY * period_s * 1000)
                thorough_key = f"{lock_key(queue_name)}:thorough"
                thorough = not starting and bool(await redis.set(thorough_key, b"1", nx=True, px=every))
                try:
                    found = await reconcile(
                        redis, store, queue_name, settle_s=settle_s, enqueued=enqueued, thorough=thorough
                    )
                except Exception:
                    if thorough:  # not done: the next pass is thorough again
                        with contextlib.suppress(*errors, Exception):
                            await redis.delete(thorough_key)
                    raise
                for r in found:
                    task = r.unit.task
                    log.warning(
                        "job %s: step %s of run %s %s (%s)",
                        task.job_id,
                        task.step_number,
                        task.run_id,
                        r.outcome,
                        r.unit.reason,
                    )
        except errors as e:
            log.warning("reconciliation skipped, redis unreachable: %s", e)
        except Exception:  # a bug or a damaged store must not stop the worker, nor the next pass
            log.exception("reconciliation failed")
        starting = False
        await asyncio.sleep(period_s)
