"""One committer per step: a worker frozen past its lease (SIGSTOP) wakes up after another worker finished
its steps, and changes nothing.

A lease is not a lock. A worker can pause (GC, VM migration, a throttled container) longer than its lease,
another worker takes its steps over, and the first then wakes believing it still owns them. The step's
checkpoint is created only if absent, so the late attempt loses, discards its result and adopts the
winner's; the job record only moves forward.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync

from shared.models import Job
from shared.store import JobStore
from tests.conftest import Perq, script_toml
from tests.support.localredis import LocalRedis
from tests.support.procs import proc_stat, processes
from tests.test_resilience import traced, wait_until

SCRIPT = ("--provider", "script", "--model", "script.toml")
CONFIG = """
[experts.pauser]
instruction = "Work"
"""
JOBS = 4
LEASE = "2"


def turns(freeze_in: str) -> list[dict[str, Any]]:
    """Three steps of 100 tokens each; the second is slow in its model call or in its tool call."""
    usage = {"inputTokens": 90, "outputTokens": 10}
    if freeze_in == "model":
        second = {"toolCalls": [{"toolName": "todo", "args": {"newTodos": ["b"]}}], "delayMs": 4000}
    else:
        call = {"toolName": "exec", "args": {"command": "sleep", "args": ["4"]}}
        second = {"toolCalls": [call]}
    return [
        {"toolCalls": [{"toolName": "todo", "args": {"newTodos": ["a"]}}], "usage": usage},
        {**second, "usage": usage},
        {"text": "done", "usage": usage},
    ]


@pytest.mark.parametrize("freeze_in", ["model", "tool"])
def test_a_worker_frozen_past_its_lease_changes_nothing_when_it_wakes(perq: Perq, freeze_in: str) -> None:
    perq.write("perstack.toml", CONFIG)
    perq.write("script.toml", script_toml({"pauser": turns(freeze_in)}))
    trace = perq.root / "trace.jsonl"
    jobs = [perq.submit("pauser", "go", *SCRIPT) for _ in range(JOBS)]
    first = perq.start_worker(PERQ_SCRIPT_TRACE=str(trace), PERQ_LEASE_SECONDS=LEASE)

    def asked(pid: int, turn: int) -> int:
        return sum(1 for t in traced(trace) if t["turn"] == turn and t["pid"] == pid)

    wait_until(lambda: asked(first.pid, 1) == JOBS, what="every job's step 2 in flight")
    if freeze_in == "tool":
        wait_until(lambda: _children(first.pid, "sleep") == JOBS, what="every job's tool running")
    first.send_signal(signal.SIGSTOP)
    try:
        second = perq.start_worker(PERQ_SCRIPT_TRACE=str(trace), PERQ_LEASE_SECONDS=LEASE)
        finished = [perq.wait_job(job_id, timeout=60) for job_id in jobs]
        assert [j.status for j in finished] == ["completed"] * JOBS
        # the second worker really ran the steps it took over: it asked for step 2's answer again (a model
        # call cut short), or found it journaled (the model had answered; only the tool was cut short)
        assert asked(second.pid, 1) == (JOBS if freeze_in == "model" else 0)
        assert asked(second.pid, 2) == JOBS
    finally:
        first.send_signal(signal.SIGCONT)
    # the woken worker finishes its model calls or tools, then tries to commit what it ran
    wait_until(lambda: _late_attempts_settled(perq), timeout=30, what="the woken worker to settle")

    for job_id in jobs:
        job = perq.job(job_id)
        assert (job.status, job.total_steps) == ("completed", 3), job
        assert (job.usage.input_tokens, job.usage.output_tokens) == (270, 30)
        checkpoints = perq.checkpoints(job_id)
        assert [c.step_number for c in checkpoints] == [1, 2, 3]
        ends = Counter((e.run_id, e.step_number) for e in perq.events(job_id) if _ends_step(e.type))
        assert set(ends.values()) == {1} and len(ends) == 3, ends
        assert checkpoints[-1].status == "completed" and len(checkpoints[-1].messages) == 7
    assert first.poll() is None  # alive: it lost the race and went on


def _children(pid: int, name: str) -> int:
    """How many child processes called `name` the process has."""
    return sum(p.comm == name and p.ppid == pid for p in processes())


def _ends_step(kind: str) -> bool:
    return kind in ("continueToNextStep", "completeRun", "stopRunByError", "stopRunByExceededMaxSteps")


def _late_attempts_settled(perq: Perq) -> bool:
    """The first worker reports no running steps in its heartbeat (it renews it every few seconds)."""
    client = redis_sync.Redis.from_url(perq.env()["PERQ_REDIS_URL"])
    try:
        beats = [json.loads(client.get(k) or b"{}") for k in client.scan_iter("perq:worker:*")]
    finally:
        client.close()
    queue = perq.env()["PERQ_QUEUE"]
    return bool(beats) and all(b.get("running") == 0 for b in beats if b.get("queue") == queue)


def test_lease_renewal_renews_only_the_workers_own_leases(redis_server: LocalRedis) -> None:
    """A worker that wakes up late must not extend the lease of the worker that took its step over."""
    from worker.queue.scripts import RENEW

    client = redis_sync.Redis.from_url(redis_server.url)
    try:
        mine, theirs = "arq:in-progress:test-mine", "arq:in-progress:test-theirs"
        client.set(mine, "worker-a", px=1000)
        client.set(theirs, "worker-b", px=1000)
        lost = "arq:in-progress:test-lost"  # Redis forgot it (flushed, restarted empty) while the step ran
        renewed = client.eval(RENEW.body, 3, mine, theirs, lost, "60000", "worker-a")
        assert renewed == 2
        assert client.pttl(mine) > 50_000 and client.pttl(theirs) <= 1000
        assert client.get(theirs) == b"worker-b"
        assert client.get(lost) == b"worker-a" and client.pttl(lost) > 50_000
    finally:
        client.delete("arq:in-progress:test-mine", "arq:in-progress:test-theirs", "arq:in-progress:test-lost")
        client.close()


# a process stopped in the middle of a job record's update: the record read and its lock held
_STOPPED_WRITER = """
import os, signal, sys
from shared.store import JobStore

