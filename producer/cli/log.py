"""`perq log`: its options, and how it ties selection, filters, rendering and --follow together.

Which events is `producer.log_query`; how they look is `producer.views.log`; following a job as it runs is
`producer.follow`. Like every command, its imports stay inside the function, so `perq --help` starts at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from producer.cli.exit import ExitCode, exits_on_refusal, fail

if TYPE_CHECKING:
    from producer.log_query import LogFilters
    from shared.config import Settings
    from shared.store import JobStore


def log(
    job_id: Annotated[
        str | None, typer.Argument(metavar="JOB", help="Show the events of this job (as --job)")
    ] = None,
    job: Annotated[str | None, typer.Option(help="Show the events of this job")] = None,
    run: Annotated[str | None, typer.Option(help="Show the events of this run")] = None,
    checkpoint: Annotated[
        str | None, typer.Option(help="Show this checkpoint and the events of its run")
    ] = None,
    messages: Annotated[bool, typer.Option(help="With --checkpoint: a preview of each message")] = False,
    follow: Annotated[
        bool,
        typer.Option("--follow", "-f", help="Print events as they happen, until the job stops"),
    ] = False,
    step: Annotated[str | None, typer.Option(help="Step: N, >N, >=N, <N, <=N or A-B")] = None,
    type_: Annotated[str | None, typer.Option("--type", help="Event type")] = None,
    errors: Annotated[bool, typer.Option(help="Errors only (retry, stopRunByError)")] = False,
    tools: Annotated[
        bool,
        typer.Option(help="Tool events only (callTools, resolveToolResults, callInteractiveTool)"),
    ] = False,
    delegations: Annotated[
        bool, typer.Option(help="Delegation events only (callDelegate, stopRunByDelegate)")
    ] = False,
    filter_: Annotated[
        str | None,
        typer.Option(
            "--filter",
            help="'.path op value': ops == != > >= < <=; '[]' matches any array element, "
            "e.g. '.toolCalls[].toolName == \"exec\"'",
        ),
    ] = None,
    take: Annotated[int, typer.Option(help="Show at most N matches (0 = all)")] = 100,
    offset: Annotated[int, typer.Option(help="Skip the first N matches")] = 0,
    context: Annotated[int, typer.Option(help="Also show N events before and after each match")] = 0,
    summary: Annotated[
        bool, typer.Option(help="Totals: events, errors, tool calls, delegations, steps")
    ] = False,
    verbose: Annotated[bool, typer.Option(help="Tool call arguments in full")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    pretty: Annotated[bool, typer.Option(help="Indent the JSON")] = False,
) -> None:
    """Show a job's events: the latest job's, or the JOB, --run or --checkpoint given (Perstack's log)."""
    if job_id is not None:
        if job is not None and job != job_id:
            fail(f"two jobs given: {job_id} and --job {job}", ExitCode.BAD_INPUT)
        job = job_id
    from producer.log_query import (
        CheckpointNotFound,
        LogError,
        LogFilters,
        LogSelection,
        parse_condition,
        parse_step_filter,
        select,
    )
    from producer.views.log import print_output
    from producer.views.terminal import console
    from shared.config import Settings
    from shared.store import JobStore

    try:
        filters = LogFilters(
            step=parse_step_filter(step) if step is not None else None,
            type=type_,
            errors=errors,
            tools=tools,
            delegations=delegations,
            condition=parse_condition(filter_) if filter_ is not None else None,
            take=take,
            offset=offset,
            context=context,
        )
    except LogError as e:
        fail(str(e), ExitCode.BAD_INPUT)
    settings = Settings()
    store = JobStore.open(settings.store.location)
    if follow:
        if run is not None or checkpoint is not None:
            fail(
                "--follow follows a whole job (--job JOB, or the latest): not --run or --checkpoint",
                ExitCode.BAD_INPUT,
            )
        raise typer.Exit(_follow(settings, store, job, filters, verbose=verbose, json_output=json_output))
    with exits_on_refusal():
        try:
            output = select(store, LogSelection(job=job, run=run, checkpoint=checkpoint), filters)
        except CheckpointNotFound as e:
            fail(str(e), ExitCode.FAILED)
    print_output(
        console(),
        output,
        json_output=json_output,
        pretty=pretty,
        verbose=verbose,
        messages=messages,
        summary=summary,
    )


def _follow(
    settings: Settings,
    store: JobStore,
    job_id: str | None,
    filters: LogFilters,
    *,
    verbose: bool,
    json_output: bool,
) -> ExitCode:
    """`perq log --follow`: the job's events as they happen, from Redis, then its final status.

    The events come from the job's Redis stream, so the follower needs no access to the job store; when its
    store does hold the job, it is used only to pick the job (latest) and to tell whether it still runs.
    """
    import asyncio

    from producer.api import _create_pool_quiet
    from producer.follow import Progress, follow_job
    from producer.log_query import find_job, latest_job
    from producer.views.log import live_printer
    from producer.views.progress import outcome_json, outcome_line, progress_line
    from producer.views.terminal import console, print_json, say
    from shared.models import Event, check_id

    async def go() -> ExitCode:
        with exits_on_refusal():
            if job_id is not None:
                followed = check_id(job_id, "job id")
                record = find_job(store, followed)
            else:
                record = latest_job(store)
                if record is None:
                    fail("no job to follow: the store has no jobs (name one with --job)", ExitCode.BAD_INPUT)
                followed = record.id
        if record is None:
            say(f"job {followed} is not in this store; following its events in Redis")
        with exits_on_refusal():
            redis = await _create_pool_quiet(settings)
        out = console()
        show = live_printer(out, filters, verbose=verbose, json_output=json_output)
        try:
            with progress_line(out, console(stderr=True), f"following job {followed}") as update:

                def on_event(event: Event, progress: Progress) -> None:
                    update(progress.line())
                    show(event)

                status, progress = await follow_job(redis, store, followed, on_event, record=record)
        finally:
            await redis.aclose()
        if json_output:
            print_json(outcome_json(status, followed, progress), indent=None)
        else:
            out.print(outcome_line(status, followed, progress))
        return ExitCode.of_status(status)

    try:
        return asyncio.run(go())
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
