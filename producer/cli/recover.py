"""`perq recover`: the workers' reconciliation, on demand, for an operator.

It compares the store's unfinished jobs with the queue and enqueues every unit of work that is neither
waiting nor leased (`--dry-run`: only says which), printing each with the reason the store gives. It waits
half a lease between its two looks at the queue, so that a step a live worker holds is never mistaken for
an orphan.
"""

from __future__ import annotations

import asyncio
import json

from producer.views.status import error_line
from shared.config import Settings
from shared.store import JobStore


def recover(*, dry_run: bool, json_output: bool) -> int:
    """The exit code of `perq recover`: 0 when done (whether or not anything was orphaned)."""
    from producer.api import QueueUnavailable, _create_pool_quiet
    from worker.reconcile import reconcile

    settings = Settings()
    store = JobStore.open(settings.storage)

    async def go() -> int:
        try:
            redis = await _create_pool_quiet(settings)
        except QueueUnavailable as e:
            return error_line(str(e), 1)
        try:
            found = await reconcile(
                redis, store, settings.queue, settle_s=settings.lease_seconds / 2, dry_run=dry_run
            )
        finally:
            await redis.aclose()
        if json_output:
            print(json.dumps({"dryRun": dry_run, "units": [r.to_dict() for r in found]}, indent=2))
            return 0
        for r in found:
            task = r.unit.task
            print(
                f"{task.job_id}  step {task.step_number} of run {task.run_id}: {r.outcome} ({r.unit.reason})"
            )
        jobs = len({r.unit.task.job_id for r in found})
        verb = "would re-enqueue" if dry_run else "re-enqueued"
        print(
            f"{verb} {len(found)} steps of {jobs} jobs" if found else "nothing to recover: no orphaned jobs"
        )
        return 0

    return asyncio.run(go())
