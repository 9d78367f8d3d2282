"""What the store keeps of a job: checkpoints, the job record, run settings, and Perstack's own forms of
them that `perq export` writes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from shared.models.core import PerqModel, Usage, now_ms
from shared.models.experts import Expert, ExpertRef
from shared.models.messages import Message, Todo, ToolCall, ToolResult

# --- checkpoints --------------------------------------------------------------------------------------------

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


# --- jobs ---------------------------------------------------------------------------------------------------

JobStatus = Literal[
    "queued",
    "running",
    "completed",
    "stoppedByInteractiveTool",
    "stoppedByMaxSteps",
    "stoppedByError",
    "cancelled",
]
# the job status a run's last checkpoint settles; a delegate's end goes back to its parent instead,
# except max steps, which stops the whole job (the limit counts the job's steps, not the run's)
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
    # perq: the coordinator's latest checkpoint, which a continuation resumes: the
    # newest checkpoint by step number may be a delegate's, or one of parallel siblings
    head_checkpoint_id: str | None = None
    # perq: the error that ended the job, for status output
    error: RunError | None = None
    # perq: the epoch of the submission (new job or continuation) that last set the job going
    epoch: int | None = None


# --- run settings, never holding secrets --------------------------------------------------------------------

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


class RunLimits(PerqModel):
    """How far a run may go: its steps, its retries of a failed generation, one generation's time (ms).
    A request says them over its perstack.toml, which says them over perq's defaults; None: not said here."""

    max_steps: int | None = None
    max_retries: int | None = None
    timeout: int | None = None

    def over(self, fallback: RunLimits) -> RunLimits:
        """These limits, with what they leave unsaid taken from `fallback` (a 0 is said, not unsaid)."""
        limits = set(RunLimits.model_fields)  # of a subclass (a request, a config) only these
        said = self.model_dump(include=limits, exclude_none=True)
        return RunLimits.model_validate(fallback.model_dump(include=limits) | said)


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
    # perq: runs of a parallel branch report deltas and never write the job's totals: only the
    # coordinator's loop does, so parallel branches cannot overwrite each other's counts
    parallel_branch: bool = False
    # perq: when the submission this run descends from was made (ms); `perq cancel` stops the runs of
    # submissions made before it, and a later continuation (a new epoch) runs on
    epoch: int = Field(default_factory=now_ms)


# perq's defaults, where neither a request nor perstack.toml says a limit: a run setting's own
DEFAULT_LIMITS = RunLimits(**{name: RunSetting.model_fields[name].default for name in RunLimits.model_fields})


# --- Perstack's own form of the records: what `perq export` writes ------------------------------------------

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
