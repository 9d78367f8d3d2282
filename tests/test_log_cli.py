"""`perq log`, live following and the status views against a real Redis, real workers and real jobs.

Spec §5.5 (`perstack log`) and scenario 29; the follower of issue 7 shares only Redis with the worker.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from producer.cli import app
from producer.follow import segment_start, wait_for_job
from shared.events import publish_events
from shared.models import Event, Job, now_ms
from shared.store import JobStore
from tests.conftest import PERQ, Perq, script_toml
from tests.support.localredis import LocalRedis
from tests.test_resilience import wait_until

SCRIPT = ("--provider", "script", "--model", "script.toml")
HEADER = re.compile(r"^\[Step (\d+|-)\] (\w+)\s+\d\d:\d\d:\d\d(?:  (\S+))?$")

TEAM = """
[experts.lead]
instruction = "Lead"
delegates = ["helper"]

[experts.helper]
description = "Helps"
instruction = "Help"
"""


def team_script(delay_ms: int = 0) -> str:
    return script_toml(
        {
            "lead": [
                {"error": {"message": "rate limited", "retryable": True}, "delayMs": delay_ms},
                {
                    "toolCalls": [{"toolName": "todo", "args": {"newTodos": ["delegate"]}}],
                    "usage": {"inputTokens": 100, "outputTokens": 10},
                    "delayMs": delay_ms,
                },
                {"toolCalls": [{"toolName": "helper", "args": {"query": "help me"}}], "delayMs": delay_ms},
                {"text": "all done", "delayMs": delay_ms},
            ],
            "helper": [{"text": "helped", "delayMs": delay_ms}],
        }
    )


def headers(text: str) -> list[tuple[str, str]]:
    """(step, type) of each event line of `perq log` output."""
    found = []
    for line in text.splitlines():
        m = HEADER.match(line.rstrip())
        if m:
            found.append((m[1], m[2]))
    return found


def log(perq: Perq, *args: str) -> tuple[int, str, str]:
    """`perq log ...` in this process (fast); returns exit code, stdout and stderr."""
    result = CliRunner().invoke(app, ["log", *args], env=perq.env(COLUMNS="200"))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory, redis_server: LocalRedis) -> Iterator[tuple[Perq, str]]:
    """One finished job with a retry, tools and a delegate, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("team")
    (root / "perstack").mkdir()
    perq = Perq(root=root, redis=redis_server, queue=f"perq:test:team:{time.monotonic_ns()}")
    perq.write("perstack.toml", TEAM)
    perq.write("script.toml", team_script())
    job_id = perq.submit("lead", "Do it", *SCRIPT)
    perq.burst()
    assert perq.job(job_id).status == "completed"
    yield perq, job_id
    perq.stop_workers()


# --- scenario 29 ------------------------------------------------------------------------------------


def test_log_help_lists_the_options(perq: Perq) -> None:
    result = perq.run("log", "--help", env=perq.env(COLUMNS="200"))
    assert result.returncode == 0
    for option in ("--job", "--run", "--checkpoint", "--errors", "--tools", "--json", "--follow", "--filter"):
        assert option in result.stdout


def test_empty_storage_prints_no_data_found(perq: Perq) -> None:
    for args in (
        [],
        ["--job", "nonexistent-job-id"],
        ["--run", "some-run"],
        ["--checkpoint", "some-checkpoint"],
        ["--errors", "--tools", "--step", ">2"],
        ["--job", "x", "--filter", '.type == "retry"', "--json"],
        ["--delegations", "--take", "5", "--offset", "1", "--context", "2", "--summary"],
    ):
        code, out, _ = log(perq, *args)
        assert (code, out) == (0, "No data found\n"), args


def test_bad_filters_exit_2_with_one_line(perq: Perq) -> None:
    for args, message in (
        (["--step", "x"], "Invalid step filter: x"),
        (["--filter", "type = 1"], "Invalid filter expression"),
        (["--take", "-1"], "--take must be 0 or more"),
        (["--job", "../etc"], "invalid job id"),
        (["--follow", "--run", "r"], "--follow follows a whole job"),
    ):
        code, out, err = log(perq, *args)
        assert code == 2 and out == "", args
        assert err.startswith("perq: ") and message in err and err.count("\n") == 1


# --- over a real job ----------------------------------------------------------------------------------


