"""`perq run`: enqueue a job or a continuation; with --wait, follow it and exit with its outcome.

Its run options are shared with `perq start` (`producer.cli.options`); the following is `producer.follow`
and what it shows on stderr is `producer.views.progress`.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from producer.cli import options as opt
from producer.cli.exit import ExitCode, exits_on_refusal


@opt.run_options
def run(
    expert_key: Annotated[str, typer.Argument(help="Expert to run (a key of perstack.toml)")],
    query: Annotated[
        str, typer.Argument(help="The query (or, with -i, the answer to the waiting tool call)")
    ],
    options: dict[str, Any],
    wait: Annotated[bool, typer.Option(help="Follow the job until it stops; exit code tells how")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Enqueue a new job, or a continuation of one. Prints the job id as the last line."""
    import asyncio

    from producer.api import Client, RunRequest
    from producer.follow import stream_position
    from producer.views import report
    from shared.models import now_ms

    request = RunRequest(expert_key=expert_key, query=query, **options)

    async def go() -> ExitCode:
        async with Client() as client:
            with exits_on_refusal():
                submitted_at = now_ms()
                start = await stream_position(client, request)
                job = await client.submit(request)
            if not wait:
                report.submitted(job, json_output=json_output)
                return ExitCode.OK
            status = await _wait(client, job.id, start, quiet=json_output, submitted_at=submitted_at)
            report.finished(job.id, status, client.store.load_job(job.id), json_output=json_output)
            return ExitCode.of_status(status)

    raise typer.Exit(asyncio.run(go()))


async def _wait(client: Any, job_id: str, start: str, *, quiet: bool, submitted_at: int) -> str:
    """Follow the job from `start` until it stops, showing its progress on stderr unless `quiet`; return its
    final status. A cancel mark older than `submitted_at` stopped an earlier submission, not this one."""
    from contextlib import nullcontext

    from producer.follow import Progress, follow_job
    from producer.views.progress import event_line, outcome_line, progress_line
    from producer.views.terminal import console
    from shared.models import Event

    err = console(stderr=True)
    with nullcontext(None) if quiet else progress_line(err, err, f"job {job_id} queued") as update:

        def on_event(event: Event, progress: Progress) -> None:
            if update is None:
                return
            update(progress.line())
            line = event_line(event)
            if line is not None:
                err.print(line)

        redis = await client.redis()
        status, progress = await follow_job(
            redis, client.store, job_id, on_event, start=start, cancelled_since=submitted_at
        )
    if not quiet:
        err.print(outcome_line(status, job_id, progress, client.store.load_job(job_id)))
    return status
