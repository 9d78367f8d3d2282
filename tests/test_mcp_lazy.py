"""`lazyInit` MCP skills through a real worker: the step starts (startRun) without waiting for the server, the
model is still offered its tools, its calls reach it, and a lazy skill that cannot start still stops the run
with a message naming it."""

from __future__ import annotations

import json
import sys

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
