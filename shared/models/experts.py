"""Experts and their skills, in their runtime form (what perstack.toml becomes)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from shared.models.core import PerqModel

# --- experts and skills -------------------------------------------------------------------------------------


class _Skill(PerqModel):
    name: str
    description: str | None = None
    rule: str | None = None
    pick: list[str] = Field(default_factory=list)
    omit: list[str] = Field(default_factory=list)


class McpStdioSkill(_Skill):
    type: Literal["mcpStdioSkill"] = "mcpStdioSkill"
    command: str
    package_name: str | None = None
    args: list[str] | None = None
    required_env: list[str] = Field(default_factory=list)
    lazy_init: bool = False
    # perq: the base skill replaced by perstack.toml's perstackBaseSkillCommand, spawned like any stdio skill
    external_base: bool = False


class McpSseSkill(_Skill):
    type: Literal["mcpSseSkill"] = "mcpSseSkill"
    endpoint: str


class InteractiveTool(PerqModel):
    name: str | None = None  # its key in the skill's `tools`; Perstack's readers require it
    description: str | None = None
    input_json_schema: str = '{"type": "object", "properties": {}}'


class InteractiveSkill(_Skill):
    type: Literal["interactiveSkill"] = "interactiveSkill"
    tools: dict[str, InteractiveTool] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _name_tools(self) -> InteractiveSkill:
        for key, tool in self.tools.items():
            if tool.name is None:
                tool.name = key
        return self


Skill = Annotated[McpStdioSkill | McpSseSkill | InteractiveSkill, Field(discriminator="type")]

BASE_SKILL_NAME = "@perstack/base"


def default_skills() -> dict[str, Skill]:
    return {BASE_SKILL_NAME: McpStdioSkill(name=BASE_SKILL_NAME, command="npx", package_name=BASE_SKILL_NAME)}


class Expert(PerqModel):
    key: str
    name: str
    version: str = "1.0.0"
    description: str | None = None
    instruction: str
    skills: dict[str, Skill] = Field(default_factory=default_skills)
    delegates: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)

    def ref(self) -> ExpertRef:
        """How checkpoints and delegation targets name this expert."""
        return ExpertRef(key=self.key, name=self.name, version=self.version)


class ExpertRef(PerqModel):
    key: str
    name: str
    version: str = "1.0.0"
