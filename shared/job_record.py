"""The rules of the job record (`job.json`): how each thing that happens to a job changes it.

Pure functions, no I/O: the producer (submit, cancel) and the worker (a step ended, a cancel settled, a
step failed for good) both call these, through `JobStore.update_job`, so the rules exist once. Each takes
the record as stored and returns the record to write, or None to leave it as it is.

Two rules hold across all of them:
- Totals are assigned, never added: `totalSteps` and `usage` come from the latest checkpoint of the main
  chain. Runs of a parallel branch hold deltas that their parent adds once, so they never write totals.
- The record only moves forward within a submission (its `epoch`): a stopped job goes back to `running`
  only through a new submission (a continuation), and a step older than the one the record shows changes
  nothing. A worker that paused past its lease and wakes up late therefore cannot undo a finished job.
"""

from __future__ import annotations

from shared.models import FINAL_JOB_STATUSES, JOB_STATUS_AFTER, Checkpoint, Job, JobStatus, RunError

BUSY_STATUSES: frozenset[str] = frozenset({"queued", "running"})


def _stale(job: Job, epoch: int) -> bool:
    """A run of an earlier submission than the one the record now follows."""
    return job.epoch is not None and epoch < job.epoch


def after_step(
    job: Job,
    end: Checkpoint,
    *,
    epoch: int,
    expert_key: str,
    parallel_branch: bool,
    catch_up: bool = False,
    now: int,
) -> Job | None:
    """A step of a run of expert `expert_key` ended with checkpoint `end`. `catch_up`: the step was found
    finished again (a re-run); it is recorded only if the record has not moved past it."""
    if _stale(job, epoch):
        return None
    stopped = job.status in FINAL_JOB_STATUSES and job.status != "cancelled"
    if stopped or (catch_up and job.head_checkpoint_id == end.id):
        return None
    if end.step_number < job.total_steps and not parallel_branch:
        return None  # a late attempt of an earlier step: the record is past it
    if parallel_branch:
        # a branch's max steps stops the whole job; any other end of a branch goes back to its parent
        if end.status != "stoppedByExceededMaxSteps" or job.status not in BUSY_STATUSES:
            return None
        return job.model_copy(
            update={
                "status": "stoppedByMaxSteps",
                "total_steps": max(job.total_steps, end.step_number),
                "finished_at": now,
            }
        )
    update: dict[str, object] = {"total_steps": end.step_number, "usage": end.usage}
    if end.delegated_by is None and expert_key == job.coordinator_expert_key:
        update["head_checkpoint_id"] = end.id  # the coordinator's own checkpoint: what a continuation resumes
    if job.status == "cancelled":  # the step in flight when the job was cancelled still counts
        return job.model_copy(update=update)
    final: JobStatus | None = JOB_STATUS_AFTER.get(end.status)
    if end.delegated_by is not None and end.status in ("completed", "stoppedByError"):
        final = None  # a delegate's end goes back to its parent, not to the job
    if final is None:
        update |= {"status": "running", "finished_at": None, "error": None}
    else:
        update |= {"status": final, "error": end.error if final == "stoppedByError" else None}
        if final != "stoppedByInteractiveTool":
            update["finished_at"] = now
    return job.model_copy(update=update)


def settle_cancel(job: Job, *, epoch: int, now: int) -> Job | None:
    """The queue refused a run's next step because the job was cancelled: the record says so even if a
    step's write crossed `perq cancel`'s, unless a later submission has taken the job over."""
    if job.epoch != epoch or job.status not in BUSY_STATUSES:
        return None
    return job.model_copy(update={"status": "cancelled", "finished_at": job.finished_at or now})


def cancel(job: Job, *, now: int) -> Job:
    """`perq cancel`: a queued or running job stops before its next step (the caller checked it is busy)."""
    return job.model_copy(update={"status": "cancelled", "finished_at": now})


def fail(job: Job, error: RunError, *, now: int) -> Job | None:
    """A step kept failing outside the loop (damaged store, missing file): the job stops, saying why,
    rather than stay `running` with nothing queued."""
    if job.status not in BUSY_STATUSES:
        return None
    return job.model_copy(update={"status": "stoppedByError", "error": error, "finished_at": now})


def submitted(job: Job, *, epoch: int, start: Checkpoint | None) -> Job:
    """A new job, or a continuation from checkpoint `start`, was accepted: queued under the submission's
    epoch, with the totals of the conversation it goes on from (a branch from an earlier checkpoint
    rewinds them to that checkpoint's)."""
    update: dict[str, object] = {"status": "queued", "finished_at": None, "error": None, "epoch": epoch}
    if start is not None:
        update |= {"total_steps": start.step_number, "usage": start.usage}
    return job.model_copy(update=update)
