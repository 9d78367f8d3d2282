"""The worker process's entry point: settings, logging, the hand-off to the supervisor, the step runtime.

`perq worker` calls `run_worker`. With several processes it hands them to the supervisor; with one it makes
the step runtime (the job store, the MCP skill pool) and serves the queue (`worker/queue/`, the room that
talks to arq) until a burst drains it or a signal stops it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
from collections.abc import Callable
from typing import Any

from shared.config import Settings
from shared.store import JobStore
from worker.runtime import Runtime
from worker.step_queue import StepQueue
from worker.supervisor import Supervisor, default_processes


def _skill_pool(settings: Settings) -> Any:
    """The MCP skill pool, when the mcp SDK is installed (the pool imports it when a server first starts)."""
    if importlib.util.find_spec("mcp") is None:
        return None
    from worker.skills.mcp.pool import McpSkillPool

    return McpSkillPool(settings=settings.mcp)


def runtime_maker(settings: Settings) -> Callable[[StepQueue], Runtime]:
    """What runs a step, once the worker's queue exists: the store, the skill pool, the environment."""

    def make(queue: StepQueue) -> Runtime:
        return Runtime(
            store=JobStore.open(settings.store.location, fsync=settings.store.fsync),
            queue=queue,
            pool=_skill_pool(settings),
            env=dict(os.environ),
        )

    return make


def run_worker(*, burst: bool = False, concurrency: int | None = None, processes: int | None = None) -> None:
    settings = Settings()
    if concurrency is not None:
        settings.worker.concurrency = concurrency
    level = logging.getLevelName(settings.worker.log_level)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    processes = processes or settings.worker.processes or default_processes()
    if processes > 1:
        # one worker per process beside each other, each with its own event loop, leases and heartbeat
        args = [*(["--burst"] if burst else []), "--concurrency", str(settings.worker.concurrency)]
        raise SystemExit(Supervisor(processes, args, burst=burst).run())
    # arq logs two lines per arq job, that is per step: only when asked for DEBUG
    logging.getLogger("arq.worker").setLevel(level if level == logging.DEBUG else max(level, logging.WARNING))
    from worker.queue.worker import serve  # arq is imported by the worker's queue room, here at the latest

    asyncio.run(serve(settings, runtime_maker(settings), burst=burst))
