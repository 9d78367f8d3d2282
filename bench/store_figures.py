"""The job store's figures: what a long job leaves on disk and in Redis, what a step's store work costs as the
job grows, what fsync costs, and how a worker fares on an object store at a real store's distance.

The long job is the shape that made Perstack's layout (and perq's before the message log) grow with the
square of a job's length: an expert that reads a 2 KB file at every step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, cast
from unittest import mock

from pydantic import TypeAdapter

from bench.common import PERQ, Area, Bench, BenchError, Row, run_async, wait_until
from producer.api import Client, RunRequest, plan_submission
from shared.config import RedisSection, Settings, StoreSection
from shared.models import Checkpoint, Message
from shared.queue import StepTask
from shared.store import JobStore
from shared.store.backend import Steps
from shared.store.local import Aside
from worker.runtime import Runtime
from worker.step_queue import LocalQueue

P = ParamSpec("P")
R = TypeVar("R")
LONG_STEPS = 200
SHORT_STEPS = 50
FILE_BYTES = 2048
EARLY = range(6, 26)  # the steps whose store time is compared with the late ones
LATE = range(LONG_STEPS - 22, LONG_STEPS - 2)


def reading_expert(area: Area, steps: int) -> RunRequest:
    """An expert that reads a 2 KB file at each step but the last, which answers."""
    area.write("data.txt", ("perq " * (FILE_BYTES // 5 + 1))[:FILE_BYTES])
    area.write("perstack.toml", '[experts.e]\ninstruction = "Read."\n')
    read = '[[experts.e.turns]]\ntoolCalls = [{ toolName = "readTextFile", args = { path = "data.txt" } }]\n'
    area.write("script.toml", read * (steps - 1) + '[[experts.e.turns]]\ntext = "done"\n')
    return RunRequest(
        expert_key="e", query="go", provider="script", model="script.toml", max_steps=1000, cwd=area.root
    )


@dataclass
class TimedRuntime(Runtime):
    """The worker's Runtime, timing every store call of each step (they all go through `io`, `read` or, for
    the writes as steps, `run`)."""

    current: int = 0
    spent: defaultdict[int, float] = field(default_factory=lambda: defaultdict(float))

    async def io(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        with self._timing():
            return await super().io(fn, *args, **kwargs)

    async def read(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        with self._timing():
            return await super().read(fn, *args, **kwargs)

    async def run(self, steps: Steps[R], aside: Aside | None = None) -> R:
        with self._timing():
            return await super().run(steps, aside)

    @contextlib.contextmanager
    def _timing(self) -> Iterator[None]:
        """Count the time inside toward the current step's store time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.spent[self.current] += time.perf_counter() - t0


@dataclass
class LongJob:
    job_id: str
    store_bytes: int
    conversation_bytes: int
    store_ms: dict[int, float]


def run_in_process(area: Area, steps: int, *, fsync: bool = True) -> LongJob:
    """Submit the reading job and drive it step by step with the worker's Runtime, in this process."""
    store = JobStore.open(str(area.storage), fsync=fsync)
    plan = plan_submission(reading_expert(area, steps), store)
    store.save_run_setting(plan.setting)
    store.save_initial_checkpoint(plan.initial)
    store.save_job(plan.job, new=True)
    queue = LocalQueue()
    runtime = TimedRuntime(store=store, queue=queue, env=dict(os.environ))

    async def drive() -> Checkpoint | None:
        queue.pending.append(StepTask(job_id=plan.job.id, run_id=plan.setting.run_id, step_number=1))
        end = None
        while queue.pending:
            task = queue.pending.popleft()
            runtime.current = task.step_number
            end = await runtime.run_step(task)
        return end

    end = run_async(drive())
    if end is None or end.status != "completed" or end.step_number != steps:
        raise BenchError(f"the {steps}-step job ended {end.status if end else 'nowhere'}")
    return LongJob(
        job_id=plan.job.id,
        store_bytes=folder_bytes(area.storage / "jobs" / plan.job.id),
        conversation_bytes=conversation_bytes(end),
        store_ms={step: s * 1000 for step, s in runtime.spent.items()},
    )


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def conversation_bytes(checkpoint: Checkpoint) -> int:
    """The conversation as JSON: what a store that keeps each message once cannot go below."""
    return len(TypeAdapter(list[Message]).dump_json(checkpoint.messages, by_alias=True, exclude_none=True))


