"""A step's lease: taking ready steps from the queue, and keeping the in-progress keys of running steps.

arq marks a running job with its in-progress key, set for the longest timeout of any function plus 10 s,
and never renews it, so a worker killed mid-job holds it that long. perq's lease is short and renewed while
the step runs, and the key's value says which worker holds it, so a dead worker's steps go to another
worker within one lease and a paused worker never extends a lease another worker has taken over. Separate
from the arq Worker subclass so the Redis side of a lease reads (and is tested) on its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from shared.models import now_ms
from shared.queue import CANCEL_PREFIX, STEP_ID_PREFIX
from shared.queue.broker import in_progress_key_prefix, job_key_prefix
from worker.queue.scripts import PICK_UP, RENEW, Arg
from worker.queue.steps import Picked, retry_key_prefix

log = logging.getLogger("perq.worker")


async def pick_up(
    redis: Any, queue_name: str, candidates: list[str], *, room: int, lease_s: float, owner: str
) -> list[Picked]:
    """Take up to `room` of the candidates in one round trip (arq's own pick-up costs four per job, and
    running it two more).

    A candidate is taken when it is still queued, due, and not leased by any worker: atomically, so workers
    sharing the queue never take the same step twice. Each job's cancel mark, its payload and its try
    (arq's retry counter, incremented) come back in the same round trip.
    """
    keys = [queue_name, in_progress_key_prefix, CANCEL_PREFIX, job_key_prefix, retry_key_prefix]
    args: list[Arg] = [now_ms(), int(lease_s * 1000), room, STEP_ID_PREFIX, owner, *candidates]
    taken: list[Any] = await PICK_UP(redis, keys, args)
    return [
        Picked(arq_id.decode(), int(float(score)), int(mark) if mark else None, job or None, int(tries))
        for arq_id, score, mark, job, tries in zip(
            taken[::5], taken[1::5], taken[2::5], taken[3::5], taken[4::5], strict=True
        )
    ]


async def renew_leases(redis: Any, running: Callable[[], list[str]], *, lease_s: float, owner: str) -> None:
    """Renew the leases of the running steps three times per lease, until cancelled; only this worker's.

    A renewal that fails is logged and tried again at the next turn: one lost turn leaves two thirds of the
    lease, and a step whose lease lapsed is taken over by another worker, which is safe.
    """
    while True:
        await asyncio.sleep(lease_s / 3)
        arq_ids = running()
        if not arq_ids:
            continue
        try:
            await RENEW(redis, [in_progress_key_prefix + i for i in arq_ids], [int(lease_s * 1000), owner])
        except Exception as e:  # Redis down, or failing over: the next turn tries again
            log.warning("could not renew leases: %s", e)
