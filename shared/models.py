"""Every schema perq writes or reads: usage, messages, tool calls, checkpoints, jobs, run settings, events.

Field names in JSON are Perstack's camelCase ones (spec §1), so a Perstack checkpoint loads here and a perq
checkpoint carries every field Perstack requires. Python code uses snake_case attributes.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator
from pydantic.alias_generators import to_camel

from shared.randomness import random_id


class PerqModel(BaseModel):
    """Base of every schema: camelCase JSON, snake_case Python, unknown keys ignored (lenient loading)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# --- ids and time -------------------------------------------------------------------------------------

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


def _spell(digest: bytes) -> str:
    # base32 in lowercase: 24 characters from 15 bytes, computed in C (a step makes about ten ids)
    return base64.b32encode(digest).decode().lower()


def new_id() -> str:
    """A cuid2-shaped id: a lowercase letter, then 23 lowercase letters and digits (120 random bits)."""
    return random_id()  # buffered system randomness (shared/randomness.py)


def derived_id(*parts: str) -> str:
    """A cuid2-shaped id computed from its parts, so that a re-run of the same work names the same thing."""
    return "c" + _spell(hashlib.blake2b(":".join(parts).encode(), digest_size=15).digest())[:23]


def checkpoint_id(run_id: str, step_number: int) -> str:
    """The id of the checkpoint that ends a step of a run: derived, so that a re-run step finds it."""
    return derived_id("checkpoint", run_id, str(step_number))


def is_safe_id(value: str) -> bool:
    """Ids become path segments and Redis keys: letters, digits, '-' and '_' only, no '..' or separators."""
    return bool(_ID_RE.match(value))


def check_id(value: str, what: str = "id") -> str:
    if not is_safe_id(value):
        raise ValueError(f"invalid {what} {value!r}: use letters, digits, '-' and '_' (at most 128)")
    return value


SafeId = Annotated[str, Field(pattern=_ID_RE.pattern)]


def now_ms() -> int:
    return int(time.time() * 1000)


# --- usage --------------------------------------------------------------------------------------------


class Usage(PerqModel):
    input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0
    cached_input_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
            total_tokens=self.total_tokens + other.total_tokens,
            cached_input_tokens=self.cached_input_tokens + other.cached_input_tokens,
        )


# --- message parts (spec §1.2) ------------------------------------------------------------------------


class _Part(PerqModel):
    id: str = Field(default_factory=new_id)


class _UrlPart(_Part):
    url: str
    mime_type: str


class _InlinePart(_Part):
    encoded_data: str  # base64
    mime_type: str


class _BinaryPart(_Part):
    data: str
    mime_type: str


class TextPart(_Part):
    type: Literal["textPart"] = "textPart"
    text: str


class ImageUrlPart(_UrlPart):
    type: Literal["imageUrlPart"] = "imageUrlPart"


class ImageInlinePart(_InlinePart):
    type: Literal["imageInlinePart"] = "imageInlinePart"


class ImageBinaryPart(_BinaryPart):
    type: Literal["imageBinaryPart"] = "imageBinaryPart"


class FileUrlPart(_UrlPart):
    type: Literal["fileUrlPart"] = "fileUrlPart"


class FileInlinePart(_InlinePart):
    type: Literal["fileInlinePart"] = "fileInlinePart"


class FileBinaryPart(_BinaryPart):
    type: Literal["fileBinaryPart"] = "fileBinaryPart"


class ToolCallPart(_Part):
    type: Literal["toolCallPart"] = "toolCallPart"
    tool_call_id: str
    tool_name: str
    args: Any = Field(default_factory=dict)


class ThinkingPart(_Part):
    type: Literal["thinkingPart"] = "thinkingPart"
    thinking: str
    signature: str | None = None


ToolResultContent = Annotated[TextPart | ImageInlinePart | FileInlinePart, Field(discriminator="type")]


class ToolResultPart(_Part):
    type: Literal["toolResultPart"] = "toolResultPart"
    tool_call_id: str
    tool_name: str
    contents: list[ToolResultContent]
    is_error: bool | None = None


MessagePart = Annotated[
    TextPart
    | ImageUrlPart
    | ImageInlinePart
    | ImageBinaryPart
    | FileUrlPart
    | FileInlinePart
    | FileBinaryPart
    | ToolCallPart
    | ThinkingPart
    | ToolResultPart,
    Field(discriminator="type"),
]
UserContent = Annotated[
    TextPart
    | ImageUrlPart
    | ImageInlinePart
    | ImageBinaryPart
    | FileUrlPart
    | FileInlinePart
    | FileBinaryPart,
    Field(discriminator="type"),
]
ExpertContent = Annotated[TextPart | ToolCallPart | ThinkingPart, Field(discriminator="type")]


