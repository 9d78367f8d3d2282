"""The `perq` command line. Imports stay inside the commands, so that `perq --help` starts at once."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from producer.cli import options as opt

app = typer.Typer(
    name="perq",
    help="Run Perstack experts as durable background jobs on arq workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help and errors: typer's rich formatter imports ~70 ms of rich modules (markdown, syntax,
    # traceback) into every `perq --help` and every bad-usage error (bench: CLI start)
    rich_markup_mode=None,
)

EXIT_BAD_INPUT = 2


def fail(message: str, code: int) -> None:
    print(f"perq: {message}", file=sys.stderr)
    raise typer.Exit(code)


def _print_json(data: Any) -> None:
    import json

    print(json.dumps(data, indent=2))


@app.command()
def run(
    expert_key: Annotated[str, typer.Argument(help="Expert to run (a key of perstack.toml)")],
    query: Annotated[
        str, typer.Argument(help="The query (or, with -i, the answer to the waiting tool call)")
    ],
    config: opt.Config = None,
    provider: opt.Provider = None,
    model: opt.Model = None,
    max_steps: opt.MaxSteps = None,
    max_retries: opt.MaxRetries = None,
    timeout: opt.Timeout = None,
    reasoning_budget: opt.ReasoningBudget = None,
    job_id: Annotated[str | None, typer.Option(help="Id for a new job")] = None,
    workspace: opt.Workspace = None,
    continue_latest: opt.ContinueLatest = False,
    continue_job: opt.ContinueJob = None,
    resume_from: opt.ResumeFrom = None,
    interactive: opt.Interactive = False,
    wait: Annotated[bool, typer.Option(help="Follow the job until it stops; exit code tells how")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Enqueue a new job, or a continuation of one. Prints the job id as the last line."""
    import asyncio

    from producer.api import Client, QueueUnavailable, RunRequest
    from shared.config import ConfigError
    from shared.models import now_ms
    from shared.store import StoreError

    request = RunRequest(
        expert_key=expert_key,
        query=query,
        config=config,
        provider=provider,
        model=model,
        max_steps=max_steps,
        max_retries=max_retries,
        timeout=timeout,
        reasoning_budget=reasoning_budget,
        job_id=job_id,
        workspace=workspace,
        continue_latest=continue_latest,
        continue_job=continue_job,
        resume_from=resume_from,
        interactive=interactive,
    )

    async def go() -> int:
        async with Client() as client:
            try:
                submitted_at = now_ms()
                start = await _stream_position(client, request)
                job = await client.submit(request)
            except (ConfigError, ValueError, StoreError) as e:
                fail(str(e), EXIT_BAD_INPUT)
            except QueueUnavailable as e:
                fail(str(e), 1)
            if not wait:
                if json_output:
                    _print_json({"jobId": job.id, "status": job.status})
                else:
                    print(job.id)
                return 0
            from producer.follow import EXIT_CODES
            from producer.views.status import follow_with_progress

            status = await follow_with_progress(
                client, job.id, start, quiet=json_output, submitted_at=submitted_at
            )
            final = client.store.load_job(job.id)
            if json_output:
                data = final.to_dict() if final else {"id": job.id, "status": status}
                _print_json({"jobId": job.id, "status": status, "job": data})
            else:
                print(job.id)
            return EXIT_CODES.get(status, 1)

    raise typer.Exit(asyncio.run(go()))


async def _stream_position(client: Any, request: Any) -> str:
    """Where the job's event stream stands before this submission, so --wait shows only what follows."""
    from shared.models import check_id
    from shared.queue import events_channel

    job_id = check_id(request.continue_job, "job id") if request.continue_job else None
    if not job_id and request.continue_latest:
        latest = client.store.latest_job()
        job_id = latest.id if latest else None
    if not job_id:
        return "0-0"
    redis = await client.redis()
    last = await redis.xrevrange(events_channel(job_id), count=1)
    return last[0][0].decode() if last else "0-0"


@app.command()
def status(
    job_id: Annotated[str | None, typer.Argument(help="Show one job and its checkpoints")] = None,
    limit: Annotated[int, typer.Option(min=0, help="How many jobs to list, newest first (0 = all)")] = 50,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Keep the view current (Ctrl-C ends)")] = False,
    queue: Annotated[
        bool, typer.Option("--queue", help="The queue: waiting and running steps, workers alive (Redis)")
    ] = False,
) -> None:
    """List jobs newest first, or show one job with its checkpoints."""
    if watch or queue:  # live views, in producer/views/watch.py
        from producer.views.watch import status_view

        raise typer.Exit(status_view(job_id, limit=limit, queue=queue, watch=watch, json_output=json_output))
    from producer.views import status as render
    from shared import perstack_layout
    from shared.config import Settings
    from shared.models import check_id
    from shared.store import JobStore, StoreError

    store = JobStore.open(Settings().storage)
    if job_id is None:
        listing = store.list_jobs(limit=limit or None)
        render.job_list(listing, json_output=json_output)
        return
    try:
        job = store.load_job(check_id(job_id, "job id"))
    except (ValueError, StoreError) as e:
        fail(str(e), EXIT_BAD_INPUT)
    if job is None:
        fail(f"job {job_id} not found", EXIT_BAD_INPUT)
    assert job is not None
    checkpoints, problems = store.list_checkpoints(job.id, messages=False)
    # a record Perstack wrote names no head: show the one a continuation would resume
    job.head_checkpoint_id = perstack_layout.head_checkpoint_id(job, checkpoints)
    render.job_detail(job, checkpoints, problems, json_output=json_output)


