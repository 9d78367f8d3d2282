"""The contract between the expert loop and a model: one request in, one answer (or a classified error) out.

Providers live in their own modules and are imported only when a worker first needs them, so that neither
the CLI nor a worker that only runs scripts pays for the SDK imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from shared.models import Message, ReasoningBudget, ThinkingPart, ToolDefinition, Usage

FinishReason = Literal["stop", "tool-calls", "length", "other"]


@dataclass
class GenerationRequest:
    expert_key: str
    messages: list[Message]
    tools: list[ToolDefinition]  # empty for the tool-less run-result generation
    reasoning_budget: ReasoningBudget = "low"
    # the limit of this one attempt: providers send exactly one request per generation, and the loop owns
    # retrying, so that a run's retry budget counts requests, not requests times SDK retries
    timeout_ms: int = 300_000
    # the loop's budget of failed generations in a row; informative only, never an SDK retry count
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
    """A failed generation, classified as retryable (a transient condition) or not (the run stops).

    `retry_after` is the wait in seconds the provider asked for (a `retry-after` header), if it did.
    """

    def __init__(
        self,
        message: str,
        *,
        name: str = "APICallError",
        is_retryable: bool,
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.name = name
        self.message = message
        self.is_retryable = is_retryable
        self.status_code = status_code
        self.retry_after = retry_after


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
    """429/5xx, or a message that names a transient condition (providers word these differently)."""
    if status_code in RETRYABLE_STATUS:
        return True
    lowered = message.lower()
    return any(word in lowered for word in RETRYABLE_WORDS)


# Backoff between failed generations: the provider's retry-after when it gave one, else exponential. Both are
# capped so that a provider asking for an hour does not hold a worker slot that long; the run's retry budget
# still ends a provider that never recovers.
BACKOFF_BASE_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 30.0
RETRY_AFTER_MAX_SECONDS = 60.0


def retry_delay(error: GenerationError, failures_before: int) -> float:
    """Seconds to wait before the next generation, when `failures_before` failed in a row before this one."""
    if error.retry_after is not None:
        return min(max(error.retry_after, 0.0), RETRY_AFTER_MAX_SECONDS)
    return min(BACKOFF_BASE_SECONDS * 2**failures_before, BACKOFF_MAX_SECONDS)
