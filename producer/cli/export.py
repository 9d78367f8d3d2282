"""`perq export`: write jobs in Perstack's own layout; the writing is `producer.export`, this is the choice
of jobs and destination, and what goes wrong with them."""

from __future__ import annotations

from typing import Annotated

import typer

from producer.cli.exit import ExitCode, fail


def export(
    job_ids: Annotated[list[str] | None, typer.Argument(metavar="JOB", help="The jobs to export")] = None,
    to: Annotated[str, typer.Option("--to", help="Directory to write into (DIR/jobs/{jobId}/...)")] = "",
    all_jobs: Annotated[bool, typer.Option("--all", help="Export every job of the store")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Write jobs in Perstack's own layout (whole checkpoints, one file per event), without secrets."""
    from pathlib import Path

    from producer.export import ExportError, check_destination, export_jobs
    from producer.log_query import find_job
    from producer.views import report
    from producer.views.terminal import say
    from shared.config import Settings
    from shared.models import Job, check_id
    from shared.store import JobStore, StoreError

    if not to:
        fail("--to DIR is needed: the directory to write the jobs into", ExitCode.BAD_INPUT)
    if job_ids and all_jobs:
        fail("name jobs or use --all, not both", ExitCode.BAD_INPUT)
    store = JobStore.open(Settings().store.location)
    destination = Path(to).expanduser()
    jobs: list[Job] = []
    try:
        check_destination(store, destination)
        if all_jobs:  # every job folder: a store Perstack wrote may hold jobs without a record
            for job_id in sorted(store.backend.list("jobs")):
                try:
                    found = find_job(store, job_id)
                except (ValueError, StoreError) as e:
                    say(f"skipped {e}")
                    continue
                if found is not None:
                    jobs.append(found)
        else:
            for job_id in job_ids or []:
                job = find_job(store, check_id(job_id, "job id"))
                if job is None:
                    fail(f"job {job_id} not found", ExitCode.BAD_INPUT)
                jobs.append(job)
    except (ExportError, ValueError, StoreError) as e:
        fail(str(e), ExitCode.BAD_INPUT)
    if not jobs:
        fail("nothing to export: name jobs, or use --all on a store that has jobs", ExitCode.BAD_INPUT)
    report.exported(export_jobs(store, jobs, destination), json_output=json_output)
