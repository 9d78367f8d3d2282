"""The vertical slice against a real Redis and real `perq` processes: enqueue, run, checkpoint, status.

How the loop itself goes (retries, their cap, errors, max steps) is tested in-process: tests/test_loop.py."""

from __future__ import annotations

import json

import pytest

from shared.models import ResolveToolResults, TextPart
from tests.conftest import Perq, script_toml

HELLO_CONFIG = """
[experts.hello]
instruction = "Say hello"
"""

HELLO_SCRIPT = script_toml(
    {
        "hello": [
            {
                "toolCalls": [{"toolName": "todo", "args": {"newTodos": ["say hello"]}}],
                "usage": {"inputTokens": 120, "outputTokens": 12},
            },
            {"toolCalls": [{"toolName": "todo", "args": {"completedTodos": [0]}}]},
            {"toolCalls": [{"toolName": "attemptCompletion", "args": {}}]},
            {"text": "Hello!"},
        ]
    }
)


def setup_hello(perq: Perq, script: str = HELLO_SCRIPT) -> None:
    perq.write("perstack.toml", HELLO_CONFIG)
    perq.write("script.toml", script)


def test_hello_runs_through_redis_and_a_worker(perq: Perq) -> None:
    setup_hello(perq)
    job_id = perq.submit("hello", "Say hello", "--provider", "script", "--model", "script.toml")
    assert perq.job(job_id).status == "queued"
    perq.burst()

    job = perq.job(job_id)
    assert job.status == "completed"
    assert job.total_steps == 3
    assert (job.usage.input_tokens, job.usage.output_tokens) == (150, 27)
    assert job.finished_at is not None

    checkpoints = perq.checkpoints(job_id)
    assert [c.step_number for c in checkpoints] == [1, 2, 3]
    for cp in checkpoints:
        assert (perq.storage / "jobs" / job_id / "checkpoints" / f"{cp.id}.json").is_file()
    last = checkpoints[-1]
    assert last.status == "completed"
    assert last.messages[-1].type == "expertMessage"
    assert last.messages[-1].contents[-1].text == "Hello!"  # type: ignore[union-attr]
    assert job.head_checkpoint_id == last.id
    assert [t.completed for t in last.todos or []] == [True]

    status = perq.run("status")
    assert status.returncode == 0
    assert f"hello - 3 steps ({job_id})" in status.stdout
    detail = perq.run("status", job_id)
    assert all(f"Step {c.step_number} ({c.id})" in detail.stdout for c in checkpoints)
    data = json.loads(perq.run("status", job_id, "--json").stdout)
    assert data["job"]["totalSteps"] == 3
    assert [c["stepNumber"] for c in data["checkpoints"]] == [1, 2, 3]

    events = [e.type for e in perq.events(job_id)]
    assert events[0] == "startRun"
    assert events.count("continueToNextStep") == 2
    assert events[-3:] == ["callTools", "attemptCompletion", "completeRun"]


def test_checkpoint_carries_perstack_fields(perq: Perq) -> None:
    setup_hello(perq)
    job_id = perq.submit("hello", "Say hello", "--provider", "script", "--model", "script.toml")
    perq.burst()
    path = next((perq.storage / "jobs" / job_id / "checkpoints").iterdir())
    raw = json.loads(path.read_text())
    for key in ("id", "jobId", "runId", "status", "stepNumber", "expert", "usage"):
        assert key in raw
    # the conversation is in the run's message log, named by the file; a reader gets it whole
    assert "messages" not in raw and raw["messagesRef"]["runId"] == raw["runId"]
    loaded = perq.store.load_checkpoint(job_id, raw["id"])
    assert loaded is not None and len(loaded.messages) == raw["messagesRef"]["count"] > 0
    assert set(raw["usage"]) == {
        "inputTokens",
        "outputTokens",
        "reasoningTokens",
        "totalTokens",
        "cachedInputTokens",
    }


