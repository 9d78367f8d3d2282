"""The instruction (system) message of a fresh run, worded as Perstack's, with the run's start as "now"."""

from __future__ import annotations

from datetime import UTC, datetime

from shared.models import Expert, InstructionMessage, TextPart

META_INSTRUCTION = """You are an expert agent running in a loop. Rules:
- Keep calling tools until the task is done; each response may call several tools.
- When the task is done, or it is outside your expertise, or the request is unintelligible, call
  attemptCompletion alone, without any text. The final result will be requested from you separately.
- Current time: {now}
- Working directory: {cwd}"""


def delegate_tool_name(expert_name: str) -> str:
    """A delegate is offered as a tool named after the last path segment of its name, as Perstack names
    delegate tools."""
    return expert_name.rsplit("/", 1)[-1]


def build_instruction(
    expert: Expert, experts: dict[str, Expert], started_at_ms: int, workspace: str
) -> InstructionMessage:
    now = datetime.fromtimestamp(started_at_ms / 1000, UTC).isoformat()
    sections = [META_INSTRUCTION.format(now=now, cwd=workspace), expert.instruction]
    for name, skill in expert.skills.items():
        if skill.rule:
            sections.append(f'"{name}" skill rules: {skill.rule}')
    for key in expert.delegates:
        delegate = experts.get(key)
        if delegate is not None:
            sections.append(f'About "{delegate.name}": {delegate.description or ""}'.rstrip())
    return InstructionMessage(contents=[TextPart(text="\n\n".join(sections))], cache=True)
