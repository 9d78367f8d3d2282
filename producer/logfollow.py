"""`perq log --follow`: a job's events as they happen, from Redis, on any machine that reaches it.

The events come from the job's Redis stream, so the follower needs no access to the job store; when its
store does hold the job, it is used only to pick the job (latest) and to tell whether it is still running.
Events are printed as `perq log` prints them (or as JSON lines with --json), with a progress line on the
terminal while the job runs, and a last line with the job's final status.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.live import Live
from rich.spinner import Spinner
from rich.text import Text

from producer.follow import EXIT_CODES, Progress, segment_start, wait_for_job
from producer.log_query import LogFilters, find_job, job_events, latest_job
from producer.views.log import console, print_event, status_style
from producer.views.status import error_line
from shared.config import Settings
from shared.models import FINAL_JOB_STATUSES, Event, check_id
from shared.queue import events_channel
from shared.store import JobStore, StoreError

EXIT_INTERRUPTED = 130


def follow_log(
    store: JobStore, job_id: str | None, filters: LogFilters, *, verbose: bool, json_output: bool
) -> int:
    try:
        return asyncio.run(_follow(store, job_id, filters, verbose=verbose, json_output=json_output))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


async def _follow(
    store: JobStore, job_id: str | None, filters: LogFilters, *, verbose: bool, json_output: bool
) -> int:
    from producer.api import QueueUnavailable, _create_pool_quiet

    try:
        if job_id is not None:
            job_id = check_id(job_id, "job id")
            record = find_job(store, job_id)
        else:
            record = latest_job(store)
            if record is None:
                return error_line("no job to follow: the store has no jobs (name one with --job)", 2)
            job_id = record.id
    except (ValueError, StoreError) as e:
        return error_line(str(e), 2)
    if record is None:
        print(f"perq: job {job_id} is not in this store; following its events in Redis", file=sys.stderr)
    try:
        redis = await _create_pool_quiet(Settings())
    except QueueUnavailable as e:
        return error_line(str(e), 1)

    out = console()
    progress = Progress()

    def show(event: Event) -> None:
        if not filters.matches(event):
            return
        if json_output:
            print(event.to_json())
        else:
            print_event(out, event, verbose=verbose)
        sys.stdout.flush()  # a follower reading our pipe sees each event at once

    try:
        if (
            record is not None
            and record.status in FINAL_JOB_STATUSES
            and not await redis.exists(events_channel(job_id))
        ):
            # the stream has expired: the store still has every event of the stopped job
            for event in job_events(store, job_id, []):
                progress.update(event)
                show(event)
            status: str = record.status
        else:
            running = None if record is None else record.status not in FINAL_JOB_STATUSES
            start = await segment_start(redis, job_id, running=running)
            with progress_line(out, console(stderr=True), f"following job {job_id}") as update:

                def on_event(event: Event, p: Progress) -> None:
                    update(p.line())
                    show(event)

                status = await wait_for_job(redis, store, job_id, on_event, start=start, progress=progress)
    finally:
        await redis.aclose()
    _final_line(out, job_id, status, progress, json_output=json_output)
    return EXIT_CODES.get(status, 1)


def _final_line(out: Console, job_id: str, status: str, progress: Progress, *, json_output: bool) -> None:
    u = progress.usage
    if json_output:
        import json

        data = {"jobId": job_id, "status": status, "steps": progress.step, "usage": u.to_dict()}
        print(json.dumps(data))
        return
    out.print(
        Text.assemble(
            (status, status_style(status)),
            f": {progress.expert or '-'} - {progress.step} steps ({job_id}) "
            f"tokens in {u.input_tokens} out {u.output_tokens}",
        )
    )


@contextmanager
def progress_line(out: Console, err: Console, text: str) -> Iterator[Callable[[str], None]]:
    """A spinner with the job's progress on the terminal, never mixed into a redirected stdout.

    When stdout is the terminal the line lives there and events print above it; when stdout is a file or
    a pipe the line goes to stderr (if that is a terminal) and stdout gets only the events.
    """
    live_console = out if out.is_terminal else err
    spinner = Spinner("dots", text=text)
    with Live(
        spinner,
        console=live_console,
        transient=True,
        redirect_stdout=False,
        redirect_stderr=False,
        refresh_per_second=8,
    ):
        yield lambda line: spinner.update(text=line)