def test_log_of_the_latest_job(team: tuple[Perq, str]) -> None:
    perq, team_job = team
    code, out, _ = log(perq, "--summary")
    assert code == 0
    assert out.startswith("(showing latest job)\n")
    assert f"Storage: {perq.storage}" in out
    assert f"Job: {team_job} (completed)\nExpert: lead\n" in out
    assert "Steps: 6\n" in out
    assert (
        "Summary:\n  Total Events: 21\n  Errors: 1\n  Tool Calls: 3\n  Delegations: 2\n  Step Range: 1 - 6"
        in out
    )
    stored = [(str(e.step_number), e.type) for e in perq.events(team_job)]
    assert headers(out) == stored
    assert '  Query: "Do it"' in out and '  Query: "help me"' in out
    assert "  Tools: todo" in out and "  Delegate to: helper" in out
    assert "  Result: all done" in out and "  Reason: " in out
    lines = out.splitlines()
    helper_start = lines.index(next(line for line in lines if line.endswith("helper") and "startRun" in line))
    assert lines[helper_start + 1] == '  Query: "help me"'


def test_log_filters_over_a_real_job(team: tuple[Perq, str]) -> None:
    perq, team_job = team

    def types(*args: str) -> list[str]:
        code, out, err = log(perq, "--job", team_job, "--take", "0", *args)
        assert code == 0, err
        assert "(showing latest job)" not in out
        return [t for _, t in headers(out)]

    assert types("--errors") == ["retry"]
    assert types("--tools") == ["callTools", "resolveToolResults", "callTools"]
    assert types("--delegations") == ["callDelegate", "stopRunByDelegate"]
    assert types("--type", "completeRun") == ["completeRun", "completeRun"]
    assert types("--step", "4") == ["startRun", "startGeneration", "completeRun"]
    assert types("--step", ">5") == ["startGeneration", "completeRun"]
    later = ["startRun", "finishAllToolCalls", "continueToNextStep", "startGeneration", "completeRun"]
    assert types("--step", ">=5") == later
    assert (
        types("--step", "<2")
        == types("--step", "<=1")
        == ["startRun", "startGeneration", "retry", "continueToNextStep"]
    )
    assert types("--step", "2-3", "--tools") == ["callTools", "resolveToolResults", "callTools"]
    assert types("--filter", '.toolCalls[].toolName == "helper"') == ["callTools", "callDelegate"]
    assert types("--filter", '.expertKey == "helper"') == ["startRun", "startGeneration", "completeRun"]
    assert types("--filter", ".stepNumber > 5", "--type", "completeRun") == ["completeRun"]
    assert types("--delegations", "--context", "1") == [
        "callTools",
        "callDelegate",
        "stopRunByDelegate",
        "startRun",
    ]
    every = types()
    assert types("--offset", "3") == every[3:]
    code, out, _ = log(perq, "--job", team_job, "--take", "2", "--offset", "1")
    assert [t for _, t in headers(out)] == every[1:3]
    assert "(showing 2 of 21 matched events)" in out
    code, out, _ = log(perq, "--job", team_job, "--offset", "30")
    assert headers(out) == [] and "(21 events available, use --offset to view)" in out
    code, out, _ = log(perq, "--job", team_job, "--type", "nope")
    assert code == 0 and headers(out) == [] and f"Job: {team_job}" in out


def test_log_json_run_and_checkpoint(team: tuple[Perq, str]) -> None:
    perq, team_job = team
    code, out, _ = log(perq, "--job", team_job, "--json")
    data = json.loads(out)
    assert code == 0 and "\n" not in out.strip()
    assert data["job"]["id"] == team_job and data["job"]["status"] == "completed"
    assert [e["type"] for e in data["events"]] == [e.type for e in perq.events(team_job)]
    assert data["summary"]["totalEvents"] == 21
    assert [c["stepNumber"] for c in data["checkpoints"]] == [1, 2, 3, 4, 5, 6]
    assert data["storagePath"] == str(perq.storage)
    assert (data["totalEventsBeforeLimit"], data["matchedAfterPagination"]) == (21, 21)
    assert "isLatestJob" not in data
    code, pretty, _ = log(perq, "--json", "--pretty", "--errors")
    assert json.loads(pretty)["isLatestJob"] is True and '\n  "job": {' in pretty

    helper_run = next(e.run_id for e in perq.events(team_job) if e.expert_key == "helper")
    code, out, _ = log(perq, "--run", helper_run, "--json")
    assert [e["type"] for e in json.loads(out)["events"]] == ["startRun", "startGeneration", "completeRun"]

    checkpoint = perq.checkpoints(team_job)[-1]
    code, out, _ = log(perq, "--job", team_job, "--checkpoint", checkpoint.id, "--messages")
    assert code == 0
    assert f"Checkpoint: {checkpoint.id}\nStatus: completed\nStep: 6\nExpert: lead\n\nMessages:\n" in out
    assert "  [instructionMessage] " in out and "  [userMessage] Do it" in out
    assert "  [expertMessage] all done" in out
    assert headers(out)[-1] == ("6", "completeRun")  # the events of the checkpoint's run
    code, out, _ = log(perq, "--checkpoint", checkpoint.id, "--json")
    assert json.loads(out)["checkpoint"]["id"] == checkpoint.id
    code, _, err = log(perq, "--job", team_job, "--checkpoint", "missing")
    assert code == 1 and err == "perq: checkpoint not found: missing\n"


