"""The script provider: answers model requests from a TOML file, offline and deterministically.

Format (stable; tests, examples and benchmarks depend on it):

    [[experts.hello.turns]]
    toolCalls = [{ toolName = "todo", args = { newTodos = ["say hello"] } }]
    usage = { inputTokens = 120, outputTokens = 12 }
    [[experts.hello.turns]]
    text = "Hello!"

A turn may hold `text`, `thinking`, `toolCalls` (`{toolName, args, id?}`), `error` (`{message, retryable =
true, statusCode?, retryAfterMs = 0}`), `delayMs`, `usage` and `finishReason` (why the answer ended, as a
provider would say it: "tool-calls" when the turn calls tools and "stop" otherwise, unless given). Turn k
answers a request whose conversation already holds k model answers (expert messages plus retry notes), so
an answer depends only on the conversation: a step re-run after a crash gets the same answer.

With PERQ_SCRIPT_TRACE=FILE, each answered request appends one JSON line (expert, turn, pid) to FILE.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import tomllib
from typing import Any

from pydantic import Field, ValidationError

from shared.config import ScriptSection
from shared.models import ExpertMessage, PerqModel, ThinkingPart, Usage, UserMessage
from worker.models.contract import (
    FinishReason,
    GeneratedToolCall,
    GenerationError,
    GenerationRequest,
    GenerationResult,
)


class ScriptToolCall(PerqModel):
    tool_name: str
    args: dict[str, Any] = Field(default_factory=dict)
    id: str | None = None


class ScriptError(PerqModel):
    message: str
    retryable: bool = True
    status_code: int | None = None
    # the wait before the next attempt, as a provider's retry-after; scripted failures default to none
    retry_after_ms: int = 0


class ScriptUsage(PerqModel):
    input_tokens: int = 10
    output_tokens: int = 5
    reasoning_tokens: int = 0
    cached_input_tokens: int = 0


class ScriptTurn(PerqModel):
    text: str | None = None
    thinking: str | None = None
    tool_calls: list[ScriptToolCall] = Field(default_factory=list)
    error: ScriptError | None = None
    delay_ms: int = 0
    usage: ScriptUsage = Field(default_factory=ScriptUsage)
    finish_reason: FinishReason | None = None


class ScriptExpert(PerqModel):
    turns: list[ScriptTurn] = Field(default_factory=list)


class Script(PerqModel):
    experts: dict[str, ScriptExpert] = Field(default_factory=dict)


_cache: dict[str, tuple[float, Script]] = {}


def load_script(path: str) -> Script:
    """Parse a script file once per worker (re-read when the file changes)."""
    try:
        mtime = os.stat(path).st_mtime
    except OSError as e:
        raise GenerationError(f"script file {path} cannot be read: {e.strerror}", is_retryable=False) from e
    cached = _cache.get(path)
    if cached and cached[0] == mtime:
        return cached[1]
    try:
        with open(path, "rb") as f:
            script = Script.model_validate(tomllib.load(f))
    except (tomllib.TOMLDecodeError, ValidationError) as e:
        raise GenerationError(f"script file {path} is invalid: {e}", is_retryable=False) from e
    _cache[path] = (mtime, script)
    return script


def answers_so_far(request: GenerationRequest) -> int:
    return sum(
        1
        for m in request.messages
        if isinstance(m, ExpertMessage) or (isinstance(m, UserMessage) and m.retry)
    )


@functools.cache
def _trace_file() -> str | None:
    """PERQ_SCRIPT_TRACE, read once per process: the worker's environment does not change while it runs."""
    return ScriptSection().trace


class ScriptModel:
    def __init__(self, path: str) -> None:
        self.path = path

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        script = load_script(self.path)
        expert = script.experts.get(request.expert_key)
        if expert is None:
            raise GenerationError(
                f"script {self.path} has no turns for expert {request.expert_key!r}", is_retryable=False
            )
        k = answers_so_far(request)
        if k >= len(expert.turns):
            raise GenerationError(
                f"script {self.path} ran out of turns for expert {request.expert_key!r}: "
                f"turn {k + 1} requested, {len(expert.turns)} scripted",
                name="ScriptExhausted",
                is_retryable=False,
            )
        trace = _trace_file()
        if trace:  # one line per model request answered, for checking that nothing is asked twice
            line = json.dumps({"expert": request.expert_key, "turn": k, "pid": os.getpid()}) + "\n"
            with open(trace, "a") as f:  # noqa: ASYNC230 - a debugging aid; one short line
                f.write(line)
        turn = expert.turns[k]
        if turn.delay_ms:
            await asyncio.sleep(turn.delay_ms / 1000)
        if turn.error:
            raise GenerationError(
                turn.error.message,
                retry_after=turn.error.retry_after_ms / 1000,
                is_retryable=turn.error.retryable,
                status_code=turn.error.status_code,
            )
        u = turn.usage
        return GenerationResult(
            text=turn.text,
            thinking=[ThinkingPart(thinking=turn.thinking)] if turn.thinking else [],
            tool_calls=[
                GeneratedToolCall(id=c.id or f"call-{k + 1}-{i + 1}", tool_name=c.tool_name, args=c.args)
                for i, c in enumerate(turn.tool_calls)
            ],
            finish_reason=turn.finish_reason or ("tool-calls" if turn.tool_calls else "stop"),
            usage=Usage(
                input_tokens=u.input_tokens,
                output_tokens=u.output_tokens,
                reasoning_tokens=u.reasoning_tokens,
                cached_input_tokens=u.cached_input_tokens,
                total_tokens=u.input_tokens + u.output_tokens,
            ),
        )
