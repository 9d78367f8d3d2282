"""`perq recover`: the workers' reconciliation, on demand, for an operator.

It compares the store's unfinished jobs with the queue and enqueues every unit of work that is neither
waiting nor leased (`--dry-run`: only says which), printing each with the reason the store gives. It waits
half a lease between its two looks at the queue, so that a step a live worker holds is never mistaken for
an orphan.
"""

from __future__ import annotations

from typing import Annotated

import typer

from producer.cli.exit import exits_on_refusal


def recover(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be re-enqueued")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Re-enqueue the work of queued or running jobs that Redis lost (what workers do every few leases)."""
    import asyncio

    from producer.api import _create_pool_quiet
    from producer.views import report
    from shared.config import Settings
    from shared.store import JobStore
    from worker.reconcile import reconcile

    settings = Settings()
    store = JobStore.open(settings.store.location)

    async def go() -> None:
        with exits_on_refusal():
            redis = await _create_pool_quiet(settings)
        try:
            found = await reconcile(
                redis,
                store,
                settings.redis.queue,
                settle_s=settings.worker.lease_seconds / 2,
                dry_run=dry_run,
            )
        finally:
            await redis.aclose()
        report.recovered(found, dry_run=dry_run, json_output=json_output)

    asyncio.run(go())