def change(job):
    if job.status != "queued":  # looked at again after the stop: the record moved on, leave it
        return None
    os.kill(os.getpid(), signal.SIGSTOP)
    return job.model_copy(update={"status": "running", "total_steps": 0})

JobStore.open(sys.argv[1]).update_job(sys.argv[2], change)
"""


def test_a_record_lock_held_by_a_stopped_process_neither_stalls_the_job_nor_undoes_it(perq: Perq) -> None:
    """A lock is held by a process, and a stopped process lets go of nothing: a job's steps write its record
    past the lock once it was held too long, and the stopped writer, woken, finds its update overtaken and
    leaves the record as the steps wrote it."""
    perq.write("perstack.toml", CONFIG)
    usage = {"inputTokens": 90, "outputTokens": 10}
    script = [{"toolCalls": [{"toolName": "todo", "args": {"newTodos": ["a"]}}], "usage": usage}]
    perq.write("script.toml", script_toml({"pauser": [*script, {"text": "done", "usage": usage}]}))
    job_id = perq.submit("pauser", "go", *SCRIPT)
    writer = subprocess.Popen([sys.executable, "-c", _STOPPED_WRITER, str(perq.storage), job_id])
    try:
        wait_until(lambda: _stopped(writer.pid), what="the writer to stop mid-update")
        perq.start_worker()
        job = perq.wait_job(job_id, timeout=45)
        assert (job.status, job.total_steps) == ("completed", 2), job
    finally:
        writer.send_signal(signal.SIGCONT)
    assert writer.wait(30) == 0
    job = perq.job(job_id)
    assert (job.status, job.total_steps, job.usage.input_tokens) == ("completed", 2, 180), job
    assert job.head_checkpoint_id == perq.checkpoints(job_id)[-1].id


def _stopped(pid: int) -> bool:
    found = proc_stat(pid)
    return found is not None and found.state == "T"


_COUNTING_WRITER = """
import os, sys
from shared.store import JobStore, local

local._WRITE_PAST_S = 0.2
store = JobStore.open(sys.argv[1])
added = 0
while not os.path.exists(sys.argv[2]):
    store.update_job("j1", lambda j: j.model_copy(update={"total_steps": j.total_steps + 1}))
    added += 1
print(added)
"""
_WATCHING_READER = """
import os, sys
from shared.store import JobStore, local

local._SHARED_WAIT_S = 0.05
store = JobStore.open(sys.argv[1])
seen = 0
while not os.path.exists(sys.argv[2]):
    now = store.load_job("j1").total_steps
    assert now >= seen, f"the record went back from {seen} to {now}"
    seen = now
"""


def test_record_writers_stopped_at_random_lose_no_update(tmp_path: Path) -> None:
    """Processes adding one to a record, stopped and woken at random (SIGSTOP for 0.5 ms to 0.3 s, anywhere in
    an update: holding the lock, in a flush, in the check and swap): every addition lands once, a reader
    past the lock never sees the record torn or going back, and no writer's file is left behind."""
    root = tmp_path / "perstack"
    store = JobStore.open(str(root))
    store.save_job(Job(id="j1", status="running", coordinator_expert_key="e", started_at=1), new=True)
    done = tmp_path / "done"
    run = [sys.executable, "-c"]
    writers = [
        subprocess.Popen([*run, _COUNTING_WRITER, str(root), str(done)], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    reader = subprocess.Popen([*run, _WATCHING_READER, str(root), str(done)])
    chance = random.Random(7)
    try:
        for _ in range(40):
            writer = chance.choice(writers)
            time.sleep(chance.uniform(0, 0.03))
            writer.send_signal(signal.SIGSTOP)
            time.sleep(chance.choice([0.0005, 0.002, 0.01, 0.1, 0.3]))
            writer.send_signal(signal.SIGCONT)
    finally:
        done.touch()
        for w in writers:
            w.send_signal(signal.SIGCONT)
    added = [w.communicate(timeout=30) for w in writers]
    assert [w.returncode for w in writers] == [0] * len(writers)
    assert reader.wait(30) == 0
    record = store.load_job("j1")
    assert record is not None and record.total_steps == sum(int(out) for out, _ in added)
    left = sorted(p.name for p in (root / "jobs" / "j1").iterdir() if p.name.startswith("."))
    assert left == [".job.json.spare"]
