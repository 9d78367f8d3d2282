"""What a command that changes something prints when it is done: a job submitted or finished (`perq run`),
cancelled (`perq cancel`), exported (`perq export`), work re-enqueued (`perq recover`).

Each prints one JSON object with --json, else a few plain lines; the job id a script reads is always the
last line of `perq run`. Kept apart from the views that show the store (`status.py`, `log.py`): these are
receipts of one command, not pictures of a job.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from producer.views.terminal import print_json, skipped
from shared.models import Job

if TYPE_CHECKING:
    from producer.export import Exported
    from worker.reconcile import Recovery


def submitted(job: Job, *, json_output: bool) -> None:
    if json_output:
        print_json({"jobId": job.id, "status": job.status})
    else:
        print(job.id)


def finished(job_id: str, status: str, job: Job | None, *, json_output: bool) -> None:
    """`perq run --wait` once the job stopped: the record as the store has it (if it has it)."""
    if json_output:
        data = job.to_dict() if job else {"id": job_id, "status": status}
        print_json({"jobId": job_id, "status": status, "job": data})
    else:
        print(job_id)


def cancelled(job: Job, *, json_output: bool) -> None:
    if json_output:
        print_json({"jobId": job.id, "status": job.status})
    else:
        print(f"{job.id} cancelled")


def exported(done: list[Exported], *, json_output: bool) -> None:
    for d in done:
        skipped(d.problems)
    if json_output:
        rows: list[dict[str, Any]] = [
            {"jobId": d.job_id, "path": str(d.path), "checkpoints": d.checkpoints, "events": d.events}
            for d in done
        ]
        print_json({"jobs": rows})
        return
    for d in done:
        print(f"{d.job_id}: {d.checkpoints} checkpoints, {d.events} events, {d.runs} runs -> {d.path}")


def recovered(found: list[Recovery], *, dry_run: bool, json_output: bool) -> None:
    """Each unit of work re-enqueued (or, with --dry-run, that would be), with the reason the store gives."""
    if json_output:
        print_json({"dryRun": dry_run, "units": [r.to_dict() for r in found]})
        return
    for r in found:
        task = r.unit.task
        print(f"{task.job_id}  step {task.step_number} of run {task.run_id}: {r.outcome} ({r.unit.reason})")
    jobs = len({r.unit.task.job_id for r in found})
    verb = "would re-enqueue" if dry_run else "re-enqueued"
    print(f"{verb} {len(found)} steps of {jobs} jobs" if found else "nothing to recover: no orphaned jobs")
