"""The worker's MCP skill pool against real servers: reuse, restarts, timeouts, isolation, conversions."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.config import McpSection
from shared.models import (
    Event,
    Expert,
    McpSseSkill,
    McpStdioSkill,
    Skill,
    SkillConnected,
    SkillServerInfo,
    SkillStarting,
    SkillStderr,
    TextPart,
    ToolCall,
)
from tests.mcp_servers import PROBE, remote_server
from tests.support.procs import proc_stat
from worker.skills.base import ToolContext
from worker.skills.mcp.pool import McpSkillPool
from worker.skills.scope import SkillScope, set_skill_scope
from worker.skills.toolset import SkillError, build_skill_set

PROBE_TOOLS = ["pid", "environ", "cwd", "echo", "sleep", "fail", "shapes", "nothing", "exit_now"]
WORKER_ENV = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "HOME": os.environ.get("HOME", "/root"),
    "ANTHROPIC_API_KEY": "sk-ant-worker-secret",
    "OPENAI_API_KEY": "sk-openai-worker-secret",
    "PROBE_TOKEN": "declared-value",
}


def probe(name: str = "probe", **fields: Any) -> McpStdioSkill:
    return McpStdioSkill.model_validate(
        {"name": name, "command": sys.executable, "args": [str(PROBE)], **fields}
    )


@pytest.fixture
def events(tmp_path: Path) -> list[Event]:
    """A step scope for the pool, as Runtime.run_step sets one; its events are returned for inspection."""
    collected: list[Event] = []
    set_skill_scope(SkillScope(collected, "job", "run", "expert", 1, str(tmp_path)))
    return collected


@pytest.fixture
async def pool(events: list[Event]) -> AsyncIterator[McpSkillPool]:
    p = McpSkillPool(env=WORKER_ENV, settings=McpSection(call_timeout=5, connect_timeout=20))
    yield p
    await p.close()


async def text_of(pool: McpSkillPool, skill: McpStdioSkill | McpSseSkill, tool: str, **args: Any) -> str:
    parts = await pool.call_tool(skill, tool, args)
    assert len(parts) == 1 and isinstance(parts[0], TextPart), parts
    return parts[0].text


def is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); its state in /proc says it has exited
    stat = proc_stat(pid)
    return stat is None or stat.state != "Z"


async def wait_until(predicate: Any, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def types_of(events: list[Event]) -> list[str]:
    return [e.type for e in events]


# --- tools offered -------------------------------------------------------------------------------------


def expert(skills: dict[str, Skill]) -> Expert:
    return Expert(key="e", name="e", instruction="i", skills=skills)


async def test_pick_and_omit_decide_the_offered_tools(
    pool: McpSkillPool, events: list[Event], tmp_path: Path
) -> None:
    skills: dict[str, Skill] = {
        "picked": probe("picked", pick=["echo", "pid", "think"]),  # a pick that does not exist is ignored
        "omitted": probe("omitted", omit=["echo", "pid", "environ", "exit_now"]),
    }
    ctx = ToolContext(workspace=tmp_path, store_root=None, todos=[])
    skill_set = await build_skill_set(expert(skills), {}, coordinator=True, tool_context=ctx, pool=pool)
    offered = [(t.skill_name, t.name) for t in skill_set.tools]
    assert offered == [("picked", "pid"), ("picked", "echo")] + [
        ("omitted", n) for n in PROBE_TOOLS if n not in ("echo", "pid", "environ", "exit_now")
    ]
    echo = skill_set.by_name["echo"]
    assert echo.description == "Say it back."
    assert echo.input_schema["required"] == ["text"]
    # both skills start the same process in the same environment: one server serves them
    assert types_of(events).count("skillStarting") == 1
    assert len(pool.sessions) == 1
    result = await skill_set.call(
        ToolCall(id="c1", skill_name="picked", tool_name="echo", args={"text": "hi"})
    )
    assert result.skill_name == "picked" and result.result == [TextPart(id=result.result[0].id, text="hi")]


async def test_results_convert_as_perstack_does(pool: McpSkillPool) -> None:
    skill = probe()
    shapes = await pool.call_tool(skill, "shapes", {})
    # text, image, embedded text, embedded blob; audio and resource links are dropped
    assert [p.type for p in shapes] == ["textPart", "imageInlinePart", "textPart", "fileInlinePart"]
    assert shapes[1].mime_type == "image/png"  # type: ignore[union-attr]
    assert shapes[2].text == "embedded"  # type: ignore[union-attr]
    assert shapes[3].mime_type == "application/pdf"  # type: ignore[union-attr]
    assert (
        await text_of(pool, skill, "nothing", why="test")
        == 'Tool nothing returned nothing with arguments: {"why": "test"}'
    )
    assert (await text_of(pool, skill, "fail", message="boom")).startswith("Error calling tool fail: ")
    assert (
        await text_of(pool, skill, "no_such_tool")
        == "Error calling tool no_such_tool: Unknown tool: no_such_tool"
    )


async def test_calls_of_one_response_run_concurrently(pool: McpSkillPool, tmp_path: Path) -> None:
    ctx = ToolContext(workspace=tmp_path, store_root=None, todos=[])
    skill_set = await build_skill_set(
        expert({"probe": probe()}), {}, coordinator=True, tool_context=ctx, pool=pool
    )
    calls = [
        ToolCall(id=f"c{i}", skill_name="probe", tool_name="sleep", args={"seconds": 0.6}) for i in range(3)
    ]
    started = time.monotonic()
    results = await skill_set.call_all(calls)
    assert time.monotonic() - started < 1.5
    assert [r.id for r in results] == ["c0", "c1", "c2"]
    assert all(r.result[0].text == "slept 0.6" for r in results)  # type: ignore[union-attr]


# --- lifecycle -----------------------------------------------------------------------------------------


async def test_server_is_reused_across_calls_and_steps(pool: McpSkillPool, events: list[Event]) -> None:
    skill = probe()
    first = await text_of(pool, skill, "pid")
    await pool.list_tools(skill)
    assert await text_of(pool, skill, "pid") == first
    assert types_of(events).count("skillStarting") == 1
    started = next(e for e in events if isinstance(e, SkillStarting))
    assert (started.skill_name, started.command, started.args, started.endpoint) == (
        "probe",
        sys.executable,
        [str(PROBE)],
        None,
    )
    connected = next(e for e in events if isinstance(e, SkillConnected))
    assert connected.server_info == SkillServerInfo(name="probe", version="1.2.3")
    spawn, handshake = connected.spawn_duration_ms, connected.handshake_duration_ms
    discovery, total = connected.tool_discovery_duration_ms, connected.total_duration_ms
    assert spawn is not None and handshake is not None and discovery is not None and total is not None
    assert min(spawn, handshake, discovery) >= 0
    assert connected.connect_duration_ms == pytest.approx(spawn + handshake, abs=1)
    assert total >= (connected.connect_duration_ms or 0)
    stderr = [(e.skill_name, e.message) for e in events if isinstance(e, SkillStderr)]
    assert ("probe", f"probe ready pid={first}") in stderr
    assert (started.job_id, started.run_id, started.expert_key, started.step_number) == (
        "job",
        "run",
        "expert",
        1,
    )


async def test_killed_server_is_restarted_before_its_next_use(
    pool: McpSkillPool, events: list[Event]
) -> None:
    skill = probe()
    first = int(await text_of(pool, skill, "pid"))
    os.kill(first, signal.SIGKILL)
    await wait_until(lambda: not is_running(first))
    await wait_until(lambda: not next(iter(pool.sessions.values())).alive)  # noticed without a call
    tools = await pool.list_tools(skill)  # the next step lists tools first: that restarts the server
    assert [t.name for t in tools] == PROBE_TOOLS
    second = int(await text_of(pool, skill, "pid"))
    assert second != first and is_running(second)
    lifecycle = [t for t in types_of(events) if t != "skillStderr"]
    assert lifecycle == [
        "skillStarting",
        "skillConnected",
        "skillDisconnected",
        "skillStarting",
        "skillConnected",
    ]


async def test_server_dying_during_a_call_becomes_a_result(pool: McpSkillPool, events: list[Event]) -> None:
    skill = probe()
    first = int(await text_of(pool, skill, "pid"))
    text = await text_of(pool, skill, "exit_now")
    assert text.startswith("Error calling tool exit_now: the server of skill probe stopped during the call")
    assert int(await text_of(pool, skill, "pid")) != first
    assert types_of(events).count("skillDisconnected") == 1


async def test_a_slow_call_times_out_and_the_server_stays(events: list[Event]) -> None:
    pool = McpSkillPool(env=WORKER_ENV, settings=McpSection(call_timeout=0.3))
    try:
        skill = probe()
        first = await text_of(pool, skill, "pid")
        assert await text_of(pool, skill, "sleep", seconds=5) == (
            "Error calling tool sleep: skill probe gave no answer within 0.3 s"
        )
        assert await text_of(pool, skill, "pid") == first
    finally:
        await pool.close()


async def test_idle_servers_are_closed_and_come_back(events: list[Event]) -> None:
    pool = McpSkillPool(env=WORKER_ENV, settings=McpSection(idle_seconds=0.3))
    try:
        skill = probe()
        first = int(await text_of(pool, skill, "pid"))
        await wait_until(lambda: not pool.sessions and not is_running(first))
        second = int(await text_of(pool, skill, "pid"))
        assert second != first
    finally:
        await pool.close()
    await wait_until(lambda: not is_running(second))


async def test_concurrent_steps_start_one_server(pool: McpSkillPool, events: list[Event]) -> None:
    skill = probe()
    listed = await asyncio.gather(*(pool.list_tools(skill) for _ in range(5)))
    assert all(len(t) == len(PROBE_TOOLS) for t in listed)
    assert types_of(events).count("skillStarting") == 1


async def test_close_stops_every_server(events: list[Event], tmp_path: Path) -> None:
    pool = McpSkillPool(env=WORKER_ENV)
    a = int(await text_of(pool, probe(), "pid"))
    b = int(
        await text_of(pool, probe(requiredEnv=["PROBE_TOKEN"]), "pid")
    )  # another environment, another server
    assert a != b
    await pool.close()
    assert not is_running(a) and not is_running(b)
    with pytest.raises(SkillError, match="shutting down"):
        await pool.list_tools(probe())


# --- isolation -----------------------------------------------------------------------------------------


async def test_server_sees_only_safe_and_declared_variables(pool: McpSkillPool, tmp_path: Path) -> None:
    env = json.loads(await text_of(pool, probe(requiredEnv=["PROBE_TOKEN"]), "environ"))
    assert "ANTHROPIC_API_KEY" not in env and "OPENAI_API_KEY" not in env
    assert env["PROBE_TOKEN"] == "declared-value"
    assert env["PATH"] == WORKER_ENV["PATH"]
    # the server works in the step's workspace
    assert await text_of(pool, probe(), "cwd") == str(tmp_path)


# --- failures to start ---------------------------------------------------------------------------------


async def test_start_failures_name_the_skill(pool: McpSkillPool) -> None:
    cases: list[tuple[McpStdioSkill, str]] = [
        (
            McpStdioSkill(name="ghost", command="perq-no-such-command", args=["x"]),
            "Skill ghost could not start: command not found: perq-no-such-command",
        ),
        (
            McpStdioSkill(name="noargs", command=sys.executable),
            "Skill noargs has no packageName or args",
        ),
        (
            probe("needy", requiredEnv=["NOT_SET_ANYWHERE"]),
            "Skill needy requires environment variable NOT_SET_ANYWHERE",
        ),
        (
            McpStdioSkill(
                name="quitter", command=sys.executable, args=["-c", "import sys; sys.exit('no config given')"]
            ),
            "Skill quitter failed during start-up (Connection closed); its stderr ends: no config given",
        ),
    ]
    for skill, message in cases:
        with pytest.raises(SkillError) as raised:
            await pool.list_tools(skill)
        assert str(raised.value).startswith(message)
    assert not pool.sessions


async def test_an_mcp_sdk_that_cannot_be_imported_stops_the_run_naming_the_skill(
    pool: McpSkillPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK is imported when a server first starts: installed but broken (a missing dependency), it is
    the skill's failure to start, said in one line, not a traceback out of the step."""
    monkeypatch.setitem(sys.modules, "worker.skills.mcp.session", None)  # importing it raises ImportError
    with pytest.raises(SkillError, match="Skill probe cannot start: the mcp SDK cannot be imported"):
        await pool.list_tools(probe())
    [said] = await pool.call_tool(probe(), "echo", {"text": "hi"})
    assert said.text.startswith("Error calling tool echo: Skill probe cannot start: the mcp SDK")  # type: ignore[union-attr]
    assert not pool.sessions