# --- live: a follower that shares only Redis with the worker -------------------------------------


def read_lines(proc: subprocess.Popen[str], into: list[tuple[float, str]]) -> threading.Thread:
    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            into.append((time.time(), line.rstrip("\n")))

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def test_follower_on_another_store_prints_every_event_while_the_job_runs(perq: Perq, tmp_path: Path) -> None:
    perq.write("perstack.toml", TEAM)
    perq.write("script.toml", team_script(delay_ms=250))
    job_id = perq.submit("lead", "Do it", *SCRIPT)
    elsewhere = tmp_path / "elsewhere"  # the follower's own store, which never sees this job
    follower = subprocess.Popen(
        [*PERQ, "log", "--follow", "--job", job_id],
        cwd=tmp_path,
        env=perq.env(PERQ_STORAGE=str(elsewhere), COLUMNS="200"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[tuple[float, str]] = []
    pump = read_lines(follower, lines)
    perq.start_worker()
    assert follower.wait(30) == 0, follower.stderr.read() if follower.stderr else ""
    pump.join(5)
    job = perq.job(job_id)
    assert job.status == "completed"

    out = "\n".join(line for _, line in lines)
    stored = [(str(e.step_number), e.type) for e in perq.events(job_id)]
    assert len(stored) == 21
    assert headers(out) == stored  # every event, in order
    assert lines[-1][1] == f"completed: lead - 6 steps ({job_id}) tokens in 130 out 25"
    first_event_at = next(t for t, line in lines if HEADER.match(line))
    assert first_event_at < job.finished_at / 1000 - 0.5, "the follower printed nothing until the job ended"
    assert not (elsewhere / "jobs").exists()


def test_follow_json_lines_of_a_finished_job(team: tuple[Perq, str]) -> None:
    perq, team_job = team
    result = perq.run("log", "--follow", "--job", team_job, "--json", "--tools")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["type"] for r in rows[:-1]] == ["callTools", "resolveToolResults", "callTools"]
    assert rows[-1] == {
        "jobId": team_job,
        "status": "completed",
        "steps": 6,
        "usage": {
            "inputTokens": 130,
            "outputTokens": 25,
            "reasoningTokens": 0,
            "totalTokens": 155,
            "cachedInputTokens": 0,
        },
    }


def test_run_wait_shows_progress_and_the_final_status(perq: Perq) -> None:
    perq.write("perstack.toml", TEAM)
    perq.write("script.toml", team_script())
    perq.start_worker()
    result = perq.run("run", "lead", "Do it", *SCRIPT, "--wait")
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().splitlines()[-1]
    err = result.stderr
    assert (
        "lead: callTools todo" in err
        and "lead: callDelegate" in err
        and "helper: completeRun 'helped'" in err
    )
    assert err.rstrip().endswith("tokens in 130 out 25")
    assert f"completed: lead - 6 steps ({job_id})" in err


async def test_wait_for_job_needs_no_store(redis_server: LocalRedis, tmp_path: Path) -> None:
    """The final status comes from the events when the follower's store does not have the job."""
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_server.url)
    job_id = f"nostore{time.monotonic_ns()}"
    base = {"jobId": job_id, "runId": "r1", "expertKey": "e"}
    checkpoint = {"id": "cp1", "expert": {"key": "e", "name": "e"}, "stepNumber": 1} | base
    events = [
        Event.model_validate(
            base | {"type": "startRun", "stepNumber": 1, "initialCheckpoint": checkpoint | {"status": "init"}}
        ),
        Event.model_validate(
            base
            | {
                "type": "stopRunByInteractiveTool",
                "stepNumber": 1,
                "checkpoint": checkpoint
                | {"usage": {"inputTokens": 3}, "status": "stoppedByInteractiveTool"},
            }
        ),
    ]
    await publish_events(redis, job_id, events)
    seen: list[str] = []
    started = time.monotonic()
    status = await wait_for_job(
        redis, JobStore.open(str(tmp_path / "empty")), job_id, lambda e, p: seen.append(e.type), timeout_s=5
    )
    assert status == "stoppedByInteractiveTool" and seen == ["startRun", "stopRunByInteractiveTool"]
    assert time.monotonic() - started < 0.5  # no waiting for a job record that will never come

    # a continuation's segment starts after the last stop; a stopped job shows its last segment
    first_stop = (await redis.xrevrange(f"perq:events:{job_id}", count=1))[0][0].decode()
    assert await segment_start(redis, job_id, running=None) == "0-0"
    assert await segment_start(redis, job_id, running=True) == first_stop
    await publish_events(redis, job_id, events)
    assert await segment_start(redis, job_id, running=None) == first_stop

    # a cancelled job publishes no last event: its cancel mark ends the wait
    quiet = f"cancelled{time.monotonic_ns()}"
    await redis.set(f"perq:cancel:{quiet}", "1")
    assert await wait_for_job(redis, None, quiet, lambda e, p: None, timeout_s=5) == "cancelled"
    await redis.aclose()


