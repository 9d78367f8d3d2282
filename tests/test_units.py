"""Unit tests of the pieces the integration tests run through: models, ids, queue payloads, config,
the script provider, and the step loop in-process (no Redis)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from shared.config import ConfigError, build_experts, find_config, load_config
from shared.models import (
    Checkpoint,
    Expert,
    ExpertRef,
    RunInput,
    RunSetting,
    TextPart,
    UserMessage,
    check_id,
    checkpoint_id,
    derived_id,
    is_safe_id,
    new_id,
)
from shared.queue import PayloadError, StepTask, deserialize, serialize
from worker.loop import StepRunner
from worker.models.contract import GeneratedToolCall, GenerationError, GenerationRequest, GenerationResult
from worker.models.script import ScriptModel, answers_so_far
from worker.skills.base import ToolContext
from worker.skills.toolset import build_skill_set

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


def test_ids() -> None:
    assert is_safe_id(new_id()) and len(new_id()) == 24
    assert derived_id("a", "b") == derived_id("a", "b") != derived_id("a", "c")
    assert checkpoint_id("run", 2) != checkpoint_id("run", 3)
    for bad in ("", "..", "a/b", "a\\b", "../x", "x y", "a..b", ".hidden", "é", "x" * 200):
        assert not is_safe_id(bad), bad
        with pytest.raises(ValueError):
            check_id(bad)


def test_queue_payloads_are_json_only() -> None:
    task = StepTask(job_id="j1", run_id="r1", step_number=2)
    assert StepTask.model_validate(deserialize(serialize(task.to_dict()))) == task
    with pytest.raises(PayloadError):
        deserialize(pickle.dumps({"f": "perq.step"}))
    with pytest.raises(PayloadError):
        deserialize(b"[1, 2]")
    with pytest.raises(ValidationError):
        StepTask.model_validate({"jobId": "../etc", "runId": "r", "stepNumber": 1})
    with pytest.raises(ValidationError):
        StepTask.model_validate({"jobId": "j", "runId": "r"})


def test_config_is_lenient_like_perstack(tmp_path: Path) -> None:
    path = tmp_path / "perstack.toml"
    path.write_text(
        """
        model = "m"
        unknownTop = 1
        [provider]
        providerName = "openai"
        envPath = [".env"]        # misplaced in Perstack's own e2e files: must not break loading
        [experts."a"]
        instruction = "x"
        futureKey = true
        delegates = ["b"]
        [experts."b"]
        instruction = "y"
        [experts."b".skills."@perstack/base"]
        type = "mcpStdioSkill"
        command = "npx"
        packageName = "@perstack/base"
        pick = ["todo"]
    """.replace("\n        ", "\n")
    )
    config = load_config(path)
    experts = build_experts(config)
    assert config.provider is not None and config.provider.provider_name == "openai"
    assert experts["a"].delegates == ["b"]
    assert list(experts["a"].skills) == ["@perstack/base"]  # the default skills
    assert experts["b"].skills["@perstack/base"].pick == ["todo"]
    nested = tmp_path / "x" / "y"
    nested.mkdir(parents=True)
    assert find_config(None, nested) == path


def test_config_errors_name_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "perstack.toml"
    path.write_text('[experts.a]\ninstruction = "x"\ndelegates = ["ghost"]\n')
    with pytest.raises(ConfigError, match='delegate expert "ghost" of "a" not found'):
        build_experts(load_config(path))
    path.write_text("[experts.a]\n")
    with pytest.raises(ConfigError, match="instruction"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        find_config(str(tmp_path / "none.toml"))


def request(messages: list[Any], expert: str = "e") -> GenerationRequest:
    return GenerationRequest(expert_key=expert, messages=messages, tools=[])


async def test_script_turns_follow_the_conversation(tmp_path: Path) -> None:
    script = tmp_path / "s.toml"
    script.write_text(
        '[[experts.e.turns]]\ntext = "one"\n[[experts.e.turns]]\ntext = "two"\nusage = { inputTokens = 7 }\n'
    )
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


class Scripted:
    """An in-process model answering from a list, to drive the loop without a queue."""

    def __init__(self, answers: list[GenerationResult]) -> None:
        self.answers = answers
        self.requests: list[GenerationRequest] = []

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        self.requests.append(req)
        return self.answers[len(self.requests) - 1]


async def run_one_step(
    tmp_path: Path, answers: list[GenerationResult], todos: Any = None
) -> tuple[Checkpoint, StepRunner]:
    expert = Expert(key="e", name="e", instruction="do")
    setting = RunSetting(
        model="m",
        provider_config={"providerName": "script"},
        job_id="j",
        run_id="r",  # type: ignore[arg-type]
        expert_key="e",
        input=RunInput(text="go"),
        experts={"e": expert},
        workspace=str(tmp_path),
    )
    ctx = ToolContext(workspace=tmp_path, store_root=None, todos=list(todos or []))
    skills = await build_skill_set(expert, setting.experts, coordinator=True, tool_context=ctx, pool=None)
    runner = StepRunner(setting=setting, expert=expert, model=Scripted(answers), skills=skills)
    start = Checkpoint(
        id=checkpoint_id("r", 1),
        job_id="j",
        run_id="r",
        status="init",
        step_number=1,
        expert=ExpertRef(key="e", name="e"),
    )
    return await runner.run(start, begins_run=True), runner


def calls(*names: str) -> GenerationResult:
    return GenerationResult(
        tool_calls=[GeneratedToolCall(id=f"c{i}", tool_name=n, args={}) for i, n in enumerate(names)],
        finish_reason="tool-calls",
    )


async def test_attempt_completion_with_text_completes_without_another_request(tmp_path: Path) -> None:
    answer = calls("attemptCompletion", "healthCheck")
    answer.text = "All done."
    end, runner = await run_one_step(tmp_path, [answer])
    assert end.status == "completed"
    assert len(runner.model.requests) == 1  # type: ignore[union-attr]
    results = next(m for m in end.messages if m.type == "toolMessage").contents  # type: ignore[union-attr]
    # the call beside attemptCompletion is answered, not left dangling (spec §9 #17)
    assert [r.tool_name for r in results] == ["attemptCompletion", "healthCheck"]
    assert "Skipped" in results[1].contents[0].text  # type: ignore[union-attr]


async def test_attempt_completion_with_open_todos_continues(tmp_path: Path) -> None:
    from shared.models import Todo

    end, _runner = await run_one_step(tmp_path, [calls("attemptCompletion")], todos=[Todo(id=0, title="x")])
    assert end.status == "proceeding"
    tool_result = end.messages[-1].contents[0].contents[0].text  # type: ignore[union-attr]
    assert json.loads(tool_result)["remainingTodos"][0]["title"] == "x"


async def test_unknown_tool_is_answered_with_an_error(tmp_path: Path) -> None:
    end, _ = await run_one_step(tmp_path, [calls("noSuchTool")])
    assert end.status == "proceeding"
    text = end.messages[-1].contents[0].contents[0].text  # type: ignore[union-attr]
    assert "ToolNotFound" in text


async def test_length_finish_retries_with_a_synthetic_answer(tmp_path: Path) -> None:
    answer = calls("healthCheck")
    answer.finish_reason = "length"
    end, runner = await run_one_step(tmp_path, [answer])
    assert end.status == "proceeding" and end.retry_count == 1
    assert [e.type for e in runner.events][-2:] == ["retry", "continueToNextStep"]


async def test_empty_answer_is_retried(tmp_path: Path) -> None:
    end, _runner = await run_one_step(tmp_path, [GenerationResult(text="  ")])
    assert end.retry_count == 1
    assert end.messages[-1].type == "userMessage" and end.messages[-1].retry  # type: ignore[union-attr]


def test_perq_help_imports_no_heavy_module() -> None:
    """`perq --help` must feel instant: no model SDK, MCP, pydantic, arq, Textual or worker module loaded."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.argv = ['perq', '--help']\n"
        "from producer.cli import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('pydantic', 'pydantic_ai', 'anthropic', 'openai', 'google', 'boto3', 'botocore',"
        " 'mcp', 'arq', 'redis', 'worker', 'textual')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