async def test_a_server_that_never_answers_times_out(events: list[Event]) -> None:
    pool = McpSkillPool(env=WORKER_ENV, settings=McpSection(connect_timeout=0.5))
    try:
        mute = McpStdioSkill(name="mute", command=sys.executable, args=["-c", "import time; time.sleep(60)"])
        with pytest.raises(SkillError, match=r"Skill mute did not connect within 0\.5 s"):
            await pool.list_tools(mute)
    finally:
        await pool.close()


# --- remote skills -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def remote_port() -> Iterator[int]:
    with remote_server() as port:
        yield port


@pytest.mark.parametrize("path", ["/mcp", "/sse"])
async def test_remote_skill_over_http(remote_port: int, path: str, events: list[Event]) -> None:
    pool = McpSkillPool(env=WORKER_ENV, settings=McpSection(allow_loopback=True))
    try:
        skill = McpSseSkill(name="remote", endpoint=f"http://127.0.0.1:{remote_port}{path}", omit=["pid"])
        ctx = ToolContext(workspace=Path("."), store_root=None, todos=[])
        skill_set = await build_skill_set(
            expert({"remote": skill}), {}, coordinator=True, tool_context=ctx, pool=pool
        )
        assert [t.name for t in skill_set.tools] == ["add"]
        result = await skill_set.call(
            ToolCall(id="c", skill_name="remote", tool_name="add", args={"a": 2, "b": 40})
        )
        assert result.result[0].text == "42"  # type: ignore[union-attr]
        starting = next(e for e in events if isinstance(e, SkillStarting))
        transport = "sse" if path == "/sse" else "streamable-http"
        assert (starting.skill_name, starting.endpoint, starting.transport, starting.command) == (
            "remote",
            skill.endpoint,
            transport,
            None,
        )
        assert "skillConnected" in types_of(events)
    finally:
        await pool.close()


