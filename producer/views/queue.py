"""`perq status --queue`: what the queue holds and who works on it, read from Redis alone.

- waiting: steps in arq's queue ZSET that no worker has taken yet; arq keeps a taken step in the ZSET
  until it finishes and marks it with `arq:in-progress:{id}`, so running = members with that mark;
- deferred: waiting steps whose time has not come (a retry's back-off);
- oldest: how long the longest-waiting due step has waited (its ZSET score is when it became due);
- workers: the per-worker heartbeat keys (worker/heartbeat.py) of this queue, and arq's health-check key.

Keys are counted with SCAN, never KEYS, so a busy Redis is not blocked.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from shared.queue import WORKER_KEY_PREFIX
from shared.queue.broker import health_check_key_suffix, in_progress_key_prefix

SCAN_BATCH = 1000
PAGE = 200


@dataclass
class QueueStats:
    queue: str
    waiting: int = 0
    running: int = 0
    deferred: int = 0
    oldest_waiting_s: float | None = None
    workers: list[dict[str, Any]] = field(default_factory=list)
    health_check: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "waiting": self.waiting,
            "running": self.running,
            "deferred": self.deferred,
            "oldestWaitingSeconds": self.oldest_waiting_s,
            "workersAlive": len(self.workers),
            "workers": self.workers,
            "healthCheck": self.health_check,
        }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def queue_stats(redis: Any, queue: str) -> QueueStats:
    stats = QueueStats(queue=queue)
    now_ms = time.time() * 1000
    total = int(await redis.zcard(queue))

    # in-progress marks are global to the Redis: keep those whose step belongs to this queue
    prefix = in_progress_key_prefix
    marked = [_text(k)[len(prefix) :] async for k in _scan(redis, prefix + "*")]
    running: set[str] = set()
    if marked:
        async with redis.pipeline(transaction=False) as pipe:
            for job_id in marked:
                pipe.zscore(queue, job_id)
            scores = await pipe.execute()
        running = {job_id for job_id, score in zip(marked, scores, strict=True) if score is not None}
    stats.running = len(running)
    stats.waiting = max(0, total - stats.running)
    due = int(await redis.zcount(queue, "-inf", now_ms))
    stats.deferred = max(0, total - due)  # members due later than now
    stats.oldest_waiting_s = await _oldest_wait(redis, queue, running, now_ms)

    worker_keys = [_text(k) async for k in _scan(redis, WORKER_KEY_PREFIX + "*")]
    if worker_keys:
        for raw in await redis.mget(worker_keys):
            if raw is None:
                continue  # expired between SCAN and MGET
            try:
                info = json.loads(raw)
            except ValueError:
                continue
            if isinstance(info, dict) and info.get("queue") == queue:
                stats.workers.append(info)
    stats.workers.sort(key=lambda w: str(w.get("id")))
    health = await redis.get(queue + health_check_key_suffix)
    stats.health_check = _text(health) if health is not None else None
    return stats


async def _scan(redis: Any, pattern: str) -> Any:
    async for key in redis.scan_iter(match=pattern, count=SCAN_BATCH):
        yield key


async def _oldest_wait(redis: Any, queue: str, running: set[str], now_ms: float) -> float | None:
    """Seconds the longest-waiting due step has waited; steps are read in pages, oldest first."""
    start = 0
    while True:
        page = await redis.zrangebyscore(queue, "-inf", now_ms, start=start, num=PAGE, withscores=True)
        if not page:
            return None
        for member, score in page:
            if _text(member) not in running:
                return max(0.0, (now_ms - float(score)) / 1000)
        start += PAGE


def render(stats: QueueStats) -> RenderableType:
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    oldest = "-" if stats.oldest_waiting_s is None else f"{stats.oldest_waiting_s:.1f} s"
    table.add_row("queue", stats.queue)
    table.add_row("waiting", str(stats.waiting) + (f" ({stats.deferred} deferred)" if stats.deferred else ""))
    table.add_row("running", str(stats.running))
    table.add_row("oldest waiting", oldest)
    table.add_row("workers alive", str(len(stats.workers)))
    parts: list[RenderableType] = [table]
    if stats.workers:
        workers = Table(box=None, header_style="bold")
        for column in ("worker", "host", "pid", "running", "up"):
            workers.add_column(column)
        now = time.time() * 1000
        for w in stats.workers:
            up = (now - float(w.get("startedAt", now))) / 1000
            workers.add_row(
                str(w.get("id")),
                str(w.get("host")),
                str(w.get("pid")),
                f"{w.get('running', 0)}/{w.get('concurrency', '?')}",
                f"{up:.0f} s",
            )
        parts += [Text(""), workers]
    if stats.health_check:
        parts += [Text(""), Text(f"arq health check: {stats.health_check}", style="dim")]
    return Group(*parts)
