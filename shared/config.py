"""Settings from the environment, and perstack.toml loading (spec §1.11).

perstack.toml is parsed leniently, as Perstack does: unknown keys are dropped, so files written for
Perstack (including its e2e files with misplaced keys) load unchanged.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.models import (
    BASE_SKILL_NAME,
    Expert,
    InteractiveSkill,
    McpSseSkill,
    McpStdioSkill,
    PerqModel,
    ReasoningBudget,
    Skill,
    default_skills,
)

CONFIG_FILE_NAME = "perstack.toml"
DEFAULT_PROVIDER = "anthropic"
DEFAULT_MODEL = "claude-sonnet-4-5"
# Perstack's provider names (spec §7.1) plus perq's offline script provider
PROVIDERS = (
    "anthropic",
    "openai",
    "google",
    "ollama",
    "azure-openai",
    "amazon-bedrock",
    "google-vertex",
    "deepseek",
    "script",
)


class Settings(BaseSettings):
    """perq's own settings, from PERQ_* environment variables."""

    model_config = SettingsConfigDict(env_prefix="PERQ_", extra="ignore")

    redis_url: str = "redis://localhost:6379/0"
    storage: str = "./perstack"
    queue: str = "perq:queue"
    # seconds a worker sleeps between queue polls when nothing wakes it earlier
    poll_delay: float = Field(default=0.05, gt=0)
    # a step's lease: a worker that dies mid-step holds it at most this long before another takes over
    lease_seconds: float = Field(default=10.0, gt=0)
    # concurrent steps per worker process (arq's max_jobs); steps mostly wait on the model
    concurrency: int = Field(default=200, ge=1)
    # worker processes one `perq worker` runs on this machine (None: one per CPU it may use); each runs up
    # to `concurrency` steps, so a machine runs processes x concurrency steps at once
    processes: int | None = Field(default=None, ge=1)
    # on SIGTERM, how long in-flight steps may run before they are handed back to the queue
    grace_seconds: float = Field(default=20.0, ge=0)
    # fsync each store file before the name that publishes it, and its folder after: what a step committed
    # survives a power loss or kernel crash (off: only for stores whose loss you accept, e.g. on tmpfs)
    store_fsync: bool = True

    # how often the workers compare the store's unfinished jobs with the queue (default: 3 leases)
    reconcile_seconds: float | None = Field(default=None, gt=0)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        from shared.redisurl import check_redis_url

        return check_redis_url(v)

    @property
    def reconcile_period(self) -> float:
        return self.reconcile_seconds or 3 * self.lease_seconds


class ConfigError(Exception):
    """Bad configuration or input: the CLI prints it as one line and exits 2."""


class ProviderTable(PerqModel):
    provider_name: str
    setting: dict[str, Any] = Field(default_factory=dict)


class SkillTable(PerqModel):
    type: str = "mcpStdioSkill"
    description: str | None = None
    rule: str | None = None
    pick: list[str] = Field(default_factory=list)
    omit: list[str] = Field(default_factory=list)
    command: str | None = None
    package_name: str | None = None
    args: list[str] | None = None
    required_env: list[str] = Field(default_factory=list)
    lazy_init: bool = False
    endpoint: str | None = None
    tools: dict[str, dict[str, Any]] = Field(default_factory=dict)


class ExpertTable(PerqModel):
    version: str = "1.0.0"
    description: str | None = None
    instruction: str
    skills: dict[str, SkillTable] | None = None
    delegates: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)


class PerstackConfig(PerqModel):
    provider: ProviderTable | None = None
    model: str | None = None
    reasoning_budget: ReasoningBudget | None = None
    runtime: str | None = None
    max_steps: int | None = None
    max_retries: int | None = None
    timeout: int | None = None
    experts: dict[str, ExpertTable] = Field(default_factory=dict)
    env_path: list[str] | None = None
    # the command that runs the base skill as a stdio MCP server instead of perq's in-process base tools
    perstack_base_skill_command: list[str] | None = None

    @field_validator("reasoning_budget", mode="before")
    @classmethod
    def _budget(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v


def find_config(explicit: str | None, cwd: Path | None = None) -> Path | None:
    """`--config` wins; else the nearest perstack.toml from cwd upward; else None."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path.resolve()
    here = (cwd or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / CONFIG_FILE_NAME
        if candidate.is_file():
            return candidate
    return None


def load_config(path: Path) -> PerstackConfig:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"malformed TOML in {path}: {e}") from e
    try:
        return PerstackConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"invalid config {path}: {where}: {first['msg']}") from e


def _skill(name: str, table: SkillTable) -> Skill:
    common: dict[str, Any] = {
        "name": name,
        "description": table.description,
        "rule": table.rule,
        "pick": table.pick,
        "omit": table.omit,
    }
    if table.type == "mcpSseSkill":
        if not table.endpoint:
            raise ConfigError(f'skill "{name}" (mcpSseSkill) has no endpoint')
        return McpSseSkill(endpoint=table.endpoint, **common)
    if table.type == "interactiveSkill":
        return InteractiveSkill.model_validate({**common, "tools": table.tools})
    if table.type == "mcpStdioSkill":
        # packageName/args exclusivity is checked when the skill starts, as Perstack does (spec §1.10)
        return McpStdioSkill(
            command=table.command or "npx",
            package_name=table.package_name,
            args=table.args,
            required_env=table.required_env,
            lazy_init=False if name == BASE_SKILL_NAME else table.lazy_init,
            **common,
        )
    raise ConfigError(f'skill "{name}" has unknown type {table.type!r}')


def build_experts(config: PerstackConfig) -> dict[str, Expert]:
    """The runtime form of every expert in the file: the table key is both key and name (spec §1.9)."""
    experts: dict[str, Expert] = {}
    for key, table in config.experts.items():
        skills = (
            {name: _skill(name, s) for name, s in table.skills.items()}
            if table.skills is not None
            else default_skills()
        )
        experts[key] = Expert(
            key=key,
            name=key,
            version=table.version,
            description=table.description,
            instruction=table.instruction,
            skills=skills,
            delegates=table.delegates,
            tags=table.tags,
        )
    command = [word for word in config.perstack_base_skill_command or [] if word]
    if command:
        for expert in experts.values():
            base = expert.skills.get(BASE_SKILL_NAME)
            if isinstance(base, McpStdioSkill):
                expert.skills[BASE_SKILL_NAME] = base.model_copy(
                    update={
                        "command": command[0],
                        "args": command[1:],
                        "package_name": None,
                        "external_base": True,
                    }
                )
    for expert in experts.values():
        for delegate in expert.delegates:
            if delegate not in experts:
                raise ConfigError(f'delegate expert "{delegate}" of "{expert.key}" not found in experts')
    return experts
