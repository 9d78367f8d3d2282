"""MCP skill options through a real worker. `lazyInit`: the step starts (startRun) without waiting for the
server, the model is still offered its tools, its calls reach it, and a lazy skill that cannot start still
stops the run naming it. `perstackBaseSkillCommand`: the base skill is that server instead of perq's
in-process tools."""

from __future__ import annotations

import json
import sys

from shared.config import PerstackConfig, build_experts
from shared.models import BASE_SKILL_NAME, McpStdioSkill, SkillStarting
from tests.conftest import Perq, script_toml
from tests.mcp_servers import PROBE
from tests.test_mcp_e2e import BASE, finish, submit, tool_results

PYTHON = json.dumps(sys.executable)


def _config(lazy: bool, command: str = PYTHON) -> str:
    return f"""
        [experts.lazy]
        instruction = "Echo"
        [experts.lazy.skills.probe]
        type = "mcpStdioSkill"
        command = {command}
        args = [{json.dumps(str(PROBE))}]
        lazyInit = {json.dumps(lazy)}
        pick = ["echo"]
        """ + BASE.format(key="lazy")


def test_a_lazy_skill_does_not_hold_up_the_start_of_the_run(perq: Perq) -> None:
    perq.write("perstack.toml", _config(lazy=True))
    perq.write(
        "script.toml",
        script_toml({"lazy": [{"toolCalls": [{"toolName": "echo", "args": {"text": "hi"}}]}, *finish()]}),
    )
    job_id = submit(perq, "lazy")
    perq.burst()

    assert perq.job(job_id).status == "completed"
    assert tool_results(perq.checkpoints(job_id)[-1])["echo"] == ["hi"]
    kinds = [e.type for e in perq.events(job_id)]
    # the run started, then the server was waited for when the first generation needed its tools
    assert kinds.index("startRun") < kinds.index("skillStarting") < kinds.index("skillConnected")
    assert kinds.index("skillConnected") < kinds.index("callTools")


def test_an_eager_skill_is_connected_before_the_run_starts(perq: Perq) -> None:
    perq.write("perstack.toml", _config(lazy=False))
    perq.write(
        "script.toml",
        script_toml({"lazy": [{"toolCalls": [{"toolName": "echo", "args": {"text": "hi"}}]}, *finish()]}),
    )
    job_id = submit(perq, "lazy")
    perq.burst()

    assert perq.job(job_id).status == "completed"
    kinds = [e.type for e in perq.events(job_id)]
    assert kinds.index("skillConnected") < kinds.index("startRun")


def test_a_lazy_skill_that_cannot_start_stops_the_run_naming_it(perq: Perq) -> None:
    perq.write("perstack.toml", _config(lazy=True, command=json.dumps("/nonexistent/perq-no-such-server")))
    perq.write("script.toml", script_toml({"lazy": finish()}))
    job_id = submit(perq, "lazy")
    perq.burst()

    assert perq.job(job_id).status == "stoppedByError"
    error = perq.checkpoints(job_id)[-1].error
    assert error is not None and "probe" in error.message


def test_perstack_base_skill_command_replaces_the_in_process_base(perq: Perq) -> None:
    perq.write(
        "perstack.toml",
        f"""
        perstackBaseSkillCommand = [{PYTHON}, {json.dumps(str(PROBE))}]
        [experts.own-base]
        instruction = "Echo"
        """,
    )
    perq.write(
        "script.toml",
        script_toml(
            {
                "own-base": [
                    {"toolCalls": [{"toolName": "echo", "args": {"text": "from my base"}}]},
                    {"toolCalls": [{"toolName": "todo", "args": {"newTodos": ["x"]}}]},
                    {"text": "done"},
                ]
            }
        ),
    )
    job_id = perq.submit("own-base", "go", "--provider", "script", "--model", "script.toml")
    perq.burst()

    assert perq.job(job_id).status == "completed"
    last = perq.checkpoints(job_id)[-1]
    results = tool_results(last)
    assert results["echo"] == ["from my base"]  # answered by the server the command started
    assert json.loads(results["todo"][0])["error"] == "ToolNotFound"  # perq's base tools are not offered
    assert last.todos is None
    starting = next(e for e in perq.events(job_id) if isinstance(e, SkillStarting))
    assert starting.skill_name == BASE_SKILL_NAME
    assert starting.command == sys.executable


def test_perstack_base_skill_command_keeps_the_base_skills_filters() -> None:
    config = PerstackConfig.model_validate(
        {
            "perstackBaseSkillCommand": ["node", "base.js", "--flag"],
            "experts": {
                "a": {"instruction": "x"},
                "b": {
                    "instruction": "y",
                    "skills": {
                        BASE_SKILL_NAME: {"type": "mcpStdioSkill", "command": "npx", "pick": ["exec"]}
                    },
                },
            },
        }
    )
    experts = build_experts(config)
    for key in ("a", "b"):
        base = experts[key].skills[BASE_SKILL_NAME]
        assert isinstance(base, McpStdioSkill) and base.external_base
        assert (base.command, base.args, base.package_name) == ("node", ["base.js", "--flag"], None)
    assert experts["b"].skills[BASE_SKILL_NAME].pick == ["exec"]
    # without the key, the base stays perq's in-process tools
    plain = build_experts(PerstackConfig.model_validate({"experts": {"a": {"instruction": "x"}}}))
    assert not plain["a"].skills[BASE_SKILL_NAME].external_base  # type: ignore[union-attr]
