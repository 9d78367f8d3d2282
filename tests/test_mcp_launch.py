"""How an MCP skill is started: command and arguments, environment, endpoint checks (spec §1.10, §6.5)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from shared.models import McpSseSkill, McpStdioSkill
from worker.skills.mcp.launch import (
    ALLOW_LOOPBACK_VARIABLE,
    RemoteLaunch,
    SkillLaunchError,
    check_resolved,
    command_args,
    remote_launch,
    stdio_launch,
)
from worker.skills.toolset import SkillError

WORKER_ENV = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/home/worker",
    "ANTHROPIC_API_KEY": "sk-ant-secret",
    "OPENAI_API_KEY": "sk-openai-secret",
    "GITHUB_TOKEN": "ghp-token",
    "LD_PRELOAD": "/tmp/evil.so",
}


def stdio(**fields: object) -> McpStdioSkill:
    return McpStdioSkill.model_validate({"name": "fs", "command": "npx", **fields})


def test_package_name_or_args_exactly_one() -> None:
    with pytest.raises(SkillLaunchError, match="Skill fs has no packageName or args"):
        command_args(stdio())
    with pytest.raises(SkillLaunchError, match="Skill fs has no packageName or args"):
        command_args(stdio(args=[]))
    with pytest.raises(SkillLaunchError, match="Skill fs has both packageName and args"):
        command_args(stdio(packageName="@x/y", args=["@x/y"]))
    assert issubclass(SkillLaunchError, SkillError)  # the runtime stops the run with the message


def test_npx_gets_minus_y_once() -> None:
    assert command_args(stdio(packageName="@x/server")) == ("npx", ["-y", "@x/server"])
    assert command_args(stdio(args=["@x/server", "--flag"])) == ("npx", ["-y", "@x/server", "--flag"])
    assert command_args(stdio(args=["-y", "@x/server"])) == ("npx", ["-y", "@x/server"])
    uvx = McpStdioSkill(name="t", command="uvx", package_name="mcp-server-time")
    assert command_args(uvx) == ("uvx", ["mcp-server-time"])


def test_environment_is_filtered_and_required_env_passed() -> None:
    launch = stdio_launch(stdio(args=["s"], requiredEnv=["GITHUB_TOKEN", "LD_PRELOAD"]), WORKER_ENV, "/ws")
    env = dict(launch.env)
    assert env == {"PATH": "/usr/bin:/bin", "HOME": "/home/worker", "GITHUB_TOKEN": "ghp-token"}
    assert launch.cwd == "/ws"
    assert launch.args == ("-y", "s")


def test_missing_required_env_names_skill_and_variable() -> None:
    with pytest.raises(SkillLaunchError, match=r"^Skill fs requires environment variable GH_TOKEN$"):
        stdio_launch(stdio(args=["s"], requiredEnv=["GH_TOKEN"]), WORKER_ENV, None)


def test_launch_is_the_pool_key() -> None:
    a = stdio_launch(stdio(args=["s"]), WORKER_ENV, "/ws")
    assert a == stdio_launch(stdio(name="other", args=["s"], pick=["x"]), WORKER_ENV, "/ws")
    assert a != stdio_launch(stdio(args=["s"]), WORKER_ENV, "/elsewhere")
    assert a != stdio_launch(stdio(args=["s"]), {**WORKER_ENV, "PATH": "/bin"}, "/ws")
    assert a != stdio_launch(stdio(args=["s"], requiredEnv=["GITHUB_TOKEN"]), WORKER_ENV, "/ws")


def sse(endpoint: str) -> McpSseSkill:
    return McpSseSkill(name="remote", endpoint=endpoint)


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://mcp.example.com/mcp",
        "https://93.184.216.34/mcp",
        "https://[2606:2800:220:1:248:1893:25c8:1946]/mcp",
    ],
)
def test_public_https_endpoints_pass(endpoint: str) -> None:
    assert remote_launch(sse(endpoint), allow_loopback=False) == RemoteLaunch(endpoint, "streamable-http")


def test_sse_path_picks_the_sse_transport() -> None:
    assert remote_launch(sse("https://mcp.example.com/sse"), allow_loopback=False).transport == "sse"


@pytest.mark.parametrize(
    ("endpoint", "reason"),
    [
        ("http://mcp.example.com/mcp", "only https is allowed"),
        ("ftp://mcp.example.com/mcp", "is not an https URL"),
        ("not a url", "is not an https URL"),
        ("https://127.0.0.1/mcp", "loopback"),
        ("https://localhost:8443/mcp", "loopback"),
        ("https://[::1]/mcp", "loopback"),
        ("https://localhost./mcp", "loopback"),
        ("http://127.0.0.1:8000/mcp", "loopback"),
        ("https://[::ffff:127.0.0.1]/mcp", "loopback"),
        ("https://10.1.2.3/mcp", "private"),
        ("https://172.16.0.1/mcp", "private"),
        ("https://192.168.1.1/mcp", "private"),
        ("https://169.254.169.254/latest", "link-local"),
        ("https://[fe80::1]/mcp", "link-local"),
        ("https://[fd00::1]/mcp", "private"),
        ("https://0.0.0.0/mcp", "private"),
        ("https://100.64.0.1/mcp", "private"),
    ],
)
def test_refused_endpoints(endpoint: str, reason: str) -> None:
    with pytest.raises(SkillLaunchError, match=f"Skill remote endpoint .*{reason}"):
        remote_launch(sse(endpoint), allow_loopback=False)


def test_loopback_setting_allows_loopback_only() -> None:
    for endpoint in ("http://127.0.0.1:8000/mcp", "http://localhost:8000/mcp", "https://[::1]:8000/mcp"):
        assert remote_launch(sse(endpoint), allow_loopback=True).endpoint == endpoint
    for endpoint in ("http://10.0.0.1/mcp", "https://192.168.0.1/mcp", "http://mcp.example.com/mcp"):
        with pytest.raises(SkillLaunchError):
            remote_launch(sse(endpoint), allow_loopback=True)


def test_refusal_names_the_setting() -> None:
    with pytest.raises(SkillLaunchError, match=ALLOW_LOOPBACK_VARIABLE):
        remote_launch(sse("http://127.0.0.1:9/mcp"), allow_loopback=False)


async def test_resolved_names_are_checked_at_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    """A public-looking name that resolves inside is refused when the connection is made."""
    loop = asyncio.get_running_loop()
    answers = {
        "inside.example.com": "10.0.0.5",
        "home.example.com": "127.0.0.1",
        "out.example.com": "93.184.216.34",
    }

    async def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> list[Any]:
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], 0))]

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)

    def launch(host: str) -> RemoteLaunch:
        return RemoteLaunch(f"https://{host}/mcp", "streamable-http")

    with pytest.raises(SkillLaunchError, match=r"10\.0\.0\.5 is a private"):
        await check_resolved("remote", launch("inside.example.com"), allow_loopback=True)
    with pytest.raises(SkillLaunchError, match="loopback"):
        await check_resolved("remote", launch("home.example.com"), allow_loopback=False)
    await check_resolved("remote", launch("home.example.com"), allow_loopback=True)
    await check_resolved("remote", launch("out.example.com"), allow_loopback=False)
    # a name that does not resolve is left for the connection to report
    await check_resolved("remote", launch("nowhere.example.com"), allow_loopback=False)
