"""What every figure shares: the result row, a private Redis, scratch folders, and real worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import redis as redis_sync

from shared.config import RedisSection, Settings, StoreSection
from shared.models import Event
from tests.support.installation import Installation
from tests.support.localredis import LocalRedis

REPO = Path(__file__).resolve().parent.parent
PERQ = [sys.executable, "-m", "producer"]
FINAL_STATUSES = ("completed", "stoppedByInteractiveTool", "stoppedByMaxSteps", "stoppedByError", "cancelled")


@dataclass
class Row:
    """One line of the table. `holds` is None for figures that are reported, not judged."""

    figure: str
    value: float | None
    unit: str
    goal: str
    holds: bool | None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def error_row(figure: str, goal: str, message: str) -> Row:
    return Row(figure=figure, value=None, unit="", goal=goal, holds=False, detail=f"error: {message}")


class BenchError(Exception):
    """A figure that could not be measured; its row says why instead of a number."""


@dataclass
class Bench:
    """One run of the suite: one private Redis, one scratch root, and optionally a profile folder."""

    redis: LocalRedis
    root: Path
    profile_dir: Path | None = None
    _counter: int = 0
    _processes: list[Proc] = field(default_factory=list)

    # --- scratch installations --------------------------------------------------------------------

    def area(self, name: str) -> Area:
        """A fresh folder with its own store and queue name on the shared Redis."""
        self._counter += 1
        area = Area(
            bench=self,
            name=name,
            root=self.root / f"{self._counter:02d}-{name}",
            queue=f"bench:{self._counter}:{name}",
        )
        area.storage.mkdir(parents=True)
        return area

    def redis_client(self) -> redis_sync.Redis:
        return redis_sync.Redis.from_url(self.redis.url)

    def flush(self) -> None:
        """Figures do not share queue state; an empty Redis also keeps each one's memory use its own."""
        with contextlib.closing(self.redis_client()) as client:
            client.flushall()

    # --- processes ----------------------------------------------------------------------------------

    def spawn(self, argv: list[str], *, cwd: Path, env: dict[str, str], name: str) -> Proc:
        """Start a process of ours; with profiling on, it runs under cProfile (bench/profiled.py)."""
        if self.profile_dir is not None and argv[:2] == [sys.executable, "-m"]:
            out = self.profile_dir / f"{name}.prof"
            argv = [sys.executable, "-m", "bench.profiled", str(out), *argv[2:]]
        log = cwd / f"{name}.log"
        # stderr to a file, not a pipe: a chatty worker must never block on a pipe nobody reads
        with log.open("wb") as err:
            popen = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        proc = Proc(popen=popen, log=log)
        self._processes.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 30) -> None:
        """SIGTERM: a graceful stop, so that a profiled worker writes its profile."""
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
        try:
            proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait()
        with contextlib.suppress(ValueError):
            self._processes.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self._processes):
            self.stop(proc, timeout=10)


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exited(self) -> bool:
        return self.popen.poll() is not None

    def failure(self, what: str) -> BenchError:
        tail = self.log.read_text(errors="replace")[-1500:].strip() if self.log.exists() else ""
        return BenchError(f"{what}: process exited {self.popen.returncode}: {tail}")


