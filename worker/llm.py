"""The contract between the expert loop and a model: one request in, one answer (or a classified error) out.

Providers live in their own modules and are imported only when a worker first needs them, so that neither
the CLI nor a worker that only runs scripts pays for the SDK imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from shared.models import Message, ProviderConfig, ReasoningBudget, ThinkingPart, ToolDefinition, Usage

FinishReason = Literal["stop", "tool-calls", "length", "other"]


@dataclass
class GenerationRequest:
    expert_key: str
    messages: list[Message]
    tools: list[ToolDefinition]  # empty for the tool-less run-result generation
    reasoning_budget: ReasoningBudget = "low"
    timeout_ms: int = 300_000
    max_retries: int = 5


@dataclass
class GeneratedToolCall:
    id: str
    tool_name: str
    args: dict[str, Any]


@dataclass
class GenerationResult:
    text: str | None = None
    thinking: list[ThinkingPart] = field(default_factory=list)
    tool_calls: list[GeneratedToolCall] = field(default_factory=list)
    finish_reason: FinishReason = "stop"
    usage: Usage = field(default_factory=Usage)


class GenerationError(Exception):
    """A failed generation, classified as in spec §2.6."""

    def __init__(
        self, message: str, *, name: str = "APICallError", is_retryable: bool, status_code: int | None = None
    ) -> None:
        super().__init__(message)
        self.name = name
        self.message = message
        self.is_retryable = is_retryable
        self.status_code = status_code


class ModelClient(Protocol):
    async def generate(self, request: GenerationRequest) -> GenerationResult: ...


RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
RETRYABLE_WORDS = (
    "rate limit",
    "overloaded",
    "timeout",
    "timed out",
    "service unavailable",
    "internal server error",
    "bad gateway",
    "gateway timeout",
)


def is_retryable(status_code: int | None, message: str) -> bool:
    """Spec §2.6: 429/5xx or a message that names a transient condition."""
    if status_code in RETRYABLE_STATUS:
        return True
    lowered = message.lower()
    return any(word in lowered for word in RETRYABLE_WORDS)


def get_model_client(provider: ProviderConfig, model: str) -> ModelClient:
    """The client for a provider; SDK modules are imported here, on first use, never at import time."""
    name = provider.provider_name
    if name == "script":
        from worker.providers.script import ScriptModel

        return ScriptModel(model)
    from worker.providers.pydantic_ai import PydanticAIModel

    return PydanticAIModel(provider, model)
