"""A worker's MCP skill servers, kept connected across steps and jobs (`SkillPool`, toolset.py).

The mcp SDK is imported when the first server starts, not with the pool: it is half a worker's start-up
(0.4 s of CPU per process, paid again by each restarted child), and most experts use only the in-process
base skill.

A server is keyed by its launch (command, arguments, filtered environment and working directory, or
endpoint), so every step that needs the same server reuses one session and its cached tool list instead of
paying a process start and handshake per step. A server found dead is started again before it is used; one
left unused for `PERQ_SKILL_IDLE_SECONDS` is closed; all are closed when the worker shuts down.

Setting a skill up may fail, and then the step's run stops with the message (it names the skill). A tool
call never fails: a protocol error, a crashed server or a timeout becomes a result that tells the model what
went wrong, so the model can try another way, as Perstack does.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from shared.config import McpSection
from shared.models import McpStdioSkill, ToolDefinition, ToolResultContent
from worker.skills.mcp.launch import Launch, remote_launch, stdio_launch
from worker.skills.scope import SkillScope, current_skill_scope
from worker.skills.toolset import McpSkill, SkillError, call_error_text

if TYPE_CHECKING:
    from worker.skills.mcp.session import SkillSession

log = logging.getLogger("perq.skills")


class McpSkillPool:
    def __init__(self, env: Mapping[str, str] | None = None, settings: McpSection | None = None) -> None:
        # The worker's environment: requiredEnv is looked up here, and filtered before a server sees it.
        self.env = dict(os.environ if env is None else env)
        self.settings = settings or McpSection()
        self._sessions: dict[Launch, SkillSession] = {}
        self._starting: dict[Launch, asyncio.Lock] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False

    # --- the SkillPool protocol ---------------------------------------------------------------------

    async def list_tools(self, skill: McpSkill) -> list[ToolDefinition]:
        session = await self._session(skill, current_skill_scope())  # the SDK imported (`_session`)
        from worker.skills.mcp.convert import tool_definitions

        session.touch()
        return tool_definitions(skill.name, session.tools)

    async def call_tool(
        self, skill: McpSkill, tool_name: str, args: dict[str, Any]
    ) -> list[ToolResultContent]:
        scope = current_skill_scope()
        try:
            session = await self._session(skill, scope)  # the SDK imported (`_session`)
        except SkillError as e:
            return call_error_text(tool_name, str(e))
        from mcp.shared.exceptions import MCPError

        from worker.skills.mcp.convert import result_contents
        from worker.skills.mcp.session import Listener, SkillConnectionLost, describe_error

        limit = self.settings.call_timeout
        try:
            result = await session.call_tool(
                tool_name, args, limit_s=limit, listener=Listener(scope, skill.name)
            )
        except TimeoutError:
            return call_error_text(tool_name, f"skill {skill.name} gave no answer within {limit:g} s")
        except SkillConnectionLost as e:
            return call_error_text(
                tool_name, f"the server of skill {skill.name} stopped during the call: {e}"
            )
        except MCPError as e:
            return call_error_text(tool_name, e.message)
        except Exception as e:  # whatever else the SDK raises is still only this call's failure
            return call_error_text(tool_name, describe_error(e))
        return result_contents(tool_name, args, result)

    async def close(self) -> None:
        """Close every server (on worker shutdown); individual close errors are ignored."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        sessions = list(self._sessions.values())
        self._sessions.clear()
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)

    # --- sessions -----------------------------------------------------------------------------------

    def launch_of(self, skill: McpSkill, scope: SkillScope | None) -> Launch:
        if isinstance(skill, McpStdioSkill):
            # A stdio server works in the job's workspace, as Perstack's does in the directory it runs in.
            cwd = scope.workspace if scope and scope.workspace and os.path.isdir(scope.workspace) else None
            return stdio_launch(skill, self.env, cwd)
        return remote_launch(skill, allow_loopback=self.settings.allow_loopback)

    @property
    def sessions(self) -> dict[Launch, SkillSession]:
        return dict(self._sessions)

    async def _session(self, skill: McpSkill, scope: SkillScope | None) -> SkillSession:
        """The live session for this skill, started (or restarted) when there is none. Raises SkillError."""
        try:
            from worker.skills.mcp.session import SkillSession
        except ImportError as e:  # installed but broken (a missing dependency): the run stops, saying so
            raise SkillError(f"Skill {skill.name} cannot start: the mcp SDK cannot be imported: {e}") from e

        if self._closed:
            raise SkillError(f"Skill {skill.name} cannot start: the worker is shutting down")
        launch = self.launch_of(skill, scope)
        session = self._sessions.get(launch)
        if session is not None and session.alive:
            return session  # the common path: no await, so nothing can close it before the caller uses it
        lock = self._starting.setdefault(launch, asyncio.Lock())
        async with lock:  # concurrent steps wait for one start instead of spawning one server each
            session = self._sessions.get(launch)
            if session is not None and session.alive:
                return session
            if session is not None:
                log.info("skill %s: server %s is gone; starting it again", skill.name, launch.describe())
                if scope is not None and not session.disconnect_reported:
                    scope.emit("skillDisconnected", skillName=skill.name)
                del self._sessions[launch]
                await session.close()
            session = SkillSession(launch, allow_loopback=self.settings.allow_loopback)
            await session.start(skill.name, scope, limit_s=self.settings.connect_timeout)
            if self._closed:  # the worker began shutting down while this server started
                await session.close()
                raise SkillError(f"Skill {skill.name} cannot start: the worker is shutting down")
            self._sessions[launch] = session
            self._start_reaper()
            return session

    def _start_reaper(self) -> None:
        if self._reaper is None and self.settings.idle_seconds > 0:
            # Its own context, like the sessions: it belongs to the worker, not to the step that started it.
            self._reaper = asyncio.get_running_loop().create_task(self._reap(), context=contextvars.Context())

    async def _reap(self) -> None:
        idle = self.settings.idle_seconds
        while True:
            await asyncio.sleep(min(max(idle / 4, 0.05), 30.0))
            now = time.monotonic()
            for launch, session in list(self._sessions.items()):
                unused = session.in_flight == 0 and now - session.last_used >= idle
                if unused or not session.alive:
                    if self._sessions.get(launch) is session:
                        del self._sessions[launch]
                    log.info("skill server %s closed (%s)", launch.describe(), "idle" if unused else "gone")
                    await session.close()