async def test_loopback_endpoint_refused_without_the_setting(remote_port: int, events: list[Event]) -> None:
    pool = McpSkillPool(env=WORKER_ENV, settings=McpSection(allow_loopback=False))
    try:
        skill = McpSseSkill(name="remote", endpoint=f"http://127.0.0.1:{remote_port}/mcp")
        with pytest.raises(
            SkillError, match=r"Skill remote endpoint .* is refused: 127\.0\.0\.1 is a private, loopback"
        ):
            await pool.list_tools(skill)
        text = (await pool.call_tool(skill, "add", {"a": 1, "b": 1}))[0]
        assert isinstance(text, TextPart) and text.text.startswith(
            "Error calling tool add: Skill remote endpoint"
        )
        assert events == []  # nothing was started
    finally:
        await pool.close()


# --- the base skill ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"command": "npx", "packageName": "@perstack/base"},
        {"command": "npx", "packageName": "@perstack/base@0.0.34"},
        {"command": "bunx", "args": ["@perstack/base"]},
        {"command": "/usr/local/bin/my-node", "args": ["--inspect", "@perstack/base@1.2.3"]},
    ],
)
async def test_perstack_base_in_any_form_is_in_process(fields: dict[str, Any], tmp_path: Path) -> None:
    base = McpStdioSkill.model_validate(
        {"name": "tools", "pick": ["readTextFile", "attemptCompletion"], **fields}
    )
    ctx = ToolContext(workspace=tmp_path, store_root=None, todos=[])
    skill_set = await build_skill_set(
        expert({"tools": base}), {}, coordinator=True, tool_context=ctx, pool=None
    )
    assert sorted((t.skill_name, t.name) for t in skill_set.tools) == [
        ("@perstack/base", "attemptCompletion"),
        ("@perstack/base", "readTextFile"),
    ]
