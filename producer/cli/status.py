"""`perq status`: the job list, one job with its checkpoints, the queue (--queue); once, or kept current
on the terminal (--watch). What is drawn is `producer.views.status`, `.watch` and `.queue`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import typer

from producer.cli.exit import ExitCode, exits_on_refusal, fail

if TYPE_CHECKING:
    from rich.console import RenderableType

    from shared.config import Settings


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
    from shared import perstack_layout
    from shared.config import Settings
    from shared.models import check_id
    from shared.store import JobStore

    if watch and json_output:
        fail("--watch keeps a table on the terminal; use --json without --watch", ExitCode.BAD_INPUT)
    settings = Settings()
    if watch or queue:
        import signal

        # Ctrl-C ends a live view even when this process was started with SIGINT ignored (`cmd &` in a script)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if queue:
        _queue(settings, watch=watch, json_output=json_output)
        return
    store = JobStore.open(settings.store.location)
    if job_id is None:
        if watch:
            from producer.views.watch import jobs_view

            _until_interrupted(lambda: jobs_view(store.list_jobs(limit=limit or None)))
            return
        from producer.views import status as render

        render.job_list(store.list_jobs(limit=limit or None), json_output=json_output)
        return
    with exits_on_refusal():
        job = store.load_job(check_id(job_id, "job id"))
    if job is None:
        fail(f"job {job_id} not found", ExitCode.BAD_INPUT)
    if watch:
        from producer.views.watch import job_view

        shown = job.id
        _until_interrupted(lambda: job_view(store, shown))
        return
    from producer.views import status as render

    checkpoints, problems = store.list_checkpoints(job.id, messages=False)
    # a record Perstack wrote names no head: show the one a continuation would resume
    job.head_checkpoint_id = perstack_layout.head_checkpoint_id(job, checkpoints)
    render.job_detail(job, checkpoints, problems, json_output=json_output)


def _until_interrupted(frame: Callable[[], RenderableType]) -> None:
    """Keep `frame` drawn and current until Ctrl-C, which ends the command normally."""
    from producer.views.watch import keep_current

    with exits_on_refusal():  # a record the store can no longer read, while the view runs
        try:
            keep_current(frame)
        except KeyboardInterrupt:
            return


def _queue(settings: Settings, *, watch: bool, json_output: bool) -> None:
    """`perq status --queue`: the queue's counts from Redis, once (as a table or JSON) or kept current."""
    import asyncio

    from producer.api import _create_pool_quiet
    from producer.views.queue import queue_stats
    from producer.views.terminal import console, print_json
    from producer.views.watch import keep_current_async, queue_frame

    async def go() -> None:
        with exits_on_refusal():
            redis = await _create_pool_quiet(settings)
        try:
            if json_output:
                print_json((await queue_stats(redis, settings.redis.queue)).to_dict())
            elif watch:
                await keep_current_async(lambda: queue_frame(redis, settings.redis.queue, live=True))
            else:
                console(soft_wrap=False).print(await queue_frame(redis, settings.redis.queue, live=False))
        finally:
            await redis.aclose()

    try:
        asyncio.run(go())
    except KeyboardInterrupt:
        return
