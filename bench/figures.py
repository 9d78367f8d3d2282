"""The figures: each takes the run's Bench and returns its rows; one that cannot be measured raises."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import (
    PERQ,
    Area,
    Bench,
    BenchError,
    Row,
    alternate,
    cpu_seconds,
    drain_rate,
    peak_rss_mb,
    run_async,
    time_to_screen,
    timed_process,
    wait_until,
)
from bench.store_figures import fsync_cost, slow_s3, store_growth
from producer.api import Client, RunRequest, plan_submission
from shared.models import Event, Job, Usage, new_id, now_ms
from shared.queue import StepTask, serialize, step_job_id
from shared.store import JobStore
from worker.supervisor import default_processes

Figure = Callable[[Bench], list[Row]]


# --- scripts and configs ------------------------------------------------------------------------------


def turn(*, text: str | None = None, tool: str | None = None, args: str = "{}", delay_ms: int = 0) -> str:
    """One script-provider turn as TOML (format: worker/models/script.py)."""
    return turn_for("e", text=text, tool=tool, args=args, delay_ms=delay_ms)


def turn_for(
    expert: str, *, text: str | None = None, tool: str | None = None, args: str = "{}", delay_ms: int = 0
) -> str:
    lines = [f"[[experts.{expert}.turns]]"]
    if tool:
        lines.append(f'toolCalls = [{{ toolName = "{tool}", args = {args} }}]')
    if text is not None:
        lines.append(f'text = "{text}"')
    if delay_ms:
        lines.append(f"delayMs = {delay_ms}")
    return "\n".join(lines) + "\n"


def one_expert(area: Area, script: str) -> RunRequest:
    """Expert `e` with the default skills, answering from `script`; the request that starts it."""
    area.write("perstack.toml", '[experts.e]\ninstruction = "Benchmark expert."\n')
    area.write("script.toml", script)
    return RunRequest(
        expert_key="e", query="go", provider="script", model="script.toml", max_steps=1000, cwd=area.root
    )


def tool_steps(steps: int, delay_ms: int = 0) -> str:
    """`steps` steps: each but the last calls the todo tool (cheap, in-process); the last answers text."""
    calls = "".join(turn(tool="todo", delay_ms=delay_ms) for _ in range(steps - 1))
    return calls + turn(text="done", delay_ms=delay_ms)


async def submit_many(area: Area, request: RunRequest, n: int) -> tuple[list[Job], float]:
    """Submit n jobs through perq's Python API on one connection; returns the jobs and submissions/s."""
    async with Client(area.settings) as client:
        jobs = []
        t0 = time.perf_counter()
        for _ in range(n):
            jobs.append(await client.submit(request))
        elapsed = time.perf_counter() - t0
    return jobs, n / elapsed


def wait_job(area: Area, job_id: str, timeout: float) -> Job:
    store = area.store
    found: list[Job] = []

    def done() -> bool:
        job = store.load_job(job_id)
        if job is not None and job.status not in ("queued", "running"):
            found.append(job)
            return True
        return False

    wait_until(done, timeout, f"job {job_id} did not stop", interval=0.02)
    return found[0]


def need_completed(area: Area, n: int) -> None:
    statuses = area.job_statuses()
    if statuses != {"completed": n}:
        raise BenchError(f"expected {n} completed jobs, found {statuses}")


# --- job throughput ----------------------------------------------------------------------------------

THROUGHPUT_JOBS = 1000
THROUGHPUT_ROUNDS = 2


def _perq_throughput(bench: Bench) -> tuple[float, float]:
    area = bench.area("throughput-perq")
    request = one_expert(area, turn(text="done"))
    _, submit_rate = run_async(submit_many(area, request, THROUGHPUT_JOBS))
    proc = area.start_worker("--burst", "--processes", "1")
    with contextlib.closing(bench.redis_client()) as client:
        rate, queued = drain_rate(client, area.queue, proc, timeout=180)
    if queued != THROUGHPUT_JOBS:
        raise BenchError(f"{queued} arq jobs queued for {THROUGHPUT_JOBS} submissions")
    bench.stop(proc)
    need_completed(area, THROUGHPUT_JOBS)
    return rate, submit_rate