# --- messages (spec §1.3) -----------------------------------------------------------------------------


class _Message(PerqModel):
    id: str = Field(default_factory=new_id)
    cache: bool | None = None  # a prompt-caching hint (Anthropic's ephemeral cache control)


class InstructionMessage(_Message):
    type: Literal["instructionMessage"] = "instructionMessage"
    contents: list[TextPart]


class UserMessage(_Message):
    type: Literal["userMessage"] = "userMessage"
    contents: list[UserContent]
    # perq: marks the note a failed generation leaves behind, so that "answers so far" can be counted
    # (the script provider's turn index, spec-compatible because Perstack ignores unknown keys)
    retry: bool | None = None


class ExpertMessage(_Message):
    type: Literal["expertMessage"] = "expertMessage"
    contents: list[ExpertContent]

    @property
    def text(self) -> str:
        """The first text part's text, or "" (what a delegate returns, spec §3.4)."""
        return next((p.text for p in self.contents if isinstance(p, TextPart)), "")

    @property
    def tool_calls(self) -> list[ToolCallPart]:
        return [p for p in self.contents if isinstance(p, ToolCallPart)]


class ToolMessage(_Message):
    type: Literal["toolMessage"] = "toolMessage"
    contents: list[ToolResultPart]


Message = Annotated[
    InstructionMessage | UserMessage | ExpertMessage | ToolMessage, Field(discriminator="type")
]


# --- tools (spec §1.4) --------------------------------------------------------------------------------


class ToolCall(PerqModel):
    id: str = Field(min_length=1, max_length=255)
    skill_name: str = Field(max_length=255)
    tool_name: str = Field(max_length=255)
    args: dict[str, Any] = Field(default_factory=dict)


class ToolResult(PerqModel):
    id: str
    skill_name: str
    tool_name: str
    result: list[MessagePart]


# the parts of a tool result that a tool message carries to the model
MESSAGE_PART_TYPES = ("textPart", "imageInlinePart", "fileInlinePart")


def tool_message(results: list[ToolResult]) -> ToolMessage:
    """One tool message answering every result; only text / inline image / inline file contents pass."""
    return ToolMessage(
        contents=[
            ToolResultPart(
                tool_call_id=r.id,
                tool_name=r.tool_name,
                contents=[p for p in r.result if p.type in MESSAGE_PART_TYPES],
            )
            for r in results
        ]
    )


class ToolDefinition(PerqModel):
    """A tool as offered to the model: its bare name, description and JSON schema of its arguments."""

    skill_name: str
    name: str
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    kind: Literal["mcp", "delegate", "interactive"] = "mcp"


class Todo(PerqModel):
    id: int
    title: str
    completed: bool = False


# --- experts and skills (spec §1.9, §1.10) ------------------------------------------------------------


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


# --- checkpoints (spec §1.6, §1.7) --------------------------------------------------------------------

CheckpointStatus = Literal[
    "init",
    "proceeding",
    "completed",
    "stoppedByInteractiveTool",
    "stoppedByDelegate",
    "stoppedByExceededMaxSteps",
    "stoppedByError",
]


class DelegationTarget(PerqModel):
    expert: ExpertRef
    tool_call_id: str
    tool_name: str
    query: str


class DelegatedBy(PerqModel):
    expert: ExpertRef
    tool_call_id: str
    tool_name: str
    checkpoint_id: str
    run_id: str | None = None  # the parent's run; Perstack's format before it had runs per segment has none


class RunError(PerqModel):
    name: str
    message: str
    status_code: int | None = None
    is_retryable: bool = False


class MessagesRef(PerqModel):
    """Where a conversation is stored: the chunk `token` of run `run_id`'s message log and every chunk
    before it (each chunk names the one it follows), `count` messages in all. A checkpoint file holds this
    instead of its messages, so a message is written once however many checkpoints contain it."""

    run_id: str
    token: str
    count: int


class Checkpoint(PerqModel):
    id: str
    job_id: str
    run_id: str
    status: CheckpointStatus
    step_number: int
    messages: list[Message] = Field(default_factory=list)
    expert: ExpertRef
    delegate_to: list[DelegationTarget] | None = None
    delegated_by: DelegatedBy | None = None
    usage: Usage = Field(default_factory=Usage)
    context_window: int | None = None
    context_window_usage: float | None = None
    pending_tool_calls: list[ToolCall] | None = None
    partial_tool_results: list[ToolResult] | None = None
    metadata: dict[str, Any] | None = None
    error: RunError | None = None
    retry_count: int | None = None
    # perq: todos live in the checkpoint, so they survive a resume on another worker
    todos: list[Todo] | None = None
    # perq: where `messages` are stored (the file holds this instead of them); describes a prefix of
    # `messages` whenever messages were appended since the checkpoint was loaded or saved
    messages_ref: MessagesRef | None = None
    # perq: the attempt that committed this checkpoint; the step's events carry the same token, so the
    # events of an attempt that lost the commit (or died before it) are never read as the step's
    commit: str | None = None