@pytest.mark.parametrize(
    ("args", "files", "message"),
    [
        (["nobody", "hi"], {"perstack.toml": HELLO_CONFIG}, "expert 'nobody' not found"),
        (["hello", "hi", "--config", "missing.toml"], {}, "missing.toml"),
        (["hello", "hi"], {"perstack.toml": "[experts.hello\ninstruction = 'x'"}, "malformed TOML"),
        (["hello", "hi", "--provider", "nope"], {"perstack.toml": HELLO_CONFIG}, "unknown provider 'nope'"),
        (["hello", "hi", "--job-id", "a/b"], {"perstack.toml": HELLO_CONFIG}, "invalid job id"),
        (["hello", "hi", "--job-id", ".."], {"perstack.toml": HELLO_CONFIG}, "invalid job id"),
        (["hello", "hi", "--job-id", "x..y"], {"perstack.toml": HELLO_CONFIG}, "invalid job id"),
        (
            ["hello", "hi", "--provider", "script", "--model", "nothere.toml"],
            {"perstack.toml": HELLO_CONFIG},
            "script file not found",
        ),
        (["hello", "hi", "--max-steps", "0"], {"perstack.toml": HELLO_CONFIG}, "--max-steps"),
        (["hello", "hi", "--reasoning-budget", "lots"], {"perstack.toml": HELLO_CONFIG}, "reasoning budget"),
        (["hello", "hi", "--workspace", "nowhere"], {"perstack.toml": HELLO_CONFIG}, "workspace"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(
    perq: Perq, args: list[str], files: dict[str, str], message: str
) -> None:
    for name, text in files.items():
        perq.write(name, text)
    result = perq.run("run", *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not any(perq.storage.iterdir())


def test_no_config_found(perq: Perq) -> None:
    result = perq.run("run", "hello", "hi")
    assert result.returncode == 2
    assert "no perstack.toml found" in result.stderr


def test_redis_unreachable_exits_1_and_leaves_no_job(perq: Perq) -> None:
    setup_hello(perq)
    env = perq.env(PERQ_REDIS_URL="redis://127.0.0.1:1/0")
    result = perq.run("run", "hello", "hi", "--provider", "script", "--model", "script.toml", env=env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach Redis" in lines[0]
    assert not any(perq.storage.iterdir())


def test_json_output(perq: Perq) -> None:
    setup_hello(perq)
    result = perq.run("run", "hello", "hi", "--provider", "script", "--model", "script.toml", "--json")
    data = json.loads(result.stdout)
    assert data["status"] == "queued"
    assert perq.job(data["jobId"]).status == "queued"


def test_job_id_option_names_the_job(perq: Perq) -> None:
    setup_hello(perq)
    job_id = perq.submit(
        "hello", "hi", "--provider", "script", "--model", "script.toml", "--job-id", "my-job_1"
    )
    assert job_id == "my-job_1"
    again = perq.run(
        "run", "hello", "hi", "--provider", "script", "--model", "script.toml", "--job-id", "my-job_1"
    )
    assert again.returncode == 2
    assert "already exists" in again.stderr


@pytest.mark.parametrize(
    ("turns", "code", "status"),
    [
        ([{"text": "done"}], 0, "completed"),
        ([{"error": {"message": "bad key", "retryable": False, "statusCode": 401}}], 1, "stoppedByError"),
        ([{"toolCalls": [{"toolName": "healthCheck"}]}] * 3, 4, "stoppedByMaxSteps"),
    ],
)
def test_wait_exit_codes(perq: Perq, turns: list[dict[str, object]], code: int, status: str) -> None:
    perq.write("perstack.toml", HELLO_CONFIG)
    perq.write("script.toml", script_toml({"hello": turns}))
    perq.start_worker()
    result = perq.run(
        "run",
        "hello",
        "hi",
        "--provider",
        "script",
        "--model",
        "script.toml",
        "--max-steps",
        "2",
        "--wait",
        "--json",
    )
    assert result.returncode == code, result.stderr
    data = json.loads(result.stdout)
    assert data["status"] == status
    assert data["job"]["status"] == status


def test_file_tools_work_in_the_workspace(perq: Perq) -> None:
    perq.write("perstack.toml", HELLO_CONFIG)
    (perq.root / "ws").mkdir()
    perq.write(
        "script.toml",
        script_toml(
            {
                "hello": [
                    {
                        "toolCalls": [
                            {"toolName": "writeTextFile", "args": {"path": "note.txt", "text": "hi there"}}
                        ]
                    },
                    {"toolCalls": [{"toolName": "readTextFile", "args": {"path": "../perstack.toml"}}]},
                    {"text": "done"},
                ]
            }
        ),
    )
    job_id = perq.submit("hello", "hi", "--provider", "script", "--model", "script.toml", "--workspace", "ws")
    perq.burst()
    assert (perq.root / "ws" / "note.txt").read_text() == "hi there"
    results = [e for e in perq.events(job_id) if isinstance(e, ResolveToolResults)]
    refused = results[1].tool_results[0].result[0]
    assert isinstance(refused, TextPart) and "PathDenied" in refused.text
    setting = perq.store.load_run_setting(job_id, perq.checkpoints(job_id)[0].run_id)
    assert setting is not None and setting.workspace == str((perq.root / "ws").resolve())