@app.command()
def cancel(
    job_id: Annotated[str, typer.Argument(help="The job to cancel")],
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Stop a queued or running job (and its delegates) before its next step."""
    import asyncio

    from producer.api import Client, QueueUnavailable
    from shared.config import ConfigError
    from shared.store import StoreError

    async def go() -> None:
        async with Client() as client:
            try:
                job = await client.cancel(job_id)
            except (ConfigError, ValueError, StoreError) as e:
                fail(str(e), EXIT_BAD_INPUT)
            except QueueUnavailable as e:
                fail(str(e), 1)
            if json_output:
                _print_json({"jobId": job.id, "status": job.status})
            else:
                print(f"{job.id} cancelled")

    asyncio.run(go())


@app.command()
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
    from shared.config import Settings
    from shared.models import check_id
    from shared.store import JobStore, StoreError

    if not to:
        fail("--to DIR is needed: the directory to write the jobs into", EXIT_BAD_INPUT)
    if job_ids and all_jobs:
        fail("name jobs or use --all, not both", EXIT_BAD_INPUT)
    store = JobStore.open(Settings().storage)
    destination = Path(to).expanduser()
    jobs = []
    try:
        check_destination(store, destination)
        if all_jobs:  # every job folder: a store Perstack wrote may hold jobs without a record
            for job_id in sorted(store.backend.list("jobs")):
                try:
                    found = find_job(store, job_id)
                except (ValueError, StoreError) as e:
                    print(f"perq: skipped {e}", file=sys.stderr)
                    continue
                if found is not None:
                    jobs.append(found)
        else:
            for job_id in job_ids or []:
                job = find_job(store, check_id(job_id, "job id"))
                if job is None:
                    fail(f"job {job_id} not found", EXIT_BAD_INPUT)
                assert job is not None
                jobs.append(job)
    except (ExportError, ValueError, StoreError) as e:
        fail(str(e), EXIT_BAD_INPUT)
    if not jobs:
        fail("nothing to export: name jobs, or use --all on a store that has jobs", EXIT_BAD_INPUT)
    exported = export_jobs(store, jobs, destination)
    for done in exported:
        for problem in done.problems:
            print(f"perq: skipped {problem}", file=sys.stderr)
    if json_output:
        _print_json(
            {
                "jobs": [
                    {"jobId": d.job_id, "path": str(d.path), "checkpoints": d.checkpoints, "events": d.events}
                    for d in exported
                ]
            }
        )
        return
    for d in exported:
        print(f"{d.job_id}: {d.checkpoints} checkpoints, {d.events} events, {d.runs} runs -> {d.path}")


@app.command()
def worker(
    burst: Annotated[bool, typer.Option(help="Exit when the queue is empty")] = False,
    concurrency: Annotated[
        int | None, typer.Option(help="Steps run at once per process (default 200)")
    ] = None,
    processes: Annotated[
        int | None, typer.Option(min=1, help="Worker processes (PERQ_PROCESSES; default: one per CPU)")
    ] = None,
) -> None:
    """Start workers that run steps from the queue (PERQ_REDIS_URL, PERQ_STORAGE, PERQ_QUEUE)."""
    from worker.main import run_worker

    run_worker(burst=burst, concurrency=concurrency, processes=processes)


@app.command()
def recover(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be re-enqueued")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Re-enqueue the work of queued or running jobs that Redis lost (what workers do every few leases)."""
    from producer.cli.recover import recover as run_recover

    raise typer.Exit(run_recover(dry_run=dry_run, json_output=json_output))


# `perq log` lives in producer/cli/log.py (its options are many); that module imports only typer at load
from producer.cli.log import log as _log  # noqa: E402

app.command(name="log")(_log)

# `perq start`, the terminal UI, is registered from producer/cli/start.py (Textual is imported when it runs)
from producer.cli.start import start as _start  # noqa: E402

app.command(name="start")(_start)


def main() -> None:
    """The console script: whatever escapes a command becomes one line on stderr, never a traceback."""
    try:
        app()
    except (OSError, RuntimeError) as e:
        print(f"perq: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as e:
        from pydantic import ValidationError  # imported only here: `perq --help` must not pay for it

        if not isinstance(e, ValidationError):
            raise
        first = e.errors()[0]  # PERQ_* settings that do not parse
        where = ".".join(str(p) for p in first["loc"])
        print(f"perq: invalid setting PERQ_{where.upper()}: {first['msg']}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