# --- jobs (spec §1.8) ---------------------------------------------------------------------------------

JobStatus = Literal[
    "queued",
    "running",
    "completed",
    "stoppedByInteractiveTool",
    "stoppedByMaxSteps",
    "stoppedByError",
    "cancelled",
]
# the job status a run's last checkpoint settles (spec §1.8); a delegate's end goes back to its parent
# instead, except max steps, which stops the whole job (spec §3.7)
JOB_STATUS_AFTER: dict[str, JobStatus] = {
    "completed": "completed",
    "stoppedByInteractiveTool": "stoppedByInteractiveTool",
    "stoppedByExceededMaxSteps": "stoppedByMaxSteps",
    "stoppedByError": "stoppedByError",
}
FINAL_JOB_STATUSES: frozenset[str] = frozenset(
    {"completed", "stoppedByInteractiveTool", "stoppedByMaxSteps", "stoppedByError", "cancelled"}
)


class Job(PerqModel):
    id: str
    status: JobStatus
    coordinator_expert_key: str
    total_steps: int = 0
    max_steps: int | None = None
    usage: Usage = Field(default_factory=Usage)
    started_at: int
    finished_at: int | None = None
    # perq: the coordinator's latest checkpoint, which a continuation resumes (spec §9 #19)
    head_checkpoint_id: str | None = None
    # perq: the error that ended the job, for status output
    error: RunError | None = None
    # perq: the epoch of the submission (new job or continuation) that last set the job going
    epoch: int | None = None


# --- run settings (spec §1.12), never holding secrets -------------------------------------------------

ReasoningBudget = Literal["none", "minimal", "low", "medium", "high"] | int


class ProviderConfig(PerqModel):
    """Which provider and its non-secret settings. API keys stay in the worker's environment."""

    provider_name: str
    base_url: str | None = None
    organization: str | None = None
    project: str | None = None  # openai's project, or google-vertex's
    headers: dict[str, str] | None = None
    resource_name: str | None = None  # azure-openai
    api_version: str | None = None  # azure-openai
    use_deployment_based_urls: bool | None = None  # azure-openai
    region: str | None = None  # amazon-bedrock
    location: str | None = None  # google-vertex


class InteractiveToolCallResult(PerqModel):
    tool_call_id: str
    tool_name: str
    skill_name: str
    text: str


class RunInput(PerqModel):
    text: str | None = None
    interactive_tool_call_result: InteractiveToolCallResult | None = None
    # perq: results of parallel delegates beyond the first, appended to partialToolResults at Init
    extra_tool_results: list[ToolResult] | None = None


class RunSetting(PerqModel):
    model: str
    provider_config: ProviderConfig
    job_id: str
    run_id: str
    expert_key: str
    input: RunInput
    experts: dict[str, Expert]
    reasoning_budget: ReasoningBudget = "low"
    max_steps: int | None = 100
    max_retries: int = 5
    timeout: int = 300_000
    started_at: int = Field(default_factory=now_ms)
    updated_at: int = Field(default_factory=now_ms)
    workspace: str
    # perq: runs of a parallel branch report deltas and never write the job's totals (spec §9 #22)
    parallel_branch: bool = False
    # perq: when the submission this run descends from was made (ms); `perq cancel` stops the runs of
    # submissions made before it, and a later continuation (a new epoch) runs on
    epoch: int = Field(default_factory=now_ms)


# --- Perstack's own form of the records: what `perq export` writes -----------------------------------

PerstackJobStatus = Literal[
    "running", "completed", "stoppedByInteractiveTool", "stoppedByMaxSteps", "stoppedByError"
]
# perq's two job statuses that Perstack lacks: a queued job was submitted and has not stopped (Perstack's
# job is `running` from the moment its run is called); a cancelled job stopped before its end, which
# Perstack can only say as an error
PERSTACK_JOB_STATUS: dict[str, PerstackJobStatus] = {"queued": "running", "cancelled": "stoppedByError"}
PERSTACK_API_BASE_URL = "https://api.perstack.ai"


class PerstackJob(Job):
    status: PerstackJobStatus


class PerstackProviderConfig(ProviderConfig):
    """Perstack keeps a provider's credentials in its run settings and its readers require the fields:
    they are present here, and always empty."""

    api_key: Literal[""] = ""
    access_key_id: Literal[""] | None = None  # amazon-bedrock's
    secret_access_key: Literal[""] | None = None
    region: str | None = None