def redis_bytes_left(bench: Bench, area: Area) -> tuple[int, int]:
    """The long job run by a real worker; then the Redis memory of every key that names the job."""
    request = reading_expert(area, LONG_STEPS)

    async def submit() -> str:
        async with Client(area.settings) as client:
            return (await client.submit(request)).id

    job_id = run_async(submit())
    proc = area.start_worker()
    store = area.store

    def stopped() -> bool:
        job = store.load_job(job_id)
        return job is not None and job.status not in ("queued", "running")

    wait_until(stopped, 300, f"the {LONG_STEPS}-step job did not stop", proc)
    bench.stop(proc)
    with contextlib.closing(bench.redis_client()) as client:
        keys = list(client.scan_iter(match=f"*{job_id}*", count=1000))
        used = sum(int(cast(int, client.memory_usage(k)) or 0) for k in keys)
    final = store.load_job(job_id)
    head = store.load_checkpoint(job_id, final.head_checkpoint_id or "") if final else None
    if head is None:
        raise BenchError("the job run by a worker has no head checkpoint")
    return used, conversation_bytes(head)


def store_growth(bench: Bench) -> list[Row]:
    runs = [run_in_process(bench.area(f"growth-200-{n}"), LONG_STEPS) for n in range(2)]
    long = runs[0]
    short = run_in_process(bench.area("growth-50"), SHORT_STEPS)
    ratio = long.store_bytes / long.conversation_bytes
    growth = long.store_bytes / short.store_bytes
    # the machine is shared: of two runs, the quieter one's medians
    early, late = min(
        (
            (statistics.median(r.store_ms[s] for s in EARLY), statistics.median(r.store_ms[s] for s in LATE))
            for r in runs
        ),
        key=sum,
    )
    bench.flush()
    redis_used, redis_conversation = redis_bytes_left(bench, bench.area("growth-redis"))
    redis_ratio = redis_used / redis_conversation
    return [
        Row(
            "store bytes / conversation",
            ratio,
            "x",
            "<= 3",
            ratio <= 3,
            f"{LONG_STEPS} steps reading {FILE_BYTES} B each: {long.store_bytes / 1e6:.2f} MB stored for "
            f"{long.conversation_bytes / 1e6:.2f} MB of conversation",
        ),
        Row(
            "store growth 50 -> 200 steps",
            growth,
            "x",
            "<= 5",
            growth <= 5,
            f"{short.store_bytes / 1e6:.2f} MB -> {long.store_bytes / 1e6:.2f} MB (linear is 4x, square 16x)",
        ),
        Row(
            "store time, step 200 / step 10",
            late / early,
            "x",
            "<= 1.5",
            late / early <= 1.5,
            f"median store time per step {early:.2f} ms (steps {EARLY.start}-{EARLY.stop - 1}) vs "
            f"{late:.2f} ms (steps {LATE.start}-{LATE.stop - 1})",
        ),
        Row(
            "redis left by a stopped job",
            redis_ratio,
            "x conversation",
            "<= 1",
            redis_ratio <= 1,
            f"{redis_used / 1e3:.0f} KB (MEMORY USAGE of every key naming the job) for "
            f"{redis_conversation / 1e3:.0f} KB of conversation",
        ),
    ]


def fsync_cost(bench: Bench) -> list[Row]:
    """What making each step durable costs: the store time of a step with fsync and without."""
    with_sync: list[float] = []
    without: list[float] = []
    for _ in range(2):
        for fsync, into in ((True, with_sync), (False, without)):
            job = run_in_process(bench.area(f"fsync-{fsync}"), SHORT_STEPS, fsync=fsync)
            into.append(statistics.median(job.store_ms[s] for s in range(2, SHORT_STEPS)))
    on, off = min(with_sync), min(without)
    return [
        Row(
            "fsync per step",
            on - off,
            "ms",
            "reported",
            None,
            f"median store time of a step {on:.2f} ms with fsync, {off:.2f} ms without "
            f"(PERQ_STORE_FSYNC=0), in {bench.root}",
        )
    ]


