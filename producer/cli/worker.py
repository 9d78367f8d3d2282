"""`perq worker`: start the workers of `worker/` (the only command that imports the worker at all)."""

from __future__ import annotations

from typing import Annotated

import typer


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