@dataclass
class Area(Installation):
    """One figure's perq installation: a folder (workspace, configs), a store and a queue."""

    bench: Bench
    name: str
    root: Path
    queue: str

    @property
    def settings(self) -> Settings:
        return Settings(
            redis=RedisSection(url=self.bench.redis.url, queue=self.queue),
            store=StoreSection(location=str(self.storage)),
        )

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PERQ_REDIS_URL=self.bench.redis.url,
            PERQ_STORAGE=str(self.storage),
            PERQ_QUEUE=self.queue,
            PERQ_LOG_LEVEL="WARNING",
            # one process per `perq worker` unless a figure asks for more on the command line (concurrency)
            PERQ_PROCESSES="1",
            # bench.* modules run from the scratch folder, so the checkout must be importable from there
            PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        )
        env.update(extra)
        return env

    def write(self, name: str, text: str) -> Path:
        path = self.root / name
        path.write_text(text)
        return path

    def start_worker(self, *args: str, label: str = "worker") -> Proc:
        """A real `perq worker` process (`python -m producer worker`)."""
        return self.bench.spawn(
            [*PERQ, "worker", *args], cwd=self.root, env=self.env(), name=f"{self.name}-{label}"
        )

    def wait_ready(self, proc: Proc, timeout: float = 30) -> None:
        """A worker is polling once arq's health-check key exists (written by its first poll)."""
        key = f"{self.queue}:health-check"
        with contextlib.closing(self.bench.redis_client()) as client:
            message = f"worker for {self.name} did not start"
            wait_until(lambda: bool(client.exists(key)), timeout, message, proc)

    def queue_length(self, client: redis_sync.Redis) -> int:
        return zcard(client, self.queue)

    def job_statuses(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for job in self.store.list_jobs().jobs:
            counts[job.status] = counts.get(job.status, 0) + 1
        return counts

    def run_events(self, job_id: str) -> list[Event]:
        """Every event of a job, in time order (ties keep step order)."""
        store = self.store
        events: list[Event] = []
        for run_id in store.list_runs(job_id):
            events.extend(store.read_events(job_id, run_id)[0])
        events.sort(key=lambda e: (e.timestamp, e.step_number or 0))
        return events


# --- helpers ----------------------------------------------------------------------------------------


def zcard(client: redis_sync.Redis, key: str) -> int:
    """How many members a sorted set has (redis-py types its replies as maybe-awaitable)."""
    return int(cast(int, client.zcard(key)))


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    message: str,
    proc: Proc | None = None,
    interval: float = 0.02,
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.exited():
            raise proc.failure(message)
        if time.monotonic() > deadline:
            raise BenchError(f"{message} within {timeout:.0f} s")
        time.sleep(interval)


def drain_rate(
    client: redis_sync.Redis,
    queue: str,
    proc: Proc,
    timeout: float,
    interval: float = 0.002,
) -> tuple[float, int]:
    """Jobs/s at which a worker empties a pre-filled queue: from the first finished job to the last.

    arq removes a job from the queue's sorted set when it finishes, so the set's size counts unfinished
    jobs for perq and for the arq baseline alike, and the worker's start-up time stays out of the figure.
    """
    start = zcard(client, queue)
    deadline = time.monotonic() + timeout
    first: tuple[float, int] | None = None
    while True:
        now = time.perf_counter()
        left = zcard(client, queue)
        if first is None and left < start:
            first = (now, left)
        if left == 0:
            break
        if proc.exited() and proc.popen.returncode != 0:
            raise proc.failure(f"worker failed with {left} jobs queued")
        if time.monotonic() > deadline:
            raise BenchError(f"queue not drained in {timeout:.0f} s ({left} of {start} left)")
        time.sleep(interval)
    assert first is not None
    elapsed = now - first[0]
    return (first[1] / elapsed if elapsed > 0 else float("inf")), start


def peak_rss_mb(pid: int) -> float | None:
    """The peak resident set (VmHWM) of a process and its children together, read while they still run."""
    total = 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) / 1024
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    # a supervisor's children are the workers (`perq worker --processes N`)
    return total + sum(peak_rss_mb(int(child)) or 0.0 for child in children)


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) a process and its live children have used so far, read while they run.

    Unlike wall time it barely moves when other work shares the machine, so it tells what a step costs.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    own = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime: fields 14 and 15 of stat
    return own + sum(cpu_seconds(int(child)) or 0.0 for child in children)


def timed_process(argv: list[str], *, cwd: Path, env: dict[str, str]) -> float:
    """Wall seconds of one fresh process, which must succeed."""
    t0 = time.perf_counter()
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, timeout=120)
    elapsed = time.perf_counter() - t0
    if result.returncode != 0:
        raise BenchError(f"{' '.join(argv[-3:])} exited {result.returncode}: {result.stderr.decode()[-500:]}")
    return elapsed


def time_to_screen(
    argv: list[str], text: str, *, cwd: Path, env: dict[str, str], size: tuple[int, int] = (160, 40)
) -> float:
    """Wall seconds from starting a fresh process in a pseudo-terminal until `text` is drawn on it.

    The process is killed once the text shows: a terminal program (`perq start`) does not exit on its own.
    """
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    columns, rows = size
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    wanted = text.encode()
    seen = b""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env={**env, "TERM": "xterm-256color", "COLUMNS": str(columns), "LINES": str(rows)},
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    try:
        deadline = t0 + 120
        while wanted not in seen:
            left = deadline - time.perf_counter()
            ready, _, _ = select.select([master], [], [], max(left, 0))
            if not ready:
                raise BenchError(f"{' '.join(argv[-2:])} never drew {text!r} in 120 s")
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # the process is gone and its side of the terminal closed
                chunk = b""
            if not chunk:
                raise BenchError(f"{' '.join(argv[-2:])} exited before drawing {text!r}: {seen[-300:]!r}")
            seen += chunk
        return time.perf_counter() - t0
    finally:
        proc.kill()
        proc.wait()
        os.close(master)


def alternate(runs: int, *commands: Callable[[], float]) -> list[float]:
    """Run the commands in turn, `runs` times each, and return each one's median.

    Interleaving spreads the machine's noise over both sides of a ratio instead of loading one of them.
    """
    samples: list[list[float]] = [[] for _ in commands]
    for _ in range(runs):
        for i, command in enumerate(commands):
            samples[i].append(command())
    return [statistics.median(s) for s in samples]


def run_async(coro: Any) -> Any:
    return asyncio.run(coro)


@contextlib.contextmanager
def bench_session(profile_dir: Path | None = None, tmpdir: str | None = None) -> Iterator[Bench]:
    """A private redis-server (never one already running) and a scratch folder, both gone afterwards."""
    with tempfile.TemporaryDirectory(prefix="perq-bench-", dir=tmpdir) as tmp, LocalRedis() as server:
        # LocalRedis fsyncs its append-only file on every write (the crash tests need that); a deployment
        # runs Redis's default `everysec`, and a per-write fsync would make the figures measure the disk
        with contextlib.closing(redis_sync.Redis.from_url(server.url)) as client:
            client.config_set("appendfsync", "everysec")
        bench = Bench(redis=server, root=Path(tmp), profile_dir=profile_dir)
        try:
            yield bench
        finally:
            bench.stop_all()