class PerstackRunSetting(RunSetting):
    """A run setting with the fields Perstack's readers require and perq has no use for."""

    provider_config: PerstackProviderConfig
    # Perstack's format before reasoning budgets required a temperature; perq sets none, and 0 was that
    # format's default
    temperature: float = 0.0
    perstack_api_base_url: str = PERSTACK_API_BASE_URL
    env: dict[str, str] = Field(default_factory=dict, max_length=0)  # Perstack's copy of the environment


# --- steps and events (spec §1.5, §1.13) --------------------------------------------------------------


class Step(PerqModel):
    step_number: int
    input_messages: list[Message] | None = None
    new_messages: list[Message] = Field(default_factory=list)
    tool_calls: list[ToolCall] | None = None
    tool_results: list[ToolResult] | None = None
    pending_tool_calls: list[ToolCall] | None = None
    partial_tool_results: list[ToolResult] | None = None
    usage: Usage = Field(default_factory=Usage)
    started_at: int = Field(default_factory=now_ms)
    finished_at: int | None = None


EventType = Literal[
    # expert state events
    "startRun",
    "startGeneration",
    "retry",
    "callTools",
    "callInteractiveTool",
    "callDelegate",
    "resolveToolResults",
    "attemptCompletion",
    "finishToolCall",
    "resumeToolCalls",
    "finishAllToolCalls",
    "continueToNextStep",
    "stopRunByInteractiveTool",
    "stopRunByDelegate",
    "stopRunByExceededMaxSteps",
    "stopRunByError",
    "completeRun",
    # streaming events
    "startStreamingReasoning",
    "streamReasoning",
    "completeStreamingReasoning",
    "startStreamingRunResult",
    "streamRunResult",
    "completeStreamingRunResult",
    # runtime events
    "initializeRuntime",
    "skillStarting",
    "skillConnected",
    "skillStderr",
    "skillDisconnected",
    # perq: job-level events
    "cancelJob",
]


# the events that end a step: each carries the step's checkpoint
STEP_ENDING_EVENTS: frozenset[str] = frozenset(
    {
        "continueToNextStep",
        "stopRunByInteractiveTool",
        "stopRunByDelegate",
        "stopRunByExceededMaxSteps",
        "stopRunByError",
        "completeRun",
    }
)


# What an event leaves out of its line, because the store holds it once elsewhere. Perstack repeats the
# whole conversation in every step's events, which makes a long job's events grow with the square of its
# length. Here:
# - a step-ending event names its checkpoint by id (the file is read back in its place when events are read);
# - startRun's initial checkpoint leaves its messages out (the run's message log holds them);
# - a step keeps its calls, usage and times: its messages and tool results are in the log and in the step's
#   earlier events;
# - finishToolCall's tool message is the one made of the resolveToolResults just before it in the same step:
#   its parts keep their ids, and their contents (the same tool results) are filled in when read.
_STORED_EXCLUDE: dict[str, Any] = {
    "checkpoint": set(Checkpoint.model_fields) - {"id"},
    "initial_checkpoint": {"messages"},
    "initialCheckpoint": {"messages"},
    "step": {"input_messages", "new_messages", "tool_results", "partial_tool_results"},
}
_DERIVED_EXCLUDE: dict[str, Any] = {
    "finishToolCall": _STORED_EXCLUDE | {"newMessages": {"__all__": {"contents": {"__all__": {"contents"}}}}}
}


class Event(PerqModel):
    """One event of a run. The base fields are Perstack's; the payload keys depend on `type` (spec §1.13).

    One class with an open payload instead of thirty classes: the payload keys are Perstack's names and are
    written by the loop, which is the only producer of events.
    """

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    id: str = Field(default_factory=new_id)
    type: EventType
    timestamp: int = Field(default_factory=now_ms)
    job_id: str
    run_id: str
    expert_key: str | None = None
    step_number: int | None = None

    _line: str | None = PrivateAttr(default=None)

    @classmethod
    def emit(
        cls,
        type_: EventType,
        job_id: str,
        run_id: str,
        expert_key: str | None,
        step_number: int | None,
        **payload: Any,
    ) -> Event:
        """An event of the loop, serialized at once: what it says is fixed when it happens, and its JSON
        line (written to the store and to Redis) is made once, straight from the payload's models."""
        event = cls.model_construct(
            id=new_id(),
            type=type_,
            timestamp=now_ms(),
            job_id=job_id,
            run_id=run_id,
            expert_key=expert_key,
            step_number=step_number,
            **payload,
        )
        exclude = _DERIVED_EXCLUDE.get(type_, _STORED_EXCLUDE)
        event._line = event.model_dump_json(by_alias=True, exclude_none=True, exclude=exclude)
        return event

    def to_json(self) -> str:
        return self._line if self._line is not None else super().to_json()
