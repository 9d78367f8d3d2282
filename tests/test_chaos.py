"""Chaos: 30 jobs of 8 steps with delegation on three workers, one killed with SIGKILL every few seconds
and restarted, Redis restarted once. Every job must end with exactly the steps and tokens of a calm run."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import Counter
from pathlib import Path

from producer.api import Client, RunRequest
from shared.config import RedisSection, Settings, StoreSection
from shared.models import Usage
from tests.conftest import Perq, script_toml
from tests.support.localredis import LocalRedis

JOBS = 30
DELAY_MS = 800
CONFIG = """
[experts.coord]
instruction = "Work, delegate, work"
delegates = ["helper"]

[experts.helper]
description = "Helps"
instruction = "Help"
"""


def turn(tool: str | None, i: int, o: int, **args: object) -> dict[str, object]:
    t: dict[str, object] = {"delayMs": DELAY_MS, "usage": {"inputTokens": i, "outputTokens": o}}
    if tool is None:
        t["text"] = "done"
    else:
        t["toolCalls"] = [{"toolName": tool, "args": args}]
    return t


SCRIPT = {
    # coord: 1 tool, 2 delegate | helper: 3 tool, 4 done | coord: 5 resume, 6 tool, 7 tool, 8 done
    "coord": [
        turn("todo", 10, 1, newTodos=["a"]),
        turn("helper", 20, 2, query="help"),
        turn("todo", 30, 3, newTodos=["b"]),
        turn("todo", 40, 4, newTodos=["c"]),
        turn(None, 50, 5),
    ],
    "helper": [turn("todo", 5, 1, newTodos=["x"]), turn(None, 6, 2)],
}
EXPECTED_USAGE = Usage(input_tokens=161, output_tokens=18, total_tokens=179)


def test_chaos(tmp_path: Path) -> None:
    data = tmp_path / "redis-data"
    data.mkdir()
    with LocalRedis(directory=str(data)) as redis_server:
        perq = Perq(root=tmp_path / "p", redis=redis_server, queue="perq:chaos")
        perq.storage.mkdir(parents=True)
        perq.write("perstack.toml", CONFIG)
        perq.write("script.toml", script_toml(SCRIPT))
        try:
            run_chaos(perq, redis_server)
        finally:
            perq.stop_workers()


def run_chaos(perq: Perq, redis_server: LocalRedis) -> None:
    settings = Settings(
        redis=RedisSection(url=redis_server.url, queue=perq.queue),
        store=StoreSection(location=str(perq.storage)),
    )

    async def submit_all() -> list[str]:
        async with Client(settings) as client:
            jobs = []
            for i in range(JOBS):
                request = RunRequest(
                    expert_key="coord",
                    query=f"job {i}",
                    provider="script",
                    model="script.toml",
                    cwd=perq.root,
                )
                jobs.append((await client.submit(request)).id)
            return jobs

    job_ids = asyncio.run(submit_all())
    workers = [perq.start_worker() for _ in range(3)]
    rng = random.Random(7)
    started = time.monotonic()
    kills = 0
    redis_restarted = False
    done: set[str] = set()
    while len(done) < JOBS:
        assert time.monotonic() - started < 170, f"only {len(done)} of {JOBS} jobs finished"
        time.sleep(rng.uniform(1.5, 2.5))
        victim = rng.randrange(len(workers))
        workers[victim].send_signal(signal.SIGKILL)
        workers[victim].wait()
        workers[victim] = perq.start_worker()
        kills += 1
        if not redis_restarted and kills == 2:
            unfinished = [j for j in job_ids if perq.job(j).status in ("queued", "running")]
            assert unfinished, "Redis must restart in the middle of the batch"
            redis_server.restart(down_seconds=1.0)
            redis_restarted = True
        for job_id in job_ids:
            job = perq.store.load_job(job_id)
            if job is not None and job.status not in ("queued", "running"):
                done.add(job_id)

    assert redis_restarted and kills >= 3, kills
    for job_id in job_ids:
        job = perq.job(job_id)
        assert job.status == "completed", job
        assert job.total_steps == 8, job
        assert job.usage == EXPECTED_USAGE, job
        checkpoints = perq.checkpoints(job_id)
        coordinator_chain = [c.step_number for c in checkpoints if c.expert.key == "coord"]
        assert coordinator_chain == [1, 2, 5, 6, 7, 8], coordinator_chain
        assert [c.step_number for c in checkpoints if c.expert.key == "helper"] == [3, 4]
        ends = Counter(
            (e.run_id, e.step_number, e.type)
            for e in perq.events(job_id)
            if e.type in ("continueToNextStep", "completeRun", "stopRunByDelegate", "startRun")
        )
        assert all(n == 1 for n in ends.values()), ends
