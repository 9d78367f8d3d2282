"""The one test harness: a test's own perq installation, run in-process or by real processes.

A `Perq` is a folder holding a store, a `perstack.toml` and a script for the script provider. Its steps
run in one of two ways, sharing everything else (the files, the store, how a job is read back):

- in-process (`start`, `drain`, `step`, `cancel`): the worker's real `Runtime` on an in-memory queue, no
  Redis and no processes, so a loop or hand-over test takes milliseconds;
- by real processes on the session's Redis (`submit`, `burst`, `start_worker`): for what only processes
  show, such as crashes, leases, signals and several workers.

Scripts are written from Python data with tomli-w (`script_toml`, `Perq.script`), so a test says what the
model answers, not how TOML spells it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import tomli_w

from producer.api import RunRequest, plan_submission
from shared import job_record
from shared.models import Checkpoint, Event, Job, now_ms
from shared.queue import StepTask
from shared.store import JobStore
from tests.support.installation import Installation
from tests.support.localredis import LocalRedis
from worker.runtime import Runtime
from worker.step_queue import LocalQueue

PERQ = [sys.executable, "-m", "producer"]
# what `start` passes unless told otherwise: the script provider reading script.toml
SCRIPTED = {"provider": "script", "model": "script.toml"}
FINAL_STATUSES = ("completed", "stoppedByInteractiveTool", "stoppedByMaxSteps", "stoppedByError", "cancelled")


def script_toml(experts: dict[str, list[dict[str, Any]]]) -> str:
    """A script-provider file from Python data: each expert's turns, in the script's camelCase keys."""
    return tomli_w.dumps({"experts": {name: {"turns": turns} for name, turns in experts.items()}})


@dataclass
class Perq(Installation):
    """One test's perq installation: its own store, config, script and workspace.

    `redis` and `queue` are needed only by real processes; in-process tests leave them out."""

    root: Path
    redis: LocalRedis | None = None
    queue: str = "perq:test"
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    # the in-process steps run so far, in order (a test may run one again, as a crashed worker's would be)
    ran: list[StepTask] = field(default_factory=list)

    # --- files and the store ------------------------------------------------------------------------

    def write(self, name: str, text: str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        return path

    def script(self, experts: dict[str, list[dict[str, Any]]], name: str = "script.toml") -> Path:
        """Write the script provider's file: for each expert, the model's answers in turn."""
        return self.write(name, script_toml(experts))

    def job(self, job_id: str) -> Job:
        job = self.store.load_job(job_id)
        assert job is not None
        return job

    def checkpoints(self, job_id: str) -> list[Checkpoint]:
        checkpoints, problems = self.store.list_checkpoints(job_id)
        assert not problems
        return checkpoints

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

    # --- in-process: the worker's Runtime on an in-memory queue -------------------------------------

    @cached_property
    def local(self) -> LocalQueue:
        """The in-memory queue in-process steps are handed over on."""
        return LocalQueue()

    @cached_property
    def runtime(self) -> Runtime:
        """What a worker would be: the real Runtime, on this installation's store and the in-memory queue."""
        return Runtime(store=JobStore.open(str(self.storage)), queue=self.local)

    def start(self, expert: str, query: str, **options: Any) -> Job:
        """Submit as `perq run` would (options as `RunRequest`'s; the script provider unless told), and
        queue the run's first step in memory."""
        request = RunRequest(expert_key=expert, query=query, cwd=self.root, **{**SCRIPTED, **options})
        store = self.runtime.store
        plan = plan_submission(request, store)
        store.save_run_setting(plan.setting)
        store.save_initial_checkpoint(plan.initial)
        store.save_job(plan.job, new=plan.new_job)
        self.local.pending.append(
            StepTask(job_id=plan.job.id, run_id=plan.setting.run_id, step_number=plan.initial.step_number)
        )
        return plan.job

    async def step(self) -> Checkpoint | None:
        """Run the next queued step in-process; its end (None: the step did not run, its job is cancelled)."""
        task = self.local.pending.popleft()
        self.ran.append(task)
        return await self.runtime.run_step(task)

    async def drain(self) -> None:
        """Run queued steps in-process until none is left (delegates and parents included)."""
        while self.local.pending:
            await self.step()

    def cancel(self, job_id: str) -> Job:
        """`perq cancel` in-process: the job record says cancelled, and a cancel mark stops its next step."""
        job = self.store.update_job(job_id, lambda j: job_record.cancel(j, now=now_ms()))
        assert job is not None
        self.local.cancelled[job_id] = now_ms()
        return job

    # --- real processes on Redis --------------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        assert self.redis is not None, "real processes need the session's Redis (the `perq` fixture)"
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

    def wait_job(self, job_id: str, timeout: float = 60, statuses: tuple[str, ...] = ()) -> Job:
        final = statuses or FINAL_STATUSES
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.store.load_job(job_id)
            if job is not None and job.status in final:
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} did not stop in {timeout}s: {self.store.load_job(job_id)}")

    def assert_never_stored(self, secrets: list[str]) -> None:
        """None of `secrets` is in any file of the store or in any Redis key (strings, streams, hashes...)."""
        import redis as redis_sync

        for path in self.storage.rglob("*"):
            if path.is_file():
                text = path.read_text(errors="replace")
                assert all(s not in text for s in secrets), path
        assert self.redis is not None
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
