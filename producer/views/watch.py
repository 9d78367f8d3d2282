"""`perq status --watch` and `perq status --queue`: views kept current on the terminal (rich Live).

A view is a function that reads the store (or Redis) and returns what to draw; `keep_current` redraws it
about once a second until Ctrl-C, which ends the command normally (exit 0).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from producer.follow import REDIS_ERRORS
from producer.views.status import STATUS_STYLE, error_line
from shared.config import Settings
from shared.models import Job, check_id
from shared.store import JobStore, Listing, StoreError

REFRESH_S = 1.0


def status_view(job_id: str | None, *, limit: int, queue: bool, watch: bool, json_output: bool) -> int:
    """The exit code of `perq status` with --queue and/or --watch."""
    if watch and json_output:
        return error_line("--watch keeps a table on the terminal; use --json without --watch", 2)
    settings = Settings()
    # Ctrl-C ends a live view even when this process was started with SIGINT ignored (`cmd &` in a script)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if queue:
            return asyncio.run(_queue(settings, watch=watch, json_output=json_output))
        store = JobStore.open(settings.storage)
        if job_id is not None:
            job_id = check_id(job_id, "job id")
            if store.load_job(job_id) is None:
                return error_line(f"job {job_id} not found", 2)
            one: str = job_id
            return keep_current(lambda: job_view(store, one))
        return keep_current(lambda: jobs_view(store.list_jobs(limit=limit or None)))
    except (ValueError, StoreError) as e:
        return error_line(str(e), 2)
    except KeyboardInterrupt:
        return 0


def keep_current(frame: Callable[[], RenderableType], interval_s: float = REFRESH_S) -> int:
    """Redraw `frame()` every `interval_s` until Ctrl-C."""
    try:
        with Live(frame(), console=Console(highlight=False), auto_refresh=False) as live:
            while True:
                time.sleep(interval_s)
                live.update(frame(), refresh=True)
    except KeyboardInterrupt:
        return 0


async def keep_current_async(frame: Callable[[], Awaitable[RenderableType]]) -> int:
    with Live(await frame(), console=Console(highlight=False), auto_refresh=False) as live:
        while True:
            await asyncio.sleep(REFRESH_S)
            live.update(await frame(), refresh=True)


async def _queue(settings: Settings, *, watch: bool, json_output: bool) -> int:
    import json

    from producer.api import QueueUnavailable, _create_pool_quiet
    from producer.views.queue import queue_stats, render

    try:
        redis = await _create_pool_quiet(settings)
    except QueueUnavailable as e:
        return error_line(str(e), 1)
    try:
        if json_output:
            print(json.dumps((await queue_stats(redis, settings.queue)).to_dict(), indent=2))
            return 0

        async def frame() -> RenderableType:
            try:
                body = render(await queue_stats(redis, settings.queue))
            except REDIS_ERRORS as e:
                if not watch:
                    raise
                # a live view outlives a Redis restart or failover: it says so and redraws when Redis is back
                body = Text(f"Redis unreachable ({e}); retrying", style="red")
            return _titled("queue", body, watch)

        if not watch:
            Console(highlight=False).print(await frame())
            return 0
        return await keep_current_async(frame)
    finally:
        await redis.aclose()


# --- views ----------------------------------------------------------------------------------------


def _jobs_table() -> Table:
    table = Table(box=None, header_style="bold")
    # ids, statuses and times never wrap or shorten; the expert name may wrap on a narrow terminal
    for column in ("status", "job", "expert", "steps", "started", "finished", "tokens in/out"):
        table.add_column(column, no_wrap=column != "expert", min_width=len(column) if column != "job" else 24)
    return table


def jobs_view(listing: Listing) -> RenderableType:
    table = _jobs_table()
    for job in listing.jobs:
        table.add_row(*_job_row(job))
    more = listing.total - len(listing.jobs)
    parts: list[RenderableType] = [table if listing.jobs else Text("No jobs found")]
    if more > 0:
        parts.append(Text(f"... {more} older jobs not shown (--limit 0 for all)", style="dim"))
    return _titled(f"{listing.total} jobs", Group(*parts), True)


def job_view(store: JobStore, job_id: str) -> RenderableType:
    job = store.load_job(job_id)
    if job is None:
        return Text(f"job {job_id} not found")
    head = _jobs_table()
    head.add_row(*_job_row(job))
    checkpoints, _ = store.list_checkpoints(job_id, messages=False)
    steps = Table(box=None, header_style="bold")
    for column in ("step", "checkpoint", "status", "expert"):
        steps.add_column(column)
    for cp in checkpoints:
        steps.add_row(str(cp.step_number), cp.id, cp.status, cp.expert.key)
    parts: list[RenderableType] = [head, Text("")]
    if job.error:
        parts += [Text(f"error: {job.error.name}: {job.error.message}", style="red"), Text("")]
    return _titled(f"job {job_id}", Group(*parts, steps), True)


def _job_row(job: Job) -> list[Any]:
    u = job.usage
    return [
        Text(job.status, style=STATUS_STYLE.get(job.status, "")),
        job.id,
        job.coordinator_expert_key,
        str(job.total_steps),
        _time(job.started_at),
        _time(job.finished_at),
        f"{u.input_tokens}/{u.output_tokens}",
    ]


def _titled(title: str, body: RenderableType, live: bool) -> RenderableType:
    now = datetime.now().strftime("%H:%M:%S")
    hint = "  (Ctrl-C to stop)" if live else ""
    return Group(Text(f"perq {title} at {now}{hint}", style="bold"), body)


def _time(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%m-%d %H:%M:%S") if ms else "-"