# --- status --watch and --queue -------------------------------------------------------------------


def test_status_watch_keeps_the_table_current_and_ctrl_c_exits_0(team: tuple[Perq, str]) -> None:
    perq, team_job = team
    screen = perq.root / "watch.out"
    with screen.open("w") as sink:
        proc = subprocess.Popen(
            [*PERQ, "status", "--watch"],
            cwd=perq.root,
            env=perq.env(COLUMNS="200", FORCE_COLOR="1"),  # a terminal's frames, as they are drawn
            stdout=sink,
            stderr=subprocess.PIPE,
            text=True,
        )
    # the view is up once it drew a frame (a busy machine may take seconds to start a process)
    wait_until(lambda: "(Ctrl-C to stop)" in screen.read_text(), timeout=30, what="the first frame")
    # a job that appears while the view is up shows in it: the table is read again every second
    later = Job(
        id=f"later{time.monotonic_ns()}", status="queued", coordinator_expert_key="lead", started_at=now_ms()
    )
    perq.store.save_job(later, new=True)
    wait_until(lambda: later.id in screen.read_text(), timeout=30, what="the new job in the view")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    out = screen.read_text()
    assert proc.returncode == 0, err
    assert team_job in out and "completed" in out and "(Ctrl-C to stop)" in out
    assert later.id in out
    perq.store.delete_job(later.id)
    assert perq.run("status", "--watch", "--json").returncode == 2


def test_status_queue_counts_waiting_running_and_workers(perq: Perq) -> None:
    perq.write("perstack.toml", TEAM)
    # six jobs of one 2 s step on one worker: steps wait for 10 s, long enough for three slow `perq status`
    # processes on a loaded machine to see some waiting
    perq.write("slow.toml", script_toml({"helper": [{"text": "helped", "delayMs": 2000}]}))
    for query in ("one", "two", "three", "four", "five", "six"):
        perq.submit("helper", query, "--provider", "script", "--model", "slow.toml")

    def queue() -> dict:  # type: ignore[type-arg]
        result = perq.run("status", "--queue", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)  # type: ignore[no-any-return]

    idle = queue()
    assert (idle["queue"], idle["waiting"], idle["running"], idle["workersAlive"]) == (perq.queue, 6, 0, 0)
    assert idle["oldestWaitingSeconds"] > 0
    perq.start_worker(PERQ_CONCURRENCY="1")
    deadline = time.monotonic() + 15
    busy = queue()
    while (busy["running"], busy["workersAlive"]) != (1, 1) and time.monotonic() < deadline:
        time.sleep(0.1)
        busy = queue()
    # one step runs (concurrency 1) while the others wait
    assert 1 <= busy["waiting"] <= 5 and (busy["running"], busy["workersAlive"]) == (1, 1), busy
    worker = busy["workers"][0]
    assert worker["queue"] == perq.queue and worker["concurrency"] == 1
    text = perq.run("status", "--queue", env=perq.env(COLUMNS="200")).stdout
    assert re.search(r"waiting\s+[1-5]\s", text) and re.search(r"workers alive\s+1\s", text)
    perq.stop_workers()
    assert queue()["workersAlive"] == 0  # a worker that stops cleanly takes its heartbeat with it
