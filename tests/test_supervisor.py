"""`perq worker --processes N`: real children, real signals, nothing lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from tests.conftest import Perq, script_toml
from tests.support.procs import processes
from tests.test_resilience import CONFIG, SCRIPT, tool_turns, traced, wait_until
from worker.supervisor import HEALTHY_AFTER_S, Supervisor


def children(pid: int) -> set[int]:
    """The live (not zombie) processes whose parent is `pid`."""
    return {p.pid for p in processes() if p.ppid == pid and p.state != "Z"}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def heartbeat_pids(perq: Perq) -> set[int]:
    result = perq.run("status", "--queue", "--json")
    assert result.returncode == 0, result.stderr
    return {int(w["pid"]) for w in json.loads(result.stdout)["workers"]}


def start_supervisor(perq: Perq, trace: Path, processes: int = 2) -> subprocess.Popen[bytes]:
    # one step at a time per child, so that both children get steps to run
    return perq.start_worker(
        PERQ_PROCESSES=str(processes), PERQ_CONCURRENCY="1", PERQ_SCRIPT_TRACE=str(trace)
    )


def test_a_killed_child_loses_nothing_and_is_restarted(perq: Perq) -> None:
    perq.write("perstack.toml", CONFIG)
    perq.write("script.toml", script_toml({"worker-test": tool_turns(4, 500)}))
    trace = perq.root / "trace.jsonl"
    supervisor = start_supervisor(perq, trace)
    wait_until(lambda: len(children(supervisor.pid)) == 2, what="two worker processes")
    first = children(supervisor.pid)
    # each child is a worker of its own, with its own heartbeat
    wait_until(lambda: heartbeat_pids(perq) == first, what="a heartbeat from each child")

    jobs = [perq.submit("worker-test", f"go {i}", *SCRIPT) for i in range(4)]
    wait_until(lambda: len({t["pid"] for t in traced(trace)}) == 2, what="both children running steps")
    # a child that has answered a model request is mid-batch: it holds a step or is about to take the next
    victim = int(traced(trace)[-1]["pid"])  # type: ignore[call-overload]
    os.kill(victim, signal.SIGKILL)

    for job_id in jobs:
        job = perq.wait_job(job_id, timeout=90)
        assert job.status == "completed", job
        assert job.total_steps == 5
        assert [c.step_number for c in perq.checkpoints(job_id)] == [1, 2, 3, 4, 5]
    # the supervisor started a new child in the dead one's place
    wait_until(lambda: len(children(supervisor.pid)) == 2, what="the child restarted")
    now = children(supervisor.pid)
    assert victim not in now and len(now & first) == 1
    assert supervisor.poll() is None


def test_sigterm_to_the_supervisor_drains_every_child(perq: Perq) -> None:
    perq.write("perstack.toml", CONFIG)
    perq.write("script.toml", script_toml({"worker-test": tool_turns(2, 1500)}))
    trace = perq.root / "trace.jsonl"
    jobs = [perq.submit("worker-test", f"go {i}", *SCRIPT) for i in range(2)]
    supervisor = start_supervisor(perq, trace)
    wait_until(lambda: len(children(supervisor.pid)) == 2, what="two worker processes")
    pids = children(supervisor.pid)
    wait_until(lambda: len({t["pid"] for t in traced(trace)}) == 2, what="a step in flight in each child")

    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(30) == 0
    assert not any(alive(pid) for pid in pids)
    # every step a child had begun (asked the model for) was finished and committed, none abandoned
    assert sum(len(perq.checkpoints(j)) for j in jobs) == len(traced(trace))
    assert heartbeat_pids(perq) == set()  # each child deleted its heartbeat as it stopped

    perq.start_worker(PERQ_PROCESSES="1")
    for job_id in jobs:
        job = perq.wait_job(job_id)
        assert job.status == "completed" and job.total_steps == 3
        assert [c.step_number for c in perq.checkpoints(job_id)] == [1, 2, 3]


def test_restart_delay_doubles_while_a_child_dies_young_and_starts_over_after_a_healthy_life() -> None:
    supervisor = Supervisor(1, [])
    child = supervisor.children[0]
    delays = []
    for lived in (1, 1, 1, 1, 1, 1, 1, HEALTHY_AFTER_S + 1, 1):
        child.started_at = 100.0
        supervisor._ended(child, -signal.SIGKILL, 100.0 + lived)
        assert child.restart_at is not None
        delays.append(child.restart_at - (100.0 + lived))
    assert delays == [1, 2, 4, 8, 16, 30, 30, 1, 1]


def test_a_burst_child_that_found_the_queue_empty_is_not_restarted() -> None:
    supervisor = Supervisor(2, ["--burst"], burst=True)
    first, second = supervisor.children
    supervisor._ended(first, 0, 1.0)
    supervisor._ended(second, 1, 1.0)  # a burst child that failed is started again
    assert first.finished and first.restart_at is None
    assert not second.finished and second.restart_at is not None
