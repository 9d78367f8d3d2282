"""Checkpoints in Perstack's JSON format: what Perstack wrote loads, round-trips, and stays strict where
it must (an unknown message type is refused rather than guessed)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from shared.models import Checkpoint

PERSTACK_CHECKPOINT = {
    "id": "ckpt1",
    "jobId": "job1",
    "runId": "run1",
    "status": "stoppedByInteractiveTool",
    "stepNumber": 3,
    "messages": [
        {
            "id": "m1",
            "type": "instructionMessage",
            "contents": [{"id": "p1", "type": "textPart", "text": "sys"}],
            "cache": True,
        },
        {"id": "m2", "type": "userMessage", "contents": [{"id": "p2", "type": "textPart", "text": "hi"}]},
        {
            "id": "m3",
            "type": "expertMessage",
            "contents": [
                {"id": "p3", "type": "thinkingPart", "thinking": "hmm", "signature": "sig"},
                {
                    "id": "p4",
                    "type": "toolCallPart",
                    "toolCallId": "tc1",
                    "toolName": "askUser",
                    "args": {"q": 1},
                },
            ],
        },
    ],
    "expert": {"key": "e", "name": "e", "version": "1.0.0"},
    "usage": {
        "inputTokens": 1,
        "outputTokens": 2,
        "reasoningTokens": 0,
        "totalTokens": 3,
        "cachedInputTokens": 0,
    },
    "pendingToolCalls": [{"id": "tc1", "skillName": "user-input", "toolName": "askUser", "args": {"q": 1}}],
    "partialToolResults": [],
    "metadata": {"runtime": "local", "extra": 1},
    "someFutureField": "ignored",
}


def test_a_perstack_checkpoint_loads_and_round_trips() -> None:
    cp = Checkpoint.model_validate(PERSTACK_CHECKPOINT)
    assert cp.pending_tool_calls is not None and cp.pending_tool_calls[0].skill_name == "user-input"
    dumped = json.loads(cp.to_json())
    assert dumped["stepNumber"] == 3 and dumped["jobId"] == "job1"
    assert dumped["messages"][2]["contents"][1]["toolCallId"] == "tc1"
    assert "someFutureField" not in dumped
    assert Checkpoint.model_validate_json(cp.to_json()) == cp


def test_a_message_of_unknown_type_is_refused() -> None:
    bad = dict(PERSTACK_CHECKPOINT, messages=[{"id": "x", "type": "systemMessage", "contents": []}])
    with pytest.raises(ValidationError):
        Checkpoint.model_validate(bad)
