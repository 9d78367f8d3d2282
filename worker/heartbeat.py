"""Worker heartbeats: while a worker runs it keeps `perq:worker:{id}` alive in Redis with a short TTL.

arq's own health-check key is one per queue, overwritten by every worker, so it cannot count workers.
A key per worker can: `perq status --queue` lists the keys of its queue, from any machine. A worker that
dies stops renewing its key and drops out of the count within `HEARTBEAT_TTL_S`; one that stops cleanly
deletes it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
from collections.abc import Mapping
from typing import Any

from shared.models import now_ms
from shared.queue import worker_key

log = logging.getLogger("perq.worker")
HEARTBEAT_INTERVAL_S = 5.0
HEARTBEAT_TTL_S = 15


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


async def heartbeat(
    redis: Any,
    queue: str,
    tasks: Mapping[str, asyncio.Task[Any]],
    concurrency: int,
    *,
    interval_s: float = HEARTBEAT_INTERVAL_S,
    ttl_s: int = HEARTBEAT_TTL_S,
) -> None:
    """Renew this worker's key until cancelled, then delete it. `tasks` are the worker's steps (arq's)."""
    worker_id = new_worker_id()
    key = worker_key(worker_id)
    started_at = now_ms()
    try:
        while True:
            info = {
                "id": worker_id,
                "queue": queue,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "startedAt": started_at,
                "beatAt": now_ms(),
                "running": sum(not t.done() for t in tasks.values()),
                "concurrency": concurrency,
            }
            try:
                await redis.set(key, json.dumps(info), ex=ttl_s)
            except Exception as e:  # Redis down or slow: a missed beat must never stop the worker
                log.warning("could not renew the worker heartbeat: %s", e)
            await asyncio.sleep(interval_s)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(redis.delete(key), 1.0)