def _arq_throughput(bench: Bench) -> tuple[float, float]:
    from arq.connections import RedisSettings, create_pool

    from bench.arq_noop import TASK

    area = bench.area("throughput-arq")

    async def enqueue_all() -> float:
        pool = await create_pool(
            RedisSettings.from_dsn(bench.redis.url), job_serializer=serialize, default_queue_name=area.queue
        )
        t0 = time.perf_counter()
        for _ in range(THROUGHPUT_JOBS):
            # the same payload shape and id length as perq's step tasks
            task = StepTask(job_id=new_id(), run_id=new_id(), step_number=1)
            await pool.enqueue_job(TASK, task.to_dict(), _job_id=step_job_id(task))
        elapsed = time.perf_counter() - t0
        await pool.aclose()
        return THROUGHPUT_JOBS / elapsed

    enqueue_rate = run_async(enqueue_all())
    proc = bench.spawn(
        [sys.executable, "-m", "bench.arq_noop"], cwd=area.root, env=area.env(), name="throughput-arq"
    )
    with contextlib.closing(bench.redis_client()) as client:
        rate, _ = drain_rate(client, area.queue, proc, timeout=180)
    bench.stop(proc)
    return rate, enqueue_rate


def job_throughput(bench: Bench) -> list[Row]:
    perq: list[tuple[float, float]] = []
    arq: list[tuple[float, float]] = []
    for _ in range(THROUGHPUT_ROUNDS):  # alternating rounds, best of each: the machine is shared
        arq.append(_arq_throughput(bench))
        bench.flush()
        perq.append(_perq_throughput(bench))
        bench.flush()
    perq_rate, arq_rate = max(r for r, _ in perq), max(r for r, _ in arq)
    ratio = perq_rate / arq_rate
    return [
        Row(
            "job throughput",
            ratio,
            "x arq",
            ">= 0.6",
            ratio >= 0.6,
            f"one process: perq {perq_rate:.0f} jobs/s vs arq no-op {arq_rate:.0f} jobs/s "
            f"(pre-enqueued; enqueue not timed: perq submit {max(s for _, s in perq):.0f}/s, "
            f"arq enqueue {max(s for _, s in arq):.0f}/s)",
        )
    ]


# --- step handoff ------------------------------------------------------------------------------------

HANDOFF_STEPS = 100
HANDOFF_ROUNDS = 3


def steps_per_second(events: list[Event], steps: int) -> float:
    """From the end of step 1 to the end of the last step: steps-1 steps and as many handoffs."""
    ends = [e for e in events if e.type == "continueToNextStep" and e.step_number == 1]
    last = [e for e in events if e.type == "completeRun"]
    if not ends or not last or last[-1].step_number != steps:
        kinds = sorted({e.type for e in events})
        raise BenchError(f"the {steps}-step job did not run through (events: {', '.join(kinds)})")
    span = (last[-1].timestamp - ends[0].timestamp) / 1000
    return (steps - 1) / span if span > 0 else float("inf")


def _handoff_queue(bench: Bench) -> float:
    area = bench.area("handoff-queue")
    request = one_expert(area, tool_steps(HANDOFF_STEPS))
    proc = area.start_worker("--processes", "1")
    try:
        area.wait_ready(proc)
        (job,), _ = run_async(submit_many(area, request, 1))
        final = wait_job(area, job.id, timeout=120)
        if final.status != "completed":
            raise BenchError(f"job ended {final.status}: {final.error}")
        return steps_per_second(area.run_events(job.id), HANDOFF_STEPS)
    finally:
        bench.stop(proc)


