"""`perq status --watch` and `perq status --queue`: views kept current on the terminal (rich Live).

A view is a function that reads the store (or Redis) and returns what to draw; `keep_current` redraws it
about once a second until Ctrl-C. Kept apart from `status.py`, which prints once: these tables are made to
be redrawn, and carry the time they were drawn at.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from producer.views.clock import SHORT_DATE_TIME, now, timestamp
from producer.views.status import STATUS_STYLE
from producer.views.terminal import console
from shared.models import Job
from shared.store import JobStore, Listing

REFRESH_S = 1.0


def keep_current(frame: Callable[[], RenderableType], interval_s: float = REFRESH_S) -> None:
    """Redraw `frame()` every `interval_s` until Ctrl-C (KeyboardInterrupt, for the command to end on)."""
    # wrapped to the terminal's width: Live redraws in place only what fits in its lines
    with Live(frame(), console=console(soft_wrap=False), auto_refresh=False) as live:
        while True:
            time.sleep(interval_s)
            live.update(frame(), refresh=True)


async def keep_current_async(frame: Callable[[], Awaitable[RenderableType]]) -> None:
    """`keep_current` for a view that reads Redis."""
    with Live(await frame(), console=console(soft_wrap=False), auto_refresh=False) as live:
        while True:
            await asyncio.sleep(REFRESH_S)
            live.update(await frame(), refresh=True)


async def queue_frame(redis: Any, queue: str, *, live: bool) -> RenderableType:
    """The queue's counts under a title; in a live view, a Redis that cannot be reached is said instead."""
    from producer.follow import REDIS_ERRORS
    from producer.views.queue import queue_stats, render

    try:
        body = render(await queue_stats(redis, queue))
    except REDIS_ERRORS as e:
        if not live:
            raise
        # a live view outlives a Redis restart or failover: it says so and redraws when Redis is back
        body = Text(f"Redis unreachable ({e}); retrying", style="red")
    return titled("queue", body, live)


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
    return titled(f"{listing.total} jobs", Group(*parts), True)


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
    return titled(f"job {job_id}", Group(*parts, steps), True)


def _job_row(job: Job) -> list[Any]:
    u = job.usage
    return [
        Text(job.status, style=STATUS_STYLE.get(job.status, "")),
        job.id,
        job.coordinator_expert_key,
        str(job.total_steps),
        timestamp(job.started_at, SHORT_DATE_TIME),
        timestamp(job.finished_at, SHORT_DATE_TIME),
        f"{u.input_tokens}/{u.output_tokens}",
    ]


def titled(title: str, body: RenderableType, live: bool) -> RenderableType:
    hint = "  (Ctrl-C to stop)" if live else ""
    return Group(Text(f"perq {title} at {now()}{hint}", style="bold"), body)
