"""The script provider: each turn answers the request that follows as many model answers, and running
out of turns (or of experts) is an error saying which."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shared.models import ExpertMessage, TextPart, UserMessage
from tests.conftest import script_toml
from worker.models.contract import GenerationError, GenerationRequest
from worker.models.script import ScriptModel, answers_so_far


def request(messages: list[Any], expert: str = "e") -> GenerationRequest:
    return GenerationRequest(expert_key=expert, messages=messages, tools=[])


async def test_script_turns_follow_the_conversation(tmp_path: Path) -> None:
    script = tmp_path / "s.toml"
    script.write_text(script_toml({"e": [{"text": "one"}, {"text": "two", "usage": {"inputTokens": 7}}]}))
    model = ScriptModel(str(script))
    first = await model.generate(request([UserMessage(contents=[TextPart(text="q")])]))
    assert first.text == "one" and (first.usage.input_tokens, first.usage.output_tokens) == (10, 5)
    retry_note = UserMessage(contents=[TextPart(text="r")], retry=True)
    assert answers_so_far(request([retry_note])) == 1
    second = await model.generate(request([retry_note]))
    assert second.text == "two" and (second.usage.input_tokens, second.usage.output_tokens) == (7, 5)
    with pytest.raises(GenerationError, match="ran out of turns for expert 'e': turn 3") as exhausted:
        await model.generate(request([retry_note, retry_note]))
    assert not exhausted.value.is_retryable
    with pytest.raises(GenerationError, match="no turns for expert 'other'"):
        await model.generate(request([], expert="other"))


async def test_a_turn_says_why_its_answer_ended(tmp_path: Path) -> None:
    script = tmp_path / "s.toml"
    calls = {"toolCalls": [{"toolName": "t"}]}
    script.write_text(script_toml({"e": [calls, {"text": "x"}, {**calls, "finishReason": "length"}]}))
    model = ScriptModel(str(script))
    answered = [ExpertMessage(contents=[TextPart(text="a")])]
    reasons = [(await model.generate(request(answered[:1] * k))).finish_reason for k in range(3)]
    assert reasons == ["tool-calls", "stop", "length"]
