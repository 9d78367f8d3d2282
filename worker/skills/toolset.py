"""The tools one step offers the model, and who answers each call, in Perstack's lookup order and naming.

Four kinds of tool, in Perstack's lookup order: the in-process base tools, MCP servers (through the
worker's skill pool), interactive tools (coordinator only), and delegates (one tool per delegate expert).
"""

from __future__ import annotations

import asyncio
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from shared.models import (
    BASE_SKILL_NAME,
    Expert,
    InteractiveSkill,
    McpSseSkill,
    McpStdioSkill,
    TextPart,
    ToolCall,
    ToolDefinition,
    ToolResult,
    ToolResultContent,
)
from worker.instruction import delegate_tool_name
from worker.skills.base import BASE_TOOL_DEFINITIONS, CHANGE_NOTHING, ToolContext, call_base_tool

McpSkill = McpStdioSkill | McpSseSkill


class SkillPool(Protocol):
    """Connected MCP skills, kept by the worker across steps (issue: MCP skills)."""

    async def list_tools(self, skill: McpSkill) -> list[ToolDefinition]: ...
    async def call_tool(
        self, skill: McpSkill, tool_name: str, args: dict[str, Any]
    ) -> list[ToolResultContent]: ...


class SkillError(Exception):
    """A skill that cannot be set up; the run stops with this message (it names the skill)."""


def call_error_text(tool_name: str, message: str) -> list[ToolResultContent]:
    """What the model reads when a call of a skill's tool failed: it can try another way."""
    return [TextPart(text=f"Error calling tool {tool_name}: {message}")]


def is_base_skill(skill: McpSkill) -> bool:
    """`@perstack/base`, whatever command or version the file names, means perq's in-process tools, unless
    perstack.toml's perstackBaseSkillCommand replaced it with a server of the user's own."""
    if isinstance(skill, McpStdioSkill) and skill.external_base:
        return False
    if skill.name == BASE_SKILL_NAME:
        return True
    if isinstance(skill, McpStdioSkill):
        words = [skill.package_name or "", *(skill.args or [])]
        return any(w == BASE_SKILL_NAME or w.startswith(BASE_SKILL_NAME + "@") for w in words)
    return False


def filter_tools(tools: list[ToolDefinition], pick: list[str], omit: list[str]) -> list[ToolDefinition]:
    """omit first, then pick; picking a tool that does not exist is ignored, as Perstack does (its own example
    experts pick removed tools)."""
    if omit:
        tools = [t for t in tools if t.name not in omit]
    if pick:
        tools = [t for t in tools if t.name in pick]
    return tools


def text_result(call: ToolCall, text: str) -> ToolResult:
    return ToolResult(
        id=call.id, skill_name=call.skill_name, tool_name=call.tool_name, result=[TextPart(text=text)]
    )


def error_result(call: ToolCall, name: str, message: str) -> ToolResult:
    return text_result(call, json.dumps({"error": name, "message": message}))


# One entry of a skill set's tool list, in Perstack's order: tools already known, or a lazily started MCP
# skill whose tools arrive when its server has started
_Section = list[ToolDefinition] | tuple[McpSkill, "asyncio.Future[list[ToolDefinition]]"]


@dataclass
class SkillSet:
    tools: list[ToolDefinition]
    tool_context: ToolContext
    pool: SkillPool | None = None
    mcp_skills: dict[str, McpSkill] = field(default_factory=dict)
    # the tool list's sections while lazily started skills are still starting (see ready())
    sections: list[_Section] = field(default_factory=list)
    by_name: dict[str, ToolDefinition] = field(init=False)

    def __post_init__(self) -> None:
        self._index()

    def _index(self) -> None:
        self.by_name = {}
        for tool in self.tools:
            self.by_name.setdefault(tool.name, tool)  # the first manager listing a name owns it

    async def ready(self) -> None:
        """Wait for the skills started lazily (`lazyInit`) and put their tools in place. Raises SkillError,
        naming the skill, when one cannot start. Steps that never need the tools never wait."""
        if not any(isinstance(section, tuple) for section in self.sections):
            return
        tools: list[ToolDefinition] = []
        for section in self.sections:
            if isinstance(section, tuple):
                skill, started = section
                self.mcp_skills[skill.name] = skill
                tools.extend(filter_tools(await started, skill.pick, skill.omit))
            else:
                tools.extend(section)
        self.sections = []
        self.tools = tools
        self._index()

    @classmethod
    def empty(cls) -> SkillSet:
        return cls(tools=[], tool_context=ToolContext(workspace=Path("."), store_root=None, todos=[]))

    def classify(self, tool_name: str) -> ToolDefinition | None:
        return self.by_name.get(tool_name)

    def _in_process(self, tool: ToolDefinition) -> bool:
        """Whether perq's own base tools answer `tool` (not a `perstackBaseSkillCommand` server)."""
        return tool.skill_name == BASE_SKILL_NAME and BASE_SKILL_NAME not in self.mcp_skills

    def changes_nothing(self, call: ToolCall) -> bool:
        """Whether a call changes nothing outside its step: a read-only base tool run in-process (`call`);
        an MCP server's tool may do anything."""
        tool = self.by_name.get(call.tool_name)
        return tool is not None and self._in_process(tool) and call.tool_name in CHANGE_NOTHING

    async def call(self, call: ToolCall) -> ToolResult:
        """Answer an MCP or base tool call. Failures become results the model can read, never exceptions."""
        try:
            await self.ready()
        except SkillError as e:
            return text_result(call, f"Error calling tool {call.tool_name}: {e}")
        tool = self.by_name.get(call.tool_name)
        if tool is None:
            return error_result(call, "ToolNotFound", f"Tool {call.tool_name} not found")
        try:
            if self._in_process(tool):
                parts = await call_base_tool(call.tool_name, call.args, self.tool_context)
            else:
                skill = self.mcp_skills[tool.skill_name]
                if self.pool is None:
                    raise SkillError(f'skill "{skill.name}" needs the MCP skill pool')
                parts = await self.pool.call_tool(skill, call.tool_name, call.args)
        except Exception as e:  # a broken tool must not kill the job: the model is told what failed
            return text_result(call, f"Error calling tool {call.tool_name}: {type(e).__name__}: {e}")
        return ToolResult(
            id=call.id, skill_name=tool.skill_name, tool_name=call.tool_name, result=list(parts)
        )

    async def call_all(self, calls: list[ToolCall]) -> list[ToolResult]:
        """MCP and base calls of one response run concurrently, as in Perstack; delegates and interactive
        tools end the step instead."""
        if len(calls) == 1:
            return [await self.call(calls[0])]
        return list(await asyncio.gather(*(self.call(c) for c in calls)))


