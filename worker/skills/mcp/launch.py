"""How to reach an MCP skill: the process to start or the endpoint to call, checked as Perstack checks them.

A launch is a frozen value: it is the key under which the worker's pool keeps a connected session, so two
skills that would start the same process in the same environment share one server, and a change of
command, arguments, environment or working directory gets a server of its own.

Nothing here imports the mcp SDK, so the checks are cheap to test and to run before anything is spawned.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from shared.models import McpSseSkill, McpStdioSkill
from worker.skills.envfilter import filtered_env
from worker.skills.toolset import SkillError

ALLOW_LOOPBACK_VARIABLE = "PERQ_ALLOW_LOOPBACK_SKILLS"


class SkillLaunchError(SkillError):
    """A skill that cannot be started as defined; the message names the skill."""


@dataclass(frozen=True)
class StdioLaunch:
    command: str
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]  # sorted, so that equal environments make equal keys
    cwd: str | None

    def describe(self) -> str:
        return " ".join((self.command, *self.args))


@dataclass(frozen=True)
class RemoteLaunch:
    endpoint: str
    transport: Literal["streamable-http", "sse"]

    def describe(self) -> str:
        return self.endpoint


Launch = StdioLaunch | RemoteLaunch


def command_args(skill: McpStdioSkill) -> tuple[str, list[str]]:
    """`packageName` xor `args`, and `-y` for npx so it never waits on an install prompt, as Perstack checks a
    skill definition."""
    name, package, args = skill.name, skill.package_name, skill.args or []
    # a base skill replaced by perstackBaseSkillCommand may be a bare command: it has neither, by design
    if not package and not args and not skill.external_base:
        raise SkillLaunchError(f"Skill {name} has no packageName or args. Please provide one of them.")
    if package and args:
        raise SkillLaunchError(
            f"Skill {name} has both packageName and args. Please provide only one of them."
        )
    words = list(args) if args else [package or ""]
    if skill.command == "npx" and "-y" not in words:
        words = ["-y", *words]
    return skill.command, words


def skill_env(skill: McpStdioSkill, worker_env: Mapping[str, str]) -> dict[str, str]:
    """The safe variables plus the skill's declared ones; a missing declared one fails at launch, not
    mid-call."""
    declared: dict[str, str] = {}
    for variable in skill.required_env:
        value = worker_env.get(variable)
        if value is None:
            raise SkillLaunchError(f"Skill {skill.name} requires environment variable {variable}")
        declared[variable] = value
    return filtered_env(worker_env, declared)


def stdio_launch(skill: McpStdioSkill, worker_env: Mapping[str, str], cwd: str | None) -> StdioLaunch:
    command, args = command_args(skill)
    env = skill_env(skill, worker_env)
    return StdioLaunch(command=command, args=tuple(args), env=tuple(sorted(env.items())), cwd=cwd)


# --- remote endpoints -----------------------------------------------------------------------------------


def _is_loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _is_internal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Private, loopback, link-local and the other addresses a skill endpoint may not point at."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    # Stricter than Perstack's list of private ranges: anything not globally routable (shared CGNAT space,
    # documentation and benchmark ranges, ...) is as much "inside" as 10.0.0.0/8.
    return not address.is_global or address.is_multicast


def _refusal(
    skill_name: str,
    endpoint: str,
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
    allow: bool,
) -> str | None:
    for address in addresses:
        if allow and _is_loopback(address):
            continue
        if _is_internal(address):
            hint = ""
            if _is_loopback(address):
                hint = f" (set {ALLOW_LOOPBACK_VARIABLE}=1 on the worker to allow loopback for development)"
            return (
                f"Skill {skill_name} endpoint {endpoint} is refused: {address} is a private, loopback or "
                f"link-local address{hint}"
            )
    return None


def _host_addresses(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    """The host as an IP literal, `localhost` as loopback, or None for a name that must be resolved."""
    if host == "localhost" or host.endswith(".localhost"):
        return [ipaddress.ip_address("127.0.0.1")]
    try:
        return [ipaddress.ip_address(host.split("%", 1)[0])]
    except ValueError:
        return None


def remote_launch(skill: McpSseSkill, *, allow_loopback: bool) -> RemoteLaunch:
    """Check an endpoint before connecting: https, and no internal address (a model must not reach the
    worker's network).

    With `allow_loopback` (PERQ_ALLOW_LOOPBACK_SKILLS=1) a loopback endpoint is allowed, over http too:
    a server on this machine for development and tests. Other internal addresses stay refused.
    """
    endpoint = skill.endpoint
    try:
        parts = urlsplit(endpoint)
        host = (parts.hostname or "").lower().rstrip(".")
    except ValueError:
        parts, host = urlsplit(""), ""
    if parts.scheme not in ("http", "https") or not host:
        raise SkillLaunchError(f"Skill {skill.name} endpoint {endpoint!r} is not an https URL")
    literal = _host_addresses(host)
    if literal is not None:  # first, so that a refused loopback address says how to allow it
        refusal = _refusal(skill.name, endpoint, literal, allow_loopback)
        if refusal:
            raise SkillLaunchError(refusal)
    loopback = literal is not None and all(_is_loopback(a) for a in literal)
    if parts.scheme != "https" and not (allow_loopback and loopback):
        raise SkillLaunchError(f"Skill {skill.name} endpoint {endpoint} is refused: only https is allowed")
    # MCP's streamable HTTP is the default; an endpoint whose path ends in /sse is the older SSE transport.
    transport: Literal["streamable-http", "sse"] = (
        "sse" if parts.path.rstrip("/").endswith("/sse") else "streamable-http"
    )
    return RemoteLaunch(endpoint=endpoint, transport=transport)


async def check_resolved(skill_name: str, launch: RemoteLaunch, *, allow_loopback: bool) -> None:
    """Checked again at connect time on the resolved addresses, so a public-looking name that points
    inside is refused too. A name that does not resolve is left to the connection to report."""
    host = (urlsplit(launch.endpoint).hostname or "").lower().rstrip(".")
    if _host_addresses(host) is not None:
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    refusal = _refusal(skill_name, launch.endpoint, addresses, allow_loopback)
    if refusal:
        raise SkillLaunchError(refusal)
