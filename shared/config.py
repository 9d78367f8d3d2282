"""Settings from the environment (`Settings`, one section per part of perq), and perstack.toml loading.

perstack.toml is parsed leniently, as Perstack does: unknown keys are dropped, so files written for
Perstack (including its e2e files with misplaced keys) load unchanged.
"""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path
from typing import Any

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.models import (
    BASE_SKILL_NAME,
    Expert,
    InteractiveSkill,
    McpSseSkill,
    McpStdioSkill,
    PerqModel,
    ReasoningBudget,
    RunLimits,
    Skill,
    default_skills,
)

CONFIG_FILE_NAME = "perstack.toml"
DEFAULT_PROVIDER = "anthropic"
DEFAULT_MODEL = "claude-sonnet-4-5"
# Perstack's provider names plus perq's offline script provider
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


class ConfigError(Exception):
    """Bad configuration or input: the CLI prints it as one line and exits 2."""


class SettingsError(ConfigError):
    """A PERQ_* variable that does not parse; the message names the variable, never its value (a Redis URL
    may hold a password)."""


class _Section(BaseSettings):
    """One section of `Settings`, read from its own variables.

    A field is read from `env_prefix` + its name, or from its `validation_alias` when it has one: those
    aliases keep the flat names perq has always read (PERQ_STORAGE, PERQ_QUEUE...). An empty variable
    counts as unset. Any value that does not parse raises `SettingsError` naming the variable.
    """

    model_config = SettingsConfigDict(env_prefix="PERQ_", extra="ignore", env_ignore_empty=True)

    def __init__(self, **values: Any) -> None:
        # A field given by name is passed on under its variable: pydantic's populate_by_name would do the same
        # but would also read prefix + name from the environment (PERQ_STORE_LOCATION), a name perq never had.
        fields = type(self).model_fields
        values = {
            type(self).variable(k) if k in fields and fields[k].validation_alias else k: v
            for k, v in values.items()
        }
        try:
            super().__init__(**values)
        except ValidationError as e:
            first = e.errors()[0]
            where = str(first["loc"][0]) if first["loc"] else ""
            # a field validator's ValueError carries the message meant for the user
            error = first.get("ctx", {}).get("error") if first["type"] == "value_error" else None
            message = str(error) if error is not None else first["msg"]
            raise SettingsError(f"invalid setting {type(self).variable(where)}: {message}") from None

    @classmethod
    def variables(cls) -> dict[str, str]:
        """Each variable the section reads, with the field it fills (a field with aliases has several)."""
        found: dict[str, str] = {}
        for name, field in cls.model_fields.items():
            alias = field.validation_alias
            choices = alias.choices if isinstance(alias, AliasChoices) else [alias or cls.variable(name)]
            found.update({str(choice).upper(): name for choice in choices})
        return found

    @classmethod
    def variable(cls, name: str) -> str:
        field = cls.model_fields.get(name)
        if field is None:  # pydantic names an aliased field by the alias it was given
            return name.upper()
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            alias = alias.choices[0]
        if isinstance(alias, str):
            return alias.upper()
        return f"{cls.model_config.get('env_prefix', '')}{name}".upper()


class RedisSection(_Section):
    """The queue: where Redis is and the arq queue's name."""

    model_config = SettingsConfigDict(env_prefix="PERQ_REDIS_")

    # PERQ_REDIS_URL: redis://, rediss://, unix:// or a Sentinel address (shared/redisurl.py)
    url: str = "redis://localhost:6379/0"
    queue: str = Field(default="perq:queue", validation_alias="PERQ_QUEUE")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        from shared.redisurl import check_redis_url

        return check_redis_url(v)


class StoreSection(_Section):
    """The job store: a folder, or s3://bucket/prefix."""

    model_config = SettingsConfigDict(env_prefix="PERQ_STORE_")

    location: str = Field(default="./perstack", validation_alias="PERQ_STORAGE")
    # PERQ_STORE_FSYNC: fsync each store file before the name that publishes it, and its folder after: what
    # a step committed survives a power loss or kernel crash (off: only for stores whose loss you accept,
    # e.g. on tmpfs)
    fsync: bool = True
    # an S3-compatible service other than AWS (MinIO, R2, Ceph...); AWS's own variables name it as well
    s3_endpoint_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("PERQ_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
    )