@functools.cache
def base_tools(pick: tuple[str, ...], omit: tuple[str, ...]) -> list[ToolDefinition]:
    """The base tools an expert is offered; the same few filters recur on every step, so keep them."""
    return filter_tools(BASE_TOOL_DEFINITIONS, list(pick), list(omit))


async def build_skill_set(
    expert: Expert,
    experts: dict[str, Expert],
    *,
    coordinator: bool,
    tool_context: ToolContext,
    pool: SkillPool | None,
) -> SkillSet:
    """The tools of one expert for one step, in Perstack's order: base, MCP, interactive, delegates.

    MCP skills with `lazyInit` start in the background: the step goes on (startRun is not held up) and
    waits for them only when it needs the tools (SkillSet.ready(), before a generation or a tool call).
    """
    tools: list[ToolDefinition] = []
    mcp_skills: dict[str, McpSkill] = {}
    external: list[McpSkill] = []
    for skill in expert.skills.values():
        if isinstance(skill, InteractiveSkill):
            continue
        if is_base_skill(skill):
            tools.extend(base_tools(tuple(skill.pick), tuple(skill.omit)))
        else:
            external.append(skill)
    sections: list[_Section] = []
    if external:
        if pool is None:
            raise SkillError(f'skill "{external[0].name}" is an MCP server and this worker has no skill pool')
        lazy = {
            s.name: asyncio.ensure_future(pool.list_tools(s))
            for s in external
            if isinstance(s, McpStdioSkill) and s.lazy_init
        }
        for started in lazy.values():
            # a lazy skill the step never waited for must not leave an unretrieved exception behind
            started.add_done_callback(lambda f: f.cancelled() or f.exception())
        eager = [s for s in external if s.name not in lazy]
        answers = await asyncio.gather(*(pool.list_tools(s) for s in eager))
        listed = {s.name: found for s, found in zip(eager, answers, strict=True)}
        for skill in external:
            if skill.name in lazy:
                sections.extend([tools, (skill, lazy[skill.name])])
                tools = []
            else:
                mcp_skills[skill.name] = skill
                tools.extend(filter_tools(listed[skill.name], skill.pick, skill.omit))
    if coordinator:  # interactive skills are for the coordinator only: a delegate has no user to ask
        for skill in expert.skills.values():
            if isinstance(skill, InteractiveSkill):
                defs = [
                    ToolDefinition(
                        skill_name=skill.name,
                        name=name,
                        description=tool.description,
                        input_schema=json.loads(tool.input_json_schema),
                        kind="interactive",
                    )
                    for name, tool in skill.tools.items()
                ]
                tools.extend(filter_tools(defs, skill.pick, skill.omit))
    for key in expert.delegates:
        delegate = experts[key]
        tools.append(
            ToolDefinition(
                skill_name=delegate.name,
                name=delegate_tool_name(delegate.name),
                description=delegate.description,
                input_schema={
                    "type": "object",
                    "properties": {"query": {"type": "string"}},
                    "required": ["query"],
                },
                kind="delegate",
            )
        )
    if sections:
        # the tools known now are offered only once the lazy ones are in place (ready() joins the sections)
        sections.append(tools)
        known = [t for section in sections if isinstance(section, list) for t in section]
        return SkillSet(known, tool_context, pool, mcp_skills, sections=sections)
    return SkillSet(tools=tools, tool_context=tool_context, pool=pool, mcp_skills=mcp_skills)
