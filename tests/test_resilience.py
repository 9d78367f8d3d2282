"""Nothing lost: real workers killed, real Redis restarted, real payloads injected (issue: resilience)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_sync

from shared.models import Job
from tests.conftest import Perq, script_toml
from tests.support.localredis import LocalRedis

SCRIPT = ("--provider", "script", "--model", "script.toml")
CONFIG = """
[experts.worker-test]
instruction = "Work"
"""


def tool_turns(n: int, delay_ms: int) -> list[dict[str, object]]:
    turns: list[dict[str, object]] = [
        {
            "toolCalls": [{"toolName": "todo", "args": {"newTodos": [f"t{i}"]}}],
            "delayMs": delay_ms,
            "usage": {"inputTokens": 10 + i, "outputTokens": 1 + i},
        }
        for i in range(n)
    ]
    turns.append({"text": "finished", "usage": {"inputTokens": 3, "outputTokens": 2}})
    return turns


def wait_until(predicate: object, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def shape(perq: Perq, job: Job) -> tuple[object, ...]:
    """What must be the same in a disturbed and an undisturbed run of the same script."""
    checkpoints = perq.checkpoints(job.id)
    return (
        job.status,
        job.total_steps,
        job.usage,
        [(c.step_number, c.status, c.expert.key) for c in checkpoints],
        [(e.type, e.step_number) for e in perq.events(job.id)],
    )


def traced(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_worker_killed_mid_step_loses_nothing(perq: Perq) -> None:
    perq.write("perstack.toml", CONFIG)
    perq.write("script.toml", script_toml({"worker-test": tool_turns(4, 700)}))
    calm = perq.submit("worker-test", "go", *SCRIPT)
    perq.burst()
    expected = shape(perq, perq.job(calm))

    trace = perq.root / "trace.jsonl"
    job_id = perq.submit("worker-test", "go", *SCRIPT)
    victim = perq.start_worker(PERQ_SCRIPT_TRACE=str(trace))
    wait_until(lambda: perq.job(job_id).total_steps >= 2 and len(traced(trace)) >= 3, what="step 3 in flight")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = time.monotonic()
    perq.start_worker(PERQ_SCRIPT_TRACE=str(trace))
    job = perq.wait_job(job_id)
    recovery = time.monotonic() - killed_at
    print(f"job finished {recovery:.1f} s after its worker was killed (lease 3 s)")

    assert shape(perq, job) == expected
    steps = [c.step_number for c in perq.checkpoints(job_id)]
    assert steps == sorted(set(steps))  # one checkpoint per step, none twice
    # the lease (3 s here) bounds how long the killed step waited before another worker took it
    assert recovery < 30


def test_model_is_not_asked_again_after_a_crash_during_tools(perq: Perq) -> None:
    perq.write("perstack.toml", CONFIG)
    perq.write(
        "script.toml",
        script_toml(
            {
                "worker-test": [
                    {"toolCalls": [{"toolName": "exec", "args": {"command": "sleep", "args": ["3"]}}]},
                    {"text": "slept"},
                ]
            }
        ),
    )
    trace = perq.root / "trace.jsonl"
    job_id = perq.submit("worker-test", "go", *SCRIPT)
    victim = perq.start_worker(PERQ_SCRIPT_TRACE=str(trace))
    wait_until(lambda: len(traced(trace)) == 1, what="the first model answer")
    time.sleep(0.5)  # the answer is journaled; the tool (sleep 3) is running
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    perq.start_worker(PERQ_SCRIPT_TRACE=str(trace))
    job = perq.wait_job(job_id)
    assert job.status == "completed"
    turns = [t["turn"] for t in traced(trace)]
    assert turns == [0, 1], f"model requests: {turns}"
    assert job.total_steps == 2


def test_sigterm_finishes_the_step_in_flight(perq: Perq) -> None:
    perq.write("perstack.toml", CONFIG)
    perq.write("script.toml", script_toml({"worker-test": tool_turns(2, 1500)}))
    trace = perq.root / "trace.jsonl"
    job_id = perq.submit("worker-test", "go", *SCRIPT)
    worker = perq.start_worker(PERQ_SCRIPT_TRACE=str(trace), PERQ_GRACE_SECONDS="10")
    wait_until(lambda: len(traced(trace)) == 1, what="step 1 in flight")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(15) == 0
    # the step in flight was finished, not lost, and nothing more was started
    assert perq.job(job_id).total_steps == 1
    assert len(traced(trace)) == 1
    perq.start_worker()
    job = perq.wait_job(job_id)
    assert job.status == "completed" and job.total_steps == 3


def test_sigterm_past_the_grace_period_hands_the_step_back(perq: Perq) -> None:
    perq.write("perstack.toml", CONFIG)
    perq.write("script.toml", script_toml({"worker-test": tool_turns(2, 4000)}))
    calm = perq.submit("worker-test", "go", *SCRIPT)
    perq.burst(PERQ_SCRIPT_TRACE="")
    expected = shape(perq, perq.job(calm))

    trace = perq.root / "trace.jsonl"
    job_id = perq.submit("worker-test", "go", *SCRIPT)
    worker = perq.start_worker(PERQ_SCRIPT_TRACE=str(trace), PERQ_GRACE_SECONDS="1")
    wait_until(lambda: len(traced(trace)) == 1, what="step 1 in flight")
    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(15) == 0  # a drain cut short by the grace period is still a clean stop
    assert time.monotonic() - started < 8
    assert perq.job(job_id).total_steps == 0
    perq.start_worker()
    job = perq.wait_job(job_id, timeout=60)
    assert shape(perq, job) == expected


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[LocalRedis]:
    directory = tmp_path / "redis-data"
    directory.mkdir()
    with LocalRedis(directory=str(directory)) as server:
        yield server


def test_redis_restart_mid_batch(tmp_path: Path, own_redis: LocalRedis) -> None:
    perq = Perq(root=tmp_path / "p", redis=own_redis, queue="perq:outage")
    perq.storage.mkdir(parents=True)
    try:
        perq.write("perstack.toml", CONFIG)
        perq.write("script.toml", script_toml({"worker-test": tool_turns(3, 400)}))
        jobs = [perq.submit("worker-test", f"go {i}", *SCRIPT) for i in range(6)]
        perq.start_worker()
        perq.start_worker()
        wait_until(lambda: any(perq.job(j).total_steps >= 1 for j in jobs), what="work under way")

        own_redis.stop()
        refused = perq.run("run", "worker-test", "while down", *SCRIPT)
        assert refused.returncode == 1 and "cannot reach Redis" in refused.stderr
        assert len(list((perq.storage / "jobs").iterdir())) == len(jobs)
        status = perq.run("status")
        assert status.returncode == 0 and all(j in status.stdout for j in jobs)
        time.sleep(1.0)
        own_redis.start()

        for job_id in jobs:
            job = perq.wait_job(job_id, timeout=90)
            assert job.status == "completed", job
            assert job.total_steps == 4
            assert (job.usage.input_tokens, job.usage.output_tokens) == (10 + 11 + 12 + 3, 1 + 2 + 3 + 2)
            steps = [c.step_number for c in perq.checkpoints(job_id)]
            assert steps == [1, 2, 3, 4]
    finally:
        perq.stop_workers()


def test_cancel_stops_a_running_job_within_one_step_and_it_can_continue(perq: Perq) -> None:
    perq.write("perstack.toml", CONFIG)
    perq.write("script.toml", script_toml({"worker-test": tool_turns(15, 400)}))
    job_id = perq.submit("worker-test", "go", *SCRIPT)
    perq.start_worker()
    wait_until(lambda: perq.job(job_id).total_steps >= 2, what="two steps")
    cancelled = perq.run("cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    # the steps committed by then (the record's totals are refreshed lazily while a job runs, at most once
    # a second, so they can lag a step behind)
    steps_at_cancel = len(perq.checkpoints(job_id))
    time.sleep(2.0)
    job = perq.job(job_id)
    assert job.status == "cancelled"
    assert job.total_steps <= steps_at_cancel + 1
    assert len(perq.checkpoints(job_id)) == job.total_steps
    again = perq.run("cancel", job_id)
    assert again.returncode == 2 and "cancelled" in again.stderr

    resumed = perq.run("run", "worker-test", "carry on", "--continue-job", job_id, *SCRIPT, "--wait")
    assert resumed.returncode == 0, resumed.stderr
    assert perq.job(job_id).status == "completed"


def test_cancel_reaches_delegates(perq: Perq) -> None:
    perq.write(
        "perstack.toml",
        """
        [experts.boss]
        instruction = "Delegate"
        delegates = ["slow"]
        [experts.slow]
        description = "Slow"
        instruction = "Work slowly"
    """,
    )
    perq.write(
        "script.toml",
        script_toml(
            {
                "boss": [{"toolCalls": [{"toolName": "slow", "args": {"query": "work"}}]}, {"text": "done"}],
                "slow": tool_turns(8, 300),
            }
        ),
    )
    job_id = perq.submit("boss", "go", *SCRIPT)
    perq.start_worker()
    wait_until(lambda: perq.job(job_id).total_steps >= 3, what="the delegate at work")
    assert perq.run("cancel", job_id).returncode == 0
    time.sleep(1.5)
    count = len(perq.checkpoints(job_id))
    time.sleep(1.5)
    assert len(perq.checkpoints(job_id)) == count
    assert perq.job(job_id).status == "cancelled"


def test_cancel_a_queued_job(perq: Perq) -> None:
    perq.write("perstack.toml", CONFIG)
    perq.write("script.toml", script_toml({"worker-test": tool_turns(1, 0)}))
    job_id = perq.submit("worker-test", "go", *SCRIPT)
    assert json.loads(perq.run("cancel", job_id, "--json").stdout)["status"] == "cancelled"
    perq.burst()
    assert perq.job(job_id).status == "cancelled"
    assert perq.checkpoints(job_id) == []
    assert perq.run("cancel", "nope").returncode == 2


def test_damaged_files_are_named_and_skipped(perq: Perq) -> None:
    perq.write("perstack.toml", CONFIG)
    perq.write("script.toml", script_toml({"worker-test": tool_turns(2, 0)}))
    jobs = [perq.submit("worker-test", f"go {i}", *SCRIPT) for i in range(3)]
    perq.burst()
    broken_job = perq.storage / "jobs" / jobs[0] / "job.json"
    broken_job.write_text(broken_job.read_text()[:40])
    checkpoints = perq.checkpoints(jobs[1])
    broken_cp = perq.storage / "jobs" / jobs[1] / "checkpoints" / f"{checkpoints[0].id}.json"
    broken_cp.write_text("{not json")

    listing = perq.run("status")
    assert listing.returncode == 0
    assert jobs[1] in listing.stdout and jobs[2] in listing.stdout
    assert str(broken_job) in listing.stderr

    detail = perq.run("status", jobs[1])
    assert detail.returncode == 0
    assert f"Step 2 ({checkpoints[1].id})" in detail.stdout
    assert str(broken_cp) in detail.stderr

    named = perq.run("status", jobs[0])
    assert named.returncode == 2 and str(broken_job) in named.stderr and "Traceback" not in named.stderr


class Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/perq-pickle-was-executed")


def test_pickled_payload_is_rejected_unexecuted(perq: Perq) -> None:
    MARKER.unlink(missing_ok=True)
    client = redis_sync.Redis.from_url(perq.redis.url)
    now = int(time.time() * 1000)
    payload = pickle.dumps({"t": 1, "f": "perq.step", "a": [Evil()], "k": {}, "et": now})
    client.psetex("arq:job:evil", 60_000, payload)
    client.zadd(perq.queue, {"evil": now})
    worker = perq.burst()
    assert not MARKER.exists()
    assert client.zscore(perq.queue, "evil") is None  # failed and removed, never run
    assert "evil" in worker.stderr


def test_payload_with_a_path_in_an_id_is_rejected(perq: Perq) -> None:
    client = redis_sync.Redis.from_url(perq.redis.url)
    now = int(time.time() * 1000)
    payload = json.dumps(
        {
            "t": 1,
            "f": "perq.step",
            "a": [{"jobId": "../../escape", "runId": "r", "stepNumber": 1}],
            "k": {},
            "et": now,
        }
    )
    client.psetex("arq:job:bad-ids", 60_000, payload)
    client.zadd(perq.queue, {"bad-ids": now})
    worker = perq.burst()
    assert "rejected queue payload" in worker.stderr
    assert not (perq.root / "escape").exists() and not (perq.storage.parent.parent / "escape").exists()


def test_provider_keys_never_reach_store_redis_or_events(perq: Perq) -> None:
    secrets = {"ANTHROPIC_API_KEY": "sk-ant-SECRET-111", "OPENAI_API_KEY": "sk-SECRET-222"}
    perq.write("perstack.toml", CONFIG)
    perq.write(
        "script.toml",
        script_toml(
            {
                "worker-test": [
                    {"toolCalls": [{"toolName": "exec", "args": {"command": "env", "args": []}}]},
                    {"text": "done"},
                ]
            }
        ),
    )
    env = perq.env(**secrets)
    result = perq.run("run", "worker-test", "go", *SCRIPT, env=env)
    assert result.returncode == 0, result.stderr
    perq.burst(**secrets)
    job_id = result.stdout.strip()
    assert perq.job(job_id).status == "completed"
    perq.assert_never_stored(list(secrets.values()))