def _handoff_in_process(bench: Bench) -> float:
    """The same job driven by the worker's Runtime in this process, with the worker's collector settings:
    the next step runs at once, no Redis."""
    from worker.runtime import Runtime, collector_for_steps
    from worker.step_queue import LocalQueue

    area = bench.area("handoff-inprocess")
    request = one_expert(area, tool_steps(HANDOFF_STEPS))
    store = area.store
    plan = plan_submission(request, store)
    # what Client.submit writes, minus the enqueue
    store.save_run_setting(plan.setting)
    store.save_initial_checkpoint(plan.initial)
    store.save_job(plan.job, new=True)
    queue = LocalQueue()
    runtime = Runtime(store=store, queue=queue, env=dict(os.environ))

    async def drive() -> None:
        queue.pending.append(StepTask(job_id=plan.job.id, run_id=plan.setting.run_id, step_number=1))
        while queue.pending:
            await runtime.run_step(queue.pending.popleft())

    with collector_for_steps():
        run_async(drive())
    job = store.load_job(plan.job.id)
    if job is None or job.status != "completed":
        raise BenchError(f"in-process job ended {job.status if job else 'without a record'}")
    return steps_per_second(area.run_events(plan.job.id), HANDOFF_STEPS)


def step_handoff(bench: Bench) -> list[Row]:
    queued: list[float] = []
    local: list[float] = []
    for _ in range(HANDOFF_ROUNDS):
        local.append(_handoff_in_process(bench))
        queued.append(_handoff_queue(bench))
        bench.flush()
    q, p = max(queued), max(local)
    ratio = q / p
    return [
        Row(
            "step handoff",
            ratio,
            "x in-process",
            ">= 0.6",
            ratio >= 0.6,
            f"{HANDOFF_STEPS} tool-calling steps, one process: via Redis {q:.0f} steps/s "
            f"({1000 / q:.1f} ms/step), in-process {p:.0f} steps/s ({1000 / p:.1f} ms/step)",
        )
    ]


# --- concurrency -------------------------------------------------------------------------------------

CONCURRENT_JOBS = 500
CONCURRENT_STEPS = 10
CONCURRENT_DELAY_MS = 500


def _arq_chains(bench: Bench) -> float:
    """The same shape run by plain arq: 500 chains of 10 tasks that sleep, then enqueue their successor.

    Its wall time is what arq alone reaches for this figure on this machine, so it tells how much of the
    gap to the ideal is perq's.
    """
    from arq.connections import RedisSettings, create_pool

    from bench.arq_noop import CHAIN, chain_job_id

    area = bench.area("concurrency-arq")

    async def enqueue_all() -> None:
        pool = await create_pool(
            RedisSettings.from_dsn(bench.redis.url), job_serializer=serialize, default_queue_name=area.queue
        )
        for n in range(CONCURRENT_JOBS):
            payload = {"chain": n, "step": 1, "steps": CONCURRENT_STEPS, "delayMs": CONCURRENT_DELAY_MS}
            await pool.enqueue_job(CHAIN, payload, _job_id=chain_job_id(n, 1))
        await pool.aclose()

    run_async(enqueue_all())
    proc = bench.spawn(
        [sys.executable, "-m", "bench.arq_noop", str(CONCURRENT_JOBS)],
        cwd=area.root,
        env=area.env(),
        name="concurrency-arq",
    )
    with contextlib.closing(bench.redis_client()) as client:
        wait_until(lambda: area.queue_length(client) == 0, 120, "the arq chains did not finish", proc, 0.1)
        start, end = client.get("bench:chain:start"), client.get("bench:chain:end")
    bench.stop(proc)
    if not start or not end:
        raise BenchError("the arq chains left no timestamps")
    return float(end) - float(start)  # type: ignore[arg-type]


