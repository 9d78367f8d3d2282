"""MCP skills end to end: `perq run` enqueues, a real `perq worker` runs the expert, a real server answers."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from shared.models import Checkpoint, SkillConnected, SkillStarting, ToolMessage
from tests.conftest import Perq, script_toml
from tests.mcp_servers import PROBE, remote_server
from tests.support.procs import proc_stat

PYTHON = json.dumps(sys.executable)
BASE = """
[experts.{key}.skills."@perstack/base"]
type = "mcpStdioSkill"
command = "npx"
packageName = "@perstack/base"
pick = ["attemptCompletion"]
"""


def finish(text: str = "done") -> list[dict[str, Any]]:
    return [{"toolCalls": [{"toolName": "attemptCompletion", "args": {}}]}, {"text": text}]


def tool_results(checkpoint: Checkpoint) -> dict[str, list[str]]:
    """Tool name -> texts of its results, over the whole conversation."""
    found: dict[str, list[str]] = {}
    for message in checkpoint.messages:
        if isinstance(message, ToolMessage):
            for part in message.contents:
                found.setdefault(part.tool_name, []).extend(
                    c.text for c in part.contents if c.type == "textPart"
                )
    return found


def submit(perq: Perq, expert: str, query: str = "go") -> str:
    return perq.submit(expert, query, "--provider", "script", "--model", "script.toml")


def test_third_party_stdio_server_answers_through_a_worker(perq: Perq) -> None:
    """mcp-server-time, installed from PyPI, over stdio; `pick` hides its other tool from the model."""
    perq.write(
        "perstack.toml",
        f"""
        [experts.clock]
        instruction = "Answer time questions"
        [experts.clock.skills.time]
        type = "mcpStdioSkill"
        command = {PYTHON}
        args = ["-m", "mcp_server_time", "--local-timezone", "UTC"]
        pick = ["convert_time"]
        """
        + BASE.format(key="clock"),
    )
    convert = {"source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"}
    perq.write(
        "script.toml",
        script_toml(
            {
                "clock": [
                    {
                        "toolCalls": [
                            {"toolName": "convert_time", "args": convert},
                            {"toolName": "get_current_time", "args": {"timezone": "UTC"}},
                        ]
                    },
                    *finish("21:00 in Tokyo"),
                ]
            }
        ),
    )
    job_id = submit(perq, "clock", "noon UTC in Tokyo?")
    perq.burst()

    job = perq.job(job_id)
    assert job.status == "completed", job.error
    results = tool_results(perq.checkpoints(job_id)[-1])
    answer = json.loads(results["convert_time"][0])
    assert answer["target"]["timezone"] == "Asia/Tokyo"
    assert answer["target"]["datetime"].endswith("T21:00:00+09:00")
    assert answer["time_difference"] == "+9.0h"
    # not picked, so not offered, so not found
    assert json.loads(results["get_current_time"][0])["error"] == "ToolNotFound"

    events = perq.events(job_id)
    starting = next(e for e in events if isinstance(e, SkillStarting))
    assert (starting.skill_name, starting.command, starting.args) == (
        "time",
        sys.executable,
        ["-m", "mcp_server_time", "--local-timezone", "UTC"],
    )
    connected = next(e for e in events if isinstance(e, SkillConnected))
    assert connected.server_info is not None and connected.server_info.name == "mcp-time"
    assert connected.step_number == 1 and connected.expert_key == "clock"
    kinds = [e.type for e in events]
    assert kinds.index("skillConnected") < kinds.index("startRun")  # set up before the step began
    assert kinds.count("skillStarting") == 1  # the server was kept for the later steps


def test_skill_process_cannot_read_the_workers_keys(perq: Perq) -> None:
    perq.write(
        "perstack.toml",
        f"""
        [experts.snoop]
        instruction = "Look around"
        [experts.snoop.skills.probe]
        type = "mcpStdioSkill"
        command = {PYTHON}
        args = [{json.dumps(str(PROBE))}]
        requiredEnv = ["PROBE_TOKEN"]
        """
        + BASE.format(key="snoop"),
    )
    perq.write(
        "script.toml",
        script_toml(
            {
                "snoop": [
                    {"toolCalls": [{"toolName": "environ"}, {"toolName": "cwd"}, {"toolName": "pid"}]},
                    *finish(),
                ]
            }
        ),
    )
    job_id = submit(perq, "snoop")
    perq.burst(
        ANTHROPIC_API_KEY="sk-ant-e2e-secret",
        OPENAI_API_KEY="sk-openai-e2e-secret",
        PROBE_TOKEN="declared",
    )
    assert perq.job(job_id).status == "completed"
    results = tool_results(perq.checkpoints(job_id)[-1])
    env = json.loads(results["environ"][0])
    assert "ANTHROPIC_API_KEY" not in env and "OPENAI_API_KEY" not in env
    assert not any("e2e-secret" in v for v in env.values())
    assert env["PROBE_TOKEN"] == "declared"
    assert results["cwd"] == [str(perq.root)]  # the skill works in the job's workspace
    # the worker stopped its servers when it shut down
    pid = int(results["pid"][0])
    stat = proc_stat(pid)
    assert stat is None or stat.state == "Z"


def test_server_killed_between_steps_is_restarted(perq: Perq) -> None:
    perq.write(
        "perstack.toml",
        f"""
        [experts.twice]
        instruction = "Ask twice"
        [experts.twice.skills.probe]
        type = "mcpStdioSkill"
        command = {PYTHON}
        args = [{json.dumps(str(PROBE))}]
        """
        + BASE.format(key="twice"),
    )
    pid_call = {"toolCalls": [{"toolName": "pid"}]}
    perq.write(
        "script.toml",
        script_toml({"twice": [pid_call, {"delayMs": 2500, **pid_call}, *finish()]}),
    )
    perq.start_worker()
    job_id = submit(perq, "twice")

    first = wait_for_first_pid(perq, job_id)
    os.kill(first, signal.SIGKILL)  # while the worker waits on the model in step 2
    job = perq.wait_job(job_id, timeout=60)
    assert job.status == "completed", job.error

    pids = tool_results(perq.checkpoints(job_id)[-1])["pid"]
    assert len(pids) == 2 and int(pids[0]) == first
    assert int(pids[1]) != first
    step2 = [e.type for e in perq.events(job_id) if e.step_number == 2 and e.type.startswith("skill")]
    assert [t for t in step2 if t != "skillStderr"] == [
        "skillDisconnected",
        "skillStarting",
        "skillConnected",
    ]


def wait_for_first_pid(perq: Perq, job_id: str, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        checkpoints = perq.store.list_checkpoints(job_id)[0]
        if checkpoints:
            pids = tool_results(checkpoints[0]).get("pid")
            if pids:
                return int(pids[0])
        time.sleep(0.02)
    raise AssertionError("step 1 never finished")


def test_skills_that_cannot_start_stop_the_run(perq: Perq) -> None:
    perq.write(
        "perstack.toml",
        f"""
        [experts.needy]
        instruction = "x"
        [experts.needy.skills.vault]
        type = "mcpStdioSkill"
        command = {PYTHON}
        args = [{json.dumps(str(PROBE))}]
        requiredEnv = ["PERQ_TEST_NOT_SET"]

        [experts.argless]
        instruction = "x"
        [experts.argless.skills.bare]
        type = "mcpStdioSkill"
        command = "npx"

        [experts.ghost]
        instruction = "x"
        [experts.ghost.skills.phantom]
        type = "mcpStdioSkill"
        command = "perq-no-such-command"
        args = ["serve"]
        """,
    )
    perq.write("script.toml", script_toml({"needy": finish(), "argless": finish(), "ghost": finish()}))
    jobs = {key: submit(perq, key) for key in ("needy", "argless", "ghost")}
    perq.burst()
    expected = {
        "needy": "Skill vault requires environment variable PERQ_TEST_NOT_SET",
        "argless": "Skill bare has no packageName or args. Please provide one of them.",
        "ghost": "Skill phantom could not start: command not found: perq-no-such-command",
    }
    for key, job_id in jobs.items():
        job = perq.job(job_id)
        assert job.status == "stoppedByError"
        assert job.finished_at is not None
        assert job.error is not None and job.error.message == expected[key]
        last = perq.checkpoints(job_id)[-1]
        assert last.status == "stoppedByError" and last.error is not None
        assert last.error.name in ("SkillLaunchError", "SkillError")


@pytest.fixture(scope="module")
def remote_port() -> Iterator[int]:
    with remote_server() as port:
        yield port


def test_remote_skill_over_streamable_http(perq: Perq, remote_port: int) -> None:
    perq.write(
        "perstack.toml",
        f"""
        [experts.calc]
        instruction = "Add"
        [experts.calc.skills.remote]
        type = "mcpSseSkill"
        endpoint = "http://127.0.0.1:{remote_port}/mcp"
        """
        + BASE.format(key="calc"),
    )
    perq.write(
        "script.toml",
        script_toml({"calc": [{"toolCalls": [{"toolName": "add", "args": {"a": 20, "b": 22}}]}, *finish()]}),
    )
    refused = submit(perq, "calc")
    perq.burst(PERQ_ALLOW_LOOPBACK_SKILLS="0")
    job = perq.job(refused)
    assert job.status == "stoppedByError"
    assert job.error is not None
    assert job.error.message.startswith(
        f"Skill remote endpoint http://127.0.0.1:{remote_port}/mcp is refused"
    )
    assert "PERQ_ALLOW_LOOPBACK_SKILLS=1" in job.error.message

    allowed = submit(perq, "calc")
    perq.burst(PERQ_ALLOW_LOOPBACK_SKILLS="1")
    assert perq.job(allowed).status == "completed"
    assert tool_results(perq.checkpoints(allowed)[-1])["add"] == ["42"]
    starting = next(e for e in perq.events(allowed) if isinstance(e, SkillStarting))
    assert starting.transport == "streamable-http"