# --- a worker on an object store at a distance ----------------------------------------------------

S3_JOBS = 30
S3_STEPS = 3
S3_DELAY_S = 0.025


def slow_s3(bench: Bench) -> list[Row]:
    """30 jobs x 3 steps on one worker against moto's S3 server, directly and behind a 25 ms relay."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        raise BenchError("moto is not installed (pip install 'perq[dev]')") from e
    from bench.slow_relay import DelayRelay

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        with DelayRelay(host, port, S3_DELAY_S) as relay:
            direct = _s3_batch(bench, f"http://{host}:{port}", f"http://{host}:{port}", "direct")
            bench.flush()
            delayed = _s3_batch(bench, f"http://{host}:{port}", relay.url, "delayed")
            requests = relay.requests
    finally:
        server.stop()
    ratio = delayed / direct
    return [
        Row(
            "s3 store, 25 ms per request",
            ratio,
            "x no delay",
            "<= 2",
            ratio <= 2,
            f"{S3_JOBS} jobs x {S3_STEPS} steps on one worker: {delayed:.1f} s behind the relay "
            f"({requests} requests delayed) vs {direct:.1f} s direct",
        )
    ]


def _s3_batch(bench: Bench, submit_endpoint: str, worker_endpoint: str, label: str) -> float:
    """Submit the batch (not timed), then time one worker from its start until every job completed."""
    area = bench.area(f"s3-{label}")
    creds = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    storage = f"s3://perq-bench/{label}-{time.monotonic_ns()}"
    # the submissions and this process's reads go straight to the server
    with mock.patch.dict(os.environ, creds | {"PERQ_S3_ENDPOINT_URL": submit_endpoint}):
        return _timed_batch(bench, area, storage, creds, worker_endpoint, label)


def _timed_batch(
    bench: Bench, area: Area, storage: str, creds: dict[str, str], worker_endpoint: str, label: str
) -> float:
    store = JobStore.open(storage)
    with contextlib.suppress(FileExistsError):
        store.backend.fs.mkdir("perq-bench")  # type: ignore[attr-defined]
    area.write("perstack.toml", '[experts.e]\ninstruction = "Work."\n')
    todo = '[[experts.e.turns]]\ntoolCalls = [{ toolName = "todo", args = { newTodos = ["x"] } }]\n'
    area.write("script.toml", todo * (S3_STEPS - 1) + '[[experts.e.turns]]\ntext = "done"\n')
    request = RunRequest(expert_key="e", query="go", provider="script", model="script.toml", cwd=area.root)
    settings = Settings(
        redis=RedisSection(url=bench.redis.url, queue=area.queue), store=StoreSection(location=storage)
    )

    async def submit_all() -> list[str]:
        async with Client(settings, store) as client:
            return [(await client.submit(request)).id for _ in range(S3_JOBS)]

    env: dict[str, Any] = area.env(PERQ_STORAGE=storage, PERQ_S3_ENDPOINT_URL=worker_endpoint, **creds)
    proc = bench.spawn([*PERQ, "worker"], cwd=area.root, env=env, name=f"s3-{label}-worker")
    area.wait_ready(proc)
    t0 = time.perf_counter()  # the worker is up; submissions go straight to the server in both runs
    job_ids = run_async(submit_all())

    def all_done() -> bool:
        jobs = [store.load_job(j) for j in job_ids]
        return all(j is not None and j.status not in ("queued", "running") for j in jobs)

    wait_until(all_done, 300, f"the S3 batch ({label}) did not finish", proc, interval=0.1)
    elapsed = time.perf_counter() - t0
    bench.stop(proc)
    jobs = [store.load_job(j) for j in job_ids]
    if any(j is None or j.status != "completed" or j.total_steps != S3_STEPS for j in jobs):
        raise BenchError(f"the S3 batch ({label}) did not complete every job in {S3_STEPS} steps")
    return elapsed