class WorkerSection(_Section):
    """How a worker runs steps: PERQ_CONCURRENCY, PERQ_LEASE_SECONDS..."""

    model_config = SettingsConfigDict(env_prefix="PERQ_")

    # concurrent steps per worker process (arq's max_jobs); steps mostly wait on the model
    concurrency: int = Field(default=200, ge=1)
    # worker processes one `perq worker` runs on this machine (None: one per CPU it may use); each runs up
    # to `concurrency` steps, so a machine runs processes x concurrency steps at once
    processes: int | None = Field(default=None, ge=1)
    # seconds a worker sleeps between queue polls when nothing wakes it earlier
    poll_delay: float = Field(default=0.05, gt=0)
    # a step's lease: a worker that dies mid-step holds it at most this long before another takes over
    lease_seconds: float = Field(default=10.0, gt=0)
    # on SIGTERM, how long in-flight steps may run before they are handed back to the queue
    grace_seconds: float = Field(default=20.0, ge=0)
    # how often the workers compare the store's unfinished jobs with the queue (default: 3 leases)
    reconcile_seconds: float | None = Field(default=None, gt=0)
    log_level: str = "INFO"

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, v: str) -> str:
        names = logging.getLevelNamesMapping()
        if v.upper() not in names:
            raise ValueError(f"unknown log level {v!r}: use one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return v.upper()

    @property
    def reconcile_period(self) -> float:
        return self.reconcile_seconds or 3 * self.lease_seconds


class McpSection(_Section):
    """A worker's pool of MCP skill servers (worker/skills/mcp/pool.py)."""

    model_config = SettingsConfigDict(env_prefix="PERQ_SKILL_")

    # a server nobody used for this long is closed (0: keep servers until the worker stops)
    idle_seconds: float = 300.0
    # a tool call without an answer after this long becomes an error result; the server stays up
    call_timeout: float = 60.0
    # starting a server (spawn or connect, handshake, tool listing) longer than this fails the run
    connect_timeout: float = 60.0
    # allow remote skills on loopback addresses, over http too: local development and tests only
    allow_loopback: bool = Field(default=False, validation_alias="PERQ_ALLOW_LOOPBACK_SKILLS")


class ScriptSection(_Section):
    """The offline script provider."""

    model_config = SettingsConfigDict(env_prefix="PERQ_SCRIPT_")

    # PERQ_SCRIPT_TRACE=FILE: one JSON line per answered request, to check that none is asked twice
    trace: str | None = None


class Settings(BaseModel):
    """Everything perq reads from its environment, one section per part.

    Each section reads its own variables when it is built, so `Settings()` is the environment's settings
    and `Settings(store=StoreSection(location=...))` changes one value and reads the rest (a section given
    as a dict is built the same way). Provider API keys are not here: the providers' SDKs read their own
    variables.
    """

    model_config = ConfigDict(extra="forbid")

    redis: RedisSection = Field(default_factory=RedisSection)
    store: StoreSection = Field(default_factory=StoreSection)
    worker: WorkerSection = Field(default_factory=WorkerSection)
    mcp: McpSection = Field(default_factory=McpSection)
    script: ScriptSection = Field(default_factory=ScriptSection)

    @field_validator("*", mode="before")
    @classmethod
    def _section(cls, v: Any, info: ValidationInfo) -> Any:
        # a dict built by pydantic alone would skip the section's environment
        if isinstance(v, dict) and info.field_name is not None:
            section = cls.model_fields[info.field_name].annotation
            if isinstance(section, type) and issubclass(section, _Section):
                return section(**v)
        return v

    @classmethod
    def variables(cls) -> dict[str, str]:
        """Every variable perq reads, with the setting it fills (`worker.lease_seconds` for one)."""
        found: dict[str, str] = {}
        for name, field in cls.model_fields.items():
            section = field.annotation
            assert isinstance(section, type) and issubclass(section, _Section)
            for variable, key in section.variables().items():
                found[variable] = f"{name}.{key}"
        return found


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


class PerstackConfig(RunLimits):
    provider: ProviderTable | None = None
    model: str | None = None
    reasoning_budget: ReasoningBudget | None = None
    runtime: str | None = None
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
        # packageName/args exclusivity is checked when the skill starts, as Perstack does: a config file alone
        # never stops the others from loading
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
    """The runtime form of every expert in the file: the table key is both key and name, as in Perstack."""
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