def _perq_concurrency(bench: Bench, processes: int | None) -> tuple[float, float | None, float | None]:
    """Wall seconds of the 500 jobs on one `perq worker` (`processes` None: its default), its peak RSS, and
    the CPU seconds its processes used."""
    label = "default" if processes is None else str(processes)
    area = bench.area(f"concurrency-{label}")
    request = one_expert(area, tool_steps(CONCURRENT_STEPS, delay_ms=CONCURRENT_DELAY_MS))
    jobs, _ = run_async(submit_many(area, request, CONCURRENT_JOBS))
    # room for every job at once (perq's default of 200 steps per process would run waves), split over the
    # processes: a process keeps the jobs it takes (it takes each next step it enqueues at once), so its
    # share of the 500 is what its concurrency lets it take
    count = processes or default_processes()
    args = ["--concurrency", str(-(-CONCURRENT_JOBS // count)), "--processes", str(count)]
    proc = area.start_worker(*args, label=f"worker-{label}")
    try:
        with contextlib.closing(bench.redis_client()) as client:
            wait_until(
                lambda: area.queue_length(client) == 0, 300, "the 500 jobs did not finish", proc, interval=0.1
            )
        rss = peak_rss_mb(proc.pid)
        cpu = cpu_seconds(proc.pid)
    finally:
        bench.stop(proc)
    need_completed(area, CONCURRENT_JOBS)
    starts: list[int] = []
    ends: list[int] = []
    for job in jobs:
        events = area.run_events(job.id)
        starts.append(min(e.timestamp for e in events if e.type == "startRun"))
        ends.append(max(e.timestamp for e in events if e.type == "completeRun"))
    return (max(ends) - min(starts)) / 1000, rss, cpu


def concurrency(bench: Bench) -> list[Row]:
    arq_wall = _arq_chains(bench)
    bench.flush()
    wall, rss, cpu = _perq_concurrency(bench, None)
    bench.flush()
    wall_one, _, cpu_one = _perq_concurrency(bench, 1)
    ideal = CONCURRENT_STEPS * CONCURRENT_DELAY_MS / 1000
    ratio = wall / ideal
    steps = CONCURRENT_JOBS * CONCURRENT_STEPS
    shape = f"{CONCURRENT_JOBS} jobs x {CONCURRENT_STEPS} steps, {CONCURRENT_DELAY_MS} ms per answer"
    return [
        Row(
            "concurrency",
            ratio,
            "x ideal",
            "<= 1.3",
            ratio <= 1.3,
            f"{shape}, one `perq worker` with its default processes ({default_processes()} here), "
            f"{CONCURRENT_JOBS} steps at once in all: {wall:.2f} s vs ideal {ideal:.0f} s "
            f"({steps / wall:.0f} steps/s; first startRun to last completeRun)",
        ),
        Row(
            "concurrency: --processes 1",
            wall_one / ideal,
            "x ideal",
            "reported",
            None,
            f"the same with one worker process, --concurrency {CONCURRENT_JOBS}: {wall_one:.2f} s "
            f"({steps / wall_one:.0f} steps/s)",
        ),
        Row(
            "concurrency: plain arq, same shape",
            arq_wall / ideal,
            "x ideal",
            "reported",
            None,
            f"500 chains of 10 arq tasks that sleep {CONCURRENT_DELAY_MS} ms and enqueue their successor, "
            f"one process, max_jobs {CONCURRENT_JOBS}: {arq_wall:.2f} s (arq's own ceiling on one core)",
        ),
        Row(
            "concurrency: worker CPU per step",
            None if cpu_one is None else cpu_one / steps * 1000,
            "ms",
            "reported",
            None,
            f"CPU time (user + system) of the one worker process over the {steps} steps, start-up included; "
            f"default processes: {'?' if cpu is None else f'{cpu / steps * 1000:.2f}'} ms (all processes)",
        ),
        Row(
            "concurrency: peak worker RSS",
            rss,
            "MB",
            "reported",
            None,
            "VmHWM of the worker processes together (supervisor and children), default processes",
        ),
    ]


# --- parallel fan-out --------------------------------------------------------------------------------

FANOUT_CHILDREN = ("c1", "c2", "c3", "c4")
FANOUT_DELAY_MS = 1000
FANOUT_ROUNDS = 3
FANOUT_WORKERS = 4


def _fanout_files(area: Area) -> RunRequest:
    config = ['[experts.coord]\ninstruction = "Delegate."', f"delegates = {list(FANOUT_CHILDREN)!r}"]
    for child in FANOUT_CHILDREN:
        config.append(f'[experts.{child}]\ndescription = "Child {child}"\ninstruction = "Answer."')
    area.write("perstack.toml", "\n".join(config).replace("'", '"') + "\n")
    calls = ", ".join(f'{{ toolName = "{c}", args = {{ query = "part {c}" }} }}' for c in FANOUT_CHILDREN)
    script = f"[[experts.coord.turns]]\ntoolCalls = [{calls}]\n" + turn_for("coord", text="all done")
    for child in FANOUT_CHILDREN:
        script += turn_for(child, text=f"{child} done", delay_ms=FANOUT_DELAY_MS)
    area.write("script.toml", script)
    return RunRequest(expert_key="coord", query="go", provider="script", model="script.toml", cwd=area.root)


def delegation_phase(events: list[Event]) -> float:
    """Seconds from the parent's stopRunByDelegate to the startRun of its resumed run."""
    stop = next((e for e in events if e.type == "stopRunByDelegate" and e.expert_key == "coord"), None)
    if stop is None:
        raise BenchError("the coordinator never stopped to delegate")
    resumed = [
        e
        for e in events
        if e.type == "startRun"
        and e.expert_key == "coord"
        and e.run_id != stop.run_id  # the resumed run (the stopped one may have started in the same ms)
        and e.timestamp >= stop.timestamp
    ]
    if not resumed:
        children = sorted({f"{e.expert_key}:{e.type}" for e in events if e.expert_key != "coord"})
        raise BenchError(f"the coordinator never resumed after delegating (children: {', '.join(children)})")
    return (resumed[0].timestamp - stop.timestamp) / 1000


def parallel_fanout(bench: Bench) -> list[Row]:
    area = bench.area("fanout")
    request = _fanout_files(area)
    procs = [area.start_worker(label=f"worker{i}") for i in range(FANOUT_WORKERS)]
    phases: list[float] = []
    try:
        for proc in procs:
            area.wait_ready(proc)
        for _ in range(FANOUT_ROUNDS):
            (job,), _ = run_async(submit_many(area, request, 1))
            final = wait_job(area, job.id, timeout=60)
            events = area.run_events(job.id)
            if final.status != "completed":
                trail = ", ".join(f"{e.expert_key}:{e.type}" for e in events)
                raise BenchError(f"job ended {final.status} ({final.error}); events: {trail}"[:900])
            phases.append(delegation_phase(events))
    finally:
        for proc in procs:
            bench.stop(proc)
    phase = statistics.median(phases)
    ideal = FANOUT_DELAY_MS / 1000
    return [
        Row(
            "parallel fan-out",
            phase / ideal,
            "x ideal",
            "<= 1.5",
            phase / ideal <= 1.5,
            f"4 delegates in one response, {FANOUT_DELAY_MS} ms each, {FANOUT_WORKERS} workers: delegation "
            f"phase {phase:.3f} s (median of {', '.join(f'{p:.3f}' for p in phases)})",
        )
    ]


# --- status at scale ---------------------------------------------------------------------------------


def fill_store(storage: Path, n: int) -> str:
    """n finished job records with index markers, as `perq run` leaves them; returns the newest job's id."""
    store = JobStore.open(str(storage))
    start = now_ms() - n * 1000
    job = None
    for i in range(n):
        job = Job(
            id=new_id(),
            status="completed",
            coordinator_expert_key="hello",
            total_steps=3,
            max_steps=100,
            usage=Usage(input_tokens=150, output_tokens=27, total_tokens=177),
            started_at=start + i * 1000,
            finished_at=start + i * 1000 + 500,
            head_checkpoint_id=new_id(),
        )
        store.save_job(job, new=True)
    assert job is not None
    return job.id


SCALE_GOAL = 1.5  # a view of 10,000 jobs may take at most this many times what a view of 100 takes
SCALE_RUNS = 7


def _at_scale(bench: Bench, name: str, what: str, view: Callable[[str, Area], float], how: str) -> list[Row]:
    """A view over 10,000 jobs against the same view over 100, each a fresh process, alternated."""
    big, small = bench.area(f"{what}-10000"), bench.area(f"{what}-100")
    big_newest, small_newest = fill_store(big.storage, 10_000), fill_store(small.storage, 100)
    big_s, small_s = alternate(SCALE_RUNS, lambda: view(big_newest, big), lambda: view(small_newest, small))
    ratio = big_s / small_s
    detail = f"10,000 jobs {big_s * 1000:.0f} ms vs 100 jobs {small_s * 1000:.0f} ms"
    detail += f" ({how}, median of {SCALE_RUNS})"
    return [Row(name, ratio, "x 100 jobs", f"<= {SCALE_GOAL}", ratio <= SCALE_GOAL, detail)]


def status_at_scale(bench: Bench) -> list[Row]:
    """`perq status` as a fresh process, until it has printed every job."""
    return _at_scale(
        bench,
        "status at scale",
        "status",
        lambda _, area: timed_process([*PERQ, "status"], cwd=area.root, env=area.env()),
        "`perq status`, fresh processes",
    )


# --- the terminal UI's history at scale -----------------------------------------------------------------


def tui_history(bench: Bench) -> list[Row]:
    """`perq start` as a fresh process in a pseudo-terminal, until the newest job's line is drawn."""
    return _at_scale(
        bench,
        "TUI history at scale",
        "tui",
        lambda newest, area: time_to_screen([*PERQ, "start"], newest, cwd=area.root, env=area.env()),
        "`perq start` until the newest job is drawn, fresh processes in a pseudo-terminal",
    )


# --- CLI start ---------------------------------------------------------------------------------------

CLI_RUNS = 7


def cli_start(bench: Bench) -> list[Row]:
    area = bench.area("cli")
    script = Path(sys.executable).with_name("perq")
    perq = [str(script)] if script.exists() else PERQ
    help_s, base_s = alternate(
        CLI_RUNS,
        lambda: timed_process([*perq, "--help"], cwd=area.root, env=area.env()),
        lambda: timed_process([sys.executable, "-c", "import typer, rich"], cwd=area.root, env=area.env()),
    )
    ratio = help_s / base_s
    return [
        Row(
            "CLI start",
            ratio,
            "x import",
            "<= 1.5",
            ratio <= 1.5,
            f"`perq --help` {help_s * 1000:.0f} ms vs `python -c 'import typer, rich'` "
            f"{base_s * 1000:.0f} ms "
            f"(fresh processes, median of {CLI_RUNS})",
        )
    ]


# --- the store's file system ------------------------------------------------------------------------

FS_WRITES = 300


def store_writes(bench: Bench) -> list[Row]:
    """What one atomic store write (a new file, renamed into place) costs where the stores live.

    Not a goal: context. Every step creates one file (its checkpoint; the rest of its writes go to files
    laid out where its job or run began), so on a disk where creating a file is slow, that is part of the
    floor of a step's cost, and the throughput and concurrency figures move with it.
    """
    area = bench.area("fs")
    store = area.store
    t0 = time.perf_counter()
    for i in range(FS_WRITES):
        store.backend.write(f"jobs/j{i % 10}/checkpoints/c{i}.json", b"x" * 2048)
    write_us = (time.perf_counter() - t0) / FS_WRITES * 1e6
    return [
        Row(
            "store: one atomic file write",
            write_us,
            "us",
            "reported",
            None,
            f"2 KiB, new file + rename, in {bench.root} (a step creates one such file: its checkpoint)",
        )
    ]


# name for --only: (measure, title when it fails, goal)
FIGURES: dict[str, tuple[Figure, str, str]] = {
    "fs": (store_writes, "store: one atomic file write", "reported"),
    "growth": (store_growth, "store bytes / conversation", "<= 3"),
    "fsync": (fsync_cost, "fsync per step", "reported"),
    "s3": (slow_s3, "s3 store, 25 ms per request", "<= 2"),
    "throughput": (job_throughput, "job throughput", ">= 0.6"),
    "handoff": (step_handoff, "step handoff", ">= 0.6"),
    "concurrency": (concurrency, "concurrency", "<= 1.3"),
    "fanout": (parallel_fanout, "parallel fan-out", "<= 1.5"),
    "status": (status_at_scale, "status at scale", "<= 1.5"),
    "tui": (tui_history, "TUI history at scale", "<= 1.5"),
    "cli": (cli_start, "CLI start", "<= 1.5"),
}
