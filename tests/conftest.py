"""Fixtures: a private Redis for the whole session, a fresh store and queue per test, and real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from shared.models import Checkpoint, Event, Job
from shared.store import JobStore
from tests.support.localredis import LocalRedis

PERQ = [sys.executable, "-m", "producer"]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedis]:
    """A redis-server of our own, so the suite never depends on (or disturbs) one already running."""
    with LocalRedis() as server:
        yield server


@dataclass
class Perq:
    """One test's perq installation: its own store, queue and workspace, on the session's Redis."""

    root: Path
    redis: LocalRedis
    queue: str
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def storage(self) -> Path:
        return self.root / "perstack"

    @property
    def store(self) -> JobStore:
        return JobStore.open(str(self.storage))

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PERQ_REDIS_URL=self.redis.url,
            PERQ_STORAGE=str(self.storage),
            PERQ_QUEUE=self.queue,
            PERQ_LEASE_SECONDS="3",
            PERQ_GRACE_SECONDS="5",
            PERQ_LOG_LEVEL="WARNING",
            # one worker process per `perq worker`, as the tests that kill or stop a worker mean it
            # (tests/test_supervisor.py asks for more)
            PERQ_PROCESSES="1",
        )
        env.update(extra)
        return env

    def write(self, name: str, text: str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        return path

    def run(
        self, *args: str, timeout: float = 60, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*PERQ, *args],
            cwd=self.root,
            env=env or self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def submit(self, *args: str) -> str:
        """`perq run ...`; returns the job id (the last stdout line)."""
        result = self.run("run", *args)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[-1]

    def burst(self, timeout: float = 120, **extra: str) -> subprocess.CompletedProcess[str]:
        result = self.run("worker", "--burst", timeout=timeout, env=self.env(**extra))
        assert result.returncode == 0, result.stderr
        return result

    def start_worker(self, **extra: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [*PERQ, "worker"],
            cwd=self.root,
            env=self.env(**extra),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.workers.append(proc)
        return proc

    def stop_workers(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.workers.clear()

    def job(self, job_id: str) -> Job:
        job = self.store.load_job(job_id)
        assert job is not None
        return job

    def wait_job(self, job_id: str, timeout: float = 60, statuses: tuple[str, ...] = ()) -> Job:
        final = statuses or (
            "completed",
            "stoppedByInteractiveTool",
            "stoppedByMaxSteps",
            "stoppedByError",
            "cancelled",
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.store.load_job(job_id)
            if job is not None and job.status in final:
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} did not stop in {timeout}s: {self.store.load_job(job_id)}")

    def checkpoints(self, job_id: str) -> list[Checkpoint]:
        checkpoints, problems = self.store.list_checkpoints(job_id)
        assert not problems
        return checkpoints

    def assert_never_stored(self, secrets: list[str]) -> None:
        """None of `secrets` is in any file of the store or in any Redis key (strings, streams, hashes...)."""
        import redis as redis_sync

        for path in self.storage.rglob("*"):
            if path.is_file():
                text = path.read_text(errors="replace")
                assert all(s not in text for s in secrets), path
        client = redis_sync.Redis.from_url(self.redis.url)
        for key in client.scan_iter("*"):
            kind = client.type(key).decode()
            if kind == "string":
                blob = repr(client.get(key))
            elif kind == "stream":
                blob = repr(client.xrange(key))
            elif kind == "zset":
                blob = repr(client.zrange(key, 0, -1))
            elif kind == "hash":
                blob = repr(client.hgetall(key))
            else:
                blob = ""
            assert all(s not in blob for s in secrets), key

    def events(self, job_id: str) -> list[Event]:
        """All events of a job: each run's events in the order written, runs in the order they started."""
        store = self.store
        runs: list[list[Event]] = []
        for run_id in store.list_runs(job_id):
            run_events, problems = store.read_events(job_id, run_id)
            assert not problems
            if run_events:
                runs.append(run_events)
        runs.sort(key=lambda r: (r[0].timestamp, r[0].step_number or 0))
        return [e for run in runs for e in run]


@pytest.fixture
def perq(tmp_path: Path, redis_server: LocalRedis, request: pytest.FixtureRequest) -> Iterator[Perq]:
    queue = f"perq:test:{request.node.name}:{time.monotonic_ns()}"
    p = Perq(root=tmp_path, redis=redis_server, queue=queue)
    (tmp_path / "perstack").mkdir()
    yield p
    p.stop_workers()


def script_toml(experts: dict[str, list[dict[str, Any]]]) -> str:
    """A script-provider file from Python data (TOML written by hand, JSON-compatible inline tables)."""
    lines: list[str] = []
    for expert, turns in experts.items():
        for turn in turns:
            lines.append(f'[[experts."{expert}".turns]]')
            for key, value in turn.items():
                lines.append(f"{key} = {toml_value(value)}")
            lines.append("")
    return "\n".join(lines)


def toml_value(value: Any) -> str:
    """One value in TOML syntax (inline tables for dicts)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)
