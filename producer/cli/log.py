"""The `perq log` command: its options, and how it ties selection, filters, rendering and --follow together.

Kept apart from producer/cli.py so that the command's many options live with it; like every command, its
imports stay inside the function, so `perq --help` starts at once.
"""

from __future__ import annotations

from typing import Annotated

import typer


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
    import sys

    from producer.cli import EXIT_BAD_INPUT, fail

    if job_id is not None:
        if job is not None and job != job_id:
            fail(f"two jobs given: {job_id} and --job {job}", EXIT_BAD_INPUT)
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
    from producer.views.log import console, print_log, render_json
    from shared.config import Settings
    from shared.store import JobStore, StoreError

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
        fail(str(e), EXIT_BAD_INPUT)
    store = JobStore.open(Settings().storage)
    if follow:
        from producer.logfollow import follow_log

        if run is not None or checkpoint is not None:
            fail("--follow follows a whole job (--job JOB, or the latest): not --run or --checkpoint", 2)
        raise typer.Exit(follow_log(store, job, filters, verbose=verbose, json_output=json_output))
    try:
        output = select(store, LogSelection(job=job, run=run, checkpoint=checkpoint), filters)
    except CheckpointNotFound as e:
        fail(str(e), 1)
    except (ValueError, StoreError) as e:
        fail(str(e), EXIT_BAD_INPUT)
    if output is None:
        print("No data found")
        return
    for problem in output.problems:
        print(f"perq: skipped {problem}", file=sys.stderr)
    if json_output:
        print(render_json(output, pretty=pretty))
    else:
        print_log(console(), output, verbose=verbose, messages=messages, summary=summary)
