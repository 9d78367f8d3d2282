"""The expert loop's states and every transition between them, in-process and fast.

Each test drives the worker's real Runtime (store, job record, hand-over) on an in-memory queue, with the
script provider as the model (tests/support/harness.py), and checks the events a transition emits and the
checkpoint it leaves. The transitions are Perstack's (worker/loop.py draws them); where Perstack has a
bug, perq's fix is what is checked. Crashes, leases and signals need real processes: they are tested in
tests/test_resilience.py and its neighbours.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import worker.loop
from shared.models import (
    Checkpoint,
    Expert,
    ExpertRef,
    InteractiveToolCallResult,
    Job,
    RunInput,
    RunSetting,
    ToolCall,
    checkpoint_id,
)
from tests.conftest import Perq
from tests.support.configs import ASKER_WITH_HELPER
from worker.loop import StepRunner
from worker.models.contract import GenerationError

CONFIG = """
[experts.e]
instruction = "Work"
"""


# events that are not one of the loop's (skill servers, streaming): left out of the flows compared
LOOP_EVENTS = {
    "startRun",
    "resumeToolCalls",
    "finishAllToolCalls",
    "startGeneration",
    "retry",
    "callTools",
    "callDelegate",
    "callInteractiveTool",
    "resolveToolResults",
    "attemptCompletion",
    "finishToolCall",
    "continueToNextStep",
    "completeRun",
    "stopRunByDelegate",
    "stopRunByInteractiveTool",
    "stopRunByExceededMaxSteps",
    "stopRunByError",
}

TOOL_STEP = ["startGeneration", "callTools", "resolveToolResults", "finishToolCall", "continueToNextStep"]


def call(tool: str, **args: Any) -> dict[str, Any]:
    """A turn calling one tool."""
    return {"toolCalls": [{"toolName": tool, "args": args}]}


def error(message: str, retryable: bool = True, status: int | None = None) -> dict[str, Any]:
    """A turn whose request fails."""
    failure: dict[str, Any] = {"message": message, "retryable": retryable}
    if status is not None:
        failure["statusCode"] = status
    return {"error": failure}


async def run(
    local: Perq, turns: list[dict[str, Any]], config: str = CONFIG, expert: str = "e", **options: Any
) -> Job:
    """Run a job of `expert` answering with `turns` until nothing is queued; its record."""
    local.write("perstack.toml", config)
    local.script({expert: turns})
    job = local.start(expert, "go", **options)
    await local.drain()
    return local.job(job.id)


def flow(local: Perq, job_id: str) -> list[str]:
    return [e.type for e in local.events(job_id) if e.type in LOOP_EVENTS]


def by_step(local: Perq, job_id: str) -> dict[int, list[str]]:
    steps: dict[int, list[str]] = {}
    for e in local.events(job_id):
        if e.type in LOOP_EVENTS:
            steps.setdefault(e.step_number or 0, []).append(e.type)
    return steps


def last_event(local: Perq, job_id: str, type_: str) -> dict[str, Any]:
    """The job's last event of `type_`, as stored: its JSON in Perstack's camelCase."""
    event = [e for e in local.events(job_id) if e.type == type_][-1]
    return json.loads(event.to_json())  # type: ignore[no-any-return]


def tool_results(cp: Checkpoint) -> list[Any]:
    """The results in the conversation's last tool message."""
    message = next(m for m in reversed(cp.messages) if m.type == "toolMessage")
    return message.contents  # type: ignore[return-value]


def result_text(result: Any) -> str:
    return result.contents[0].text  # type: ignore[no-any-return]


# --- Init -> PreparingForStep -> GeneratingToolCall -> CallingTool -> ResolvingToolResult -> FinishingStep


async def test_a_tool_step_calls_resolves_and_continues_to_the_next_step(local: Perq) -> None:
    job = await run(local, [call("healthCheck"), {"text": "done"}])
    assert job.status == "completed" and job.total_steps == 2
    assert by_step(local, job.id) == {
        1: ["startRun", *TOOL_STEP],
        2: ["startGeneration", "completeRun"],
    }
    start = last_event(local, job.id, "startRun")
    assert [m["type"] for m in start["inputMessages"]] == ["instructionMessage", "userMessage"]
    first, second = local.checkpoints(job.id)
    assert (first.status, second.status) == ("proceeding", "completed")
    assert [m.type for m in first.messages] == [
        "instructionMessage",
        "userMessage",
        "expertMessage",
        "toolMessage",
    ]
    assert tool_results(first)[0].tool_name == "healthCheck"
    following = last_event(local, job.id, "continueToNextStep")["nextCheckpoint"]
    assert following == {"id": second.id, "stepNumber": 2}


async def test_tool_calls_are_ordered_mcp_then_delegate_then_interactive(local: Perq) -> None:
    turns = [
        {
            "toolCalls": [
                {"toolName": "askUser", "args": {"question": "ok?"}},
                {"toolName": "helper", "args": {"query": "help"}},
                {"toolName": "healthCheck"},
            ]
        }
    ]
    local.write("perstack.toml", ASKER_WITH_HELPER)
    local.script({"asker": turns, "helper": [{"text": "helped"}]})
    job = local.start("asker", "go")
    await local.drain()
    calls = last_event(local, job.id, "callTools")["toolCalls"]
    assert [c["toolName"] for c in calls] == ["healthCheck", "helper", "askUser"]


async def test_an_unknown_tool_is_answered_with_an_error(local: Perq) -> None:
    job = await run(local, [call("noSuchTool"), {"text": "done"}])
    assert job.status == "completed"
    first = local.checkpoints(job.id)[0]
    assert "ToolNotFound" in result_text(tool_results(first)[0])


# --- GeneratingToolCall -> Finish: completeRun, stopRunByError --------------------------------------------


async def test_text_without_tool_calls_completes_the_run(local: Perq) -> None:
    job = await run(local, [{"text": "Hello!", "thinking": "say hi"}])
    assert job.status == "completed" and job.total_steps == 1
    assert flow(local, job.id) == ["startRun", "startGeneration", "completeRun"]
    assert last_event(local, job.id, "completeRun")["text"] == "Hello!"
    [cp] = local.checkpoints(job.id)
    assert cp.status == "completed" and cp.retry_count == 0
    assert [p.type for p in cp.messages[-1].contents] == ["thinkingPart", "textPart"]


async def test_a_non_retryable_error_stops_at_once(local: Perq) -> None:
    job = await run(local, [error("invalid x-api-key", retryable=False, status=401), {"text": "never"}])
    assert job.status == "stoppedByError"
    assert flow(local, job.id) == ["startRun", "startGeneration", "stopRunByError"]
    [cp] = local.checkpoints(job.id)
    assert cp.step_number == 1 and cp.status == "stoppedByError"
    assert cp.error is not None and cp.error.message == "invalid x-api-key" and cp.error.status_code == 401
    assert job.error is not None and job.error.message == "invalid x-api-key"


async def test_an_unexpected_finish_reason_stops_the_run(local: Perq) -> None:
    job = await run(local, [{**call("healthCheck"), "finishReason": "other"}])
    assert job.status == "stoppedByError"
    [cp] = local.checkpoints(job.id)
    assert cp.error is not None and cp.error.name == "UnexpectedFinishReason"


async def test_a_script_out_of_turns_stops_naming_expert_and_turn(local: Perq) -> None:
    job = await run(local, [call("healthCheck")])
    assert job.status == "stoppedByError"
    cp = local.checkpoints(job.id)[-1]
    assert cp.error is not None and "'e'" in cp.error.message and "turn 2" in cp.error.message


# --- GeneratingToolCall -> FinishingStep: retry ---------------------------------------------------------


async def test_retryable_errors_are_retried_and_success_resets_the_count(local: Perq) -> None:
    turns = [error("overloaded", status=529), error("rate limit", status=429), {"text": "done"}]
    job = await run(local, turns)
    assert job.status == "completed" and job.total_steps == 3
    steps = by_step(local, job.id)
    assert steps[1] == ["startRun", "startGeneration", "retry", "continueToNextStep"]
    assert steps[2] == ["startGeneration", "retry", "continueToNextStep"]
    assert steps[3] == ["startGeneration", "completeRun"]
    retries = [c.retry_count for c in local.checkpoints(job.id)]
    assert retries == [1, 2, 0]
    reason = json.loads(last_event(local, job.id, "retry")["reason"])
    assert reason == {"error": "APICallError", "message": "rate limit"}
    note = local.checkpoints(job.id)[0].messages[-1]
    assert note.type == "userMessage" and note.retry  # type: ignore[union-attr]


async def test_retries_are_capped(local: Perq) -> None:
    job = await run(local, [error("overloaded")] * 5, max_retries=2)
    assert job.status == "stoppedByError"
    last = local.checkpoints(job.id)[-1]
    assert last.step_number == 3 and last.status == "stoppedByError"
    assert last.error is not None and last.error.message.startswith("Max retries (2) exceeded")
    assert flow(local, job.id).count("retry") == 2


async def test_a_generation_timeout_is_retried(local: Perq, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker.loop, "retry_delay", lambda error, failures: 0.0)
    job = await run(local, [{"text": "slow", "delayMs": 2000}, {"text": "fast"}], timeout=100)
    assert job.status == "completed"
    assert "timeout" in last_event(local, job.id, "retry")["reason"]
    assert last_event(local, job.id, "completeRun")["text"] == "fast"


@pytest.mark.parametrize("retryable", [True, False])
async def test_the_loop_waits_before_a_retry_and_never_before_stopping(
    local: Perq, monkeypatch: pytest.MonkeyPatch, retryable: bool
) -> None:
    seen: list[tuple[float | None, int]] = []

    def delay(error: GenerationError, failures_before: int) -> float:
        seen.append((error.retry_after, failures_before))
        return 0.0

    monkeypatch.setattr(worker.loop, "retry_delay", delay)
    busy = {"error": {"message": "busy", "retryable": retryable, "statusCode": 429, "retryAfterMs": 250}}
    job = await run(local, [busy] * 3, max_retries=2)
    assert job.status == "stoppedByError"
    # a wait before each retry (the provider's retry-after, the failures before it), none before the stop
    assert seen == ([(0.25, 0), (0.25, 1)] if retryable else [])
    assert len(local.checkpoints(job.id)) == (3 if retryable else 1)


async def test_an_empty_answer_is_retried(local: Perq) -> None:
    job = await run(local, [{"text": "  "}, {"text": "done"}])
    assert job.status == "completed"
    first = local.checkpoints(job.id)[0]
    assert first.retry_count == 1
    assert first.messages[-1].type == "userMessage" and first.messages[-1].retry  # type: ignore[union-attr]
    assert "No tool call or text generated" in last_event(local, job.id, "retry")["reason"]


async def test_an_empty_answer_with_no_retries_left_stops(local: Perq) -> None:
    job = await run(local, [{}], max_retries=0)
    assert job.status == "stoppedByError"
    cp = local.checkpoints(job.id)[-1]
    assert cp.error is not None and cp.error.name == "MaxRetriesExceeded"


async def test_a_length_cut_answer_is_retried_with_a_synthetic_answer(local: Perq) -> None:
    job = await run(local, [{**call("healthCheck"), "finishReason": "length"}, {"text": "done"}])
    assert job.status == "completed"
    assert by_step(local, job.id)[1][-2:] == ["retry", "continueToNextStep"]
    first = local.checkpoints(job.id)[0]
    assert first.retry_count == 1
    synthetic, answer = first.messages[-2:]
    assert synthetic.type == "expertMessage" and answer.type == "toolMessage"
    assert result_text(answer.contents[0]) == "Generation length exceeded"


async def test_a_length_cut_answer_with_no_retries_left_stops(local: Perq) -> None:
    job = await run(local, [{**call("healthCheck"), "finishReason": "length"}], max_retries=0)
    assert job.status == "stoppedByError"
    cp = local.checkpoints(job.id)[-1]
    assert cp.error is not None and cp.error.name == "MaxRetriesExceeded"


# --- FinishingStep -> Finish: continueToNextStep, stopRunByExceededMaxSteps ------------------------------


async def test_max_steps_is_checked_at_step_end(local: Perq) -> None:
    turns = [call("todo", newTodos=[f"item {i}"]) for i in range(10)]
    job = await run(local, turns, max_steps=4)
    assert job.status == "stoppedByMaxSteps" and job.total_steps == 4
    assert job.finished_at is not None
    checkpoints = local.checkpoints(job.id)
    assert [c.step_number for c in checkpoints] == [1, 2, 3, 4]
    assert checkpoints[-1].status == "stoppedByExceededMaxSteps"
    assert by_step(local, job.id)[4] == [*TOOL_STEP[:-1], "stopRunByExceededMaxSteps"]


async def test_a_run_completing_at_the_last_step_completes(local: Perq) -> None:
    job = await run(local, [call("healthCheck"), {"text": "just in time"}], max_steps=2)
    assert job.status == "completed" and job.total_steps == 2


async def test_a_retry_spends_a_step_and_can_reach_max_steps(local: Perq) -> None:
    job = await run(local, [error("overloaded"), {"text": "never"}], max_steps=1)
    assert job.status == "stoppedByMaxSteps"
    assert flow(local, job.id) == ["startRun", "startGeneration", "retry", "stopRunByExceededMaxSteps"]


# --- CallingTool -> attemptCompletion: completeRun, ResolvingToolResult, GeneratingRunResult -------------


async def test_attempt_completion_with_text_completes_without_another_request(local: Perq) -> None:
    # one turn only: a second request would stop the run with "ran out of turns"
    answer = {
        "text": "All done.",
        "toolCalls": [{"toolName": "attemptCompletion"}, {"toolName": "healthCheck"}],
    }
    job = await run(local, [answer])
    assert job.status == "completed"
    assert flow(local, job.id) == ["startRun", "startGeneration", "callTools", "completeRun"]
    assert last_event(local, job.id, "completeRun")["text"] == "All done."
    [cp] = local.checkpoints(job.id)
    results = tool_results(cp)
    # the call beside attemptCompletion is answered, not left dangling
    assert [r.tool_name for r in results] == ["attemptCompletion", "healthCheck"]
    assert "Skipped" in result_text(results[1])


async def test_attempt_completion_with_open_todos_goes_back_to_work(local: Perq) -> None:
    turns = [call("todo", newTodos=["x"]), call("attemptCompletion"), {"text": "done"}]
    job = await run(local, turns)
    assert job.status == "completed"
    assert by_step(local, job.id)[2] == TOOL_STEP
    second = local.checkpoints(job.id)[1]
    assert second.status == "proceeding"
    assert json.loads(result_text(tool_results(second)[0]))["remainingTodos"][0]["title"] == "x"


async def test_attempt_completion_without_text_generates_the_run_result(local: Perq) -> None:
    job = await run(local, [call("attemptCompletion"), {"text": "The result.", "thinking": "sum up"}])
    assert job.status == "completed" and job.total_steps == 1
    assert flow(local, job.id) == [
        "startRun",
        "startGeneration",
        "callTools",
        "attemptCompletion",
        "completeRun",
    ]
    assert last_event(local, job.id, "completeRun")["text"] == "The result."
    [cp] = local.checkpoints(job.id)
    assert [m.type for m in cp.messages[-2:]] == ["toolMessage", "expertMessage"]
    assert [p.type for p in cp.messages[-1].contents] == ["thinkingPart", "textPart"]


async def test_an_empty_run_result_still_has_a_text_part(local: Perq) -> None:
    job = await run(local, [call("attemptCompletion"), {}])
    assert job.status == "completed"
    [cp] = local.checkpoints(job.id)
    assert [(p.type, p.text) for p in cp.messages[-1].contents] == [("textPart", "")]  # type: ignore[union-attr]


async def test_a_failed_run_result_is_retried_through_a_new_step(local: Perq) -> None:
    turns = [call("attemptCompletion"), error("overloaded"), call("attemptCompletion"), {"text": "result"}]
    job = await run(local, turns)
    assert job.status == "completed" and job.total_steps == 2
    steps = by_step(local, job.id)
    assert steps[1] == [
        "startRun",
        "startGeneration",
        "callTools",
        "attemptCompletion",
        "retry",
        "continueToNextStep",
    ]
    assert steps[2] == ["startGeneration", "callTools", "attemptCompletion", "completeRun"]
    first = local.checkpoints(job.id)[0]
    assert [m.type for m in first.messages[-3:]] == ["expertMessage", "toolMessage", "userMessage"]


async def test_a_run_result_failing_for_good_stops_the_run(local: Perq) -> None:
    job = await run(local, [call("attemptCompletion"), error("bad request", retryable=False, status=400)])
    assert job.status == "stoppedByError"
    assert flow(local, job.id)[-2:] == ["attemptCompletion", "stopRunByError"]
    [cp] = local.checkpoints(job.id)
    assert cp.error is not None and cp.error.status_code == 400


# --- CallingTool -> CallingInteractiveTool -> Finish, and the answer ------------------------------------


async def test_an_interactive_tool_stops_the_run_until_answered(local: Perq) -> None:
    local.write("perstack.toml", ASKER_WITH_HELPER)
    local.script({"asker": [call("askUser", question="ok?"), {"text": "thanks"}]})
    job = local.start("asker", "start")
    await local.drain()
    assert local.job(job.id).status == "stoppedByInteractiveTool"
    assert flow(local, job.id)[-2:] == ["callInteractiveTool", "stopRunByInteractiveTool"]
    [stopped] = local.checkpoints(job.id)
    assert stopped.status == "stoppedByInteractiveTool"
    assert [c.tool_name for c in stopped.pending_tool_calls or []] == ["askUser"]

    local.start("asker", "User confirmed", continue_job=job.id, interactive=True)
    await local.drain()
    assert local.job(job.id).status == "completed"
    answered = local.checkpoints(job.id)[1]
    # the answer is written back in a step of its own, without asking the model
    assert by_step(local, job.id)[2] == ["startRun", "finishAllToolCalls", "continueToNextStep"]
    assert answered.pending_tool_calls is None and answered.partial_tool_results is None
    answer = tool_results(answered)[0]
    assert (answer.tool_name, result_text(answer)) == ("askUser", "User confirmed")
    assert by_step(local, job.id)[3] == ["startGeneration", "completeRun"]


async def test_interactive_calls_are_answered_one_at_a_time(local: Perq) -> None:
    both = {
        "toolCalls": [
            {"toolName": "askUser", "args": {"question": "one?"}},
            {"toolName": "askUser", "args": {"question": "two?"}},
        ]
    }
    local.write("perstack.toml", ASKER_WITH_HELPER)
    local.script({"asker": [both, {"text": "thanks"}]})
    job = local.start("asker", "start")
    await local.drain()
    first_id, second_id = [c.id for c in local.checkpoints(job.id)[-1].pending_tool_calls or []]

    local.start("asker", "yes", continue_job=job.id, interactive=True)
    await local.drain()
    # one call is still pending: it is run again (and stops the run again) in the resumed step
    assert by_step(local, job.id)[2] == [
        "startRun",
        "resumeToolCalls",
        "callInteractiveTool",
        "stopRunByInteractiveTool",
    ]
    waiting = local.checkpoints(job.id)[-1]
    assert [c.id for c in waiting.pending_tool_calls or []] == [second_id]
    assert [r.id for r in waiting.partial_tool_results or []] == [first_id]

    local.start("asker", "also yes", continue_job=job.id, interactive=True)
    await local.drain()
    assert local.job(job.id).status == "completed"
    assert [r.tool_call_id for r in tool_results(local.checkpoints(job.id)[-1])] == [first_id, second_id]


# --- CallingTool -> CallingDelegate -> Finish, and the delegate's return ---------------------------------


async def test_a_delegate_runs_and_its_result_returns_to_the_caller(local: Perq) -> None:
    local.write("perstack.toml", ASKER_WITH_HELPER)
    local.script(
        {"asker": [call("helper", query="help me"), {"text": "all done"}], "helper": [{"text": "helped"}]}
    )
    job = local.start("asker", "start")
    await local.drain()
    assert local.job(job.id).status == "completed"
    events = [f"{e.type}:{e.expert_key}" for e in local.events(job.id) if e.type in LOOP_EVENTS]
    assert events == [
        "startRun:asker",
        "startGeneration:asker",
        "callTools:asker",
        "callDelegate:asker",
        "stopRunByDelegate:asker",
        "startRun:helper",
        "startGeneration:helper",
        "completeRun:helper",
        "startRun:asker",
        "finishAllToolCalls:asker",
        "continueToNextStep:asker",
        "startGeneration:asker",
        "completeRun:asker",
    ]
    stop = last_event(local, job.id, "stopRunByDelegate")["checkpoint"]
    assert stop["status"] == "stoppedByDelegate"
    assert [(t["toolName"], t["query"]) for t in stop["delegateTo"]] == [("helper", "help me")]
    final = local.checkpoints(job.id)[-1]
    assert final.expert.key == "asker" and final.delegate_to is None
    [result] = [r for r in tool_results(local.checkpoints(job.id)[-2]) if r.tool_name == "helper"]
    assert result_text(result) == "helped"


async def test_mixed_calls_run_tools_then_delegates_then_ask(local: Perq) -> None:
    mixed = {
        "toolCalls": [
            {"toolName": "askUser", "args": {"question": "ok?"}},
            {"toolName": "helper", "args": {"query": "help me"}},
            {"toolName": "healthCheck"},
        ]
    }
    local.write("perstack.toml", ASKER_WITH_HELPER)
    local.script({"asker": [mixed, {"text": "all done"}], "helper": [{"text": "helped"}]})
    job = local.start("asker", "start")
    await local.drain()
    assert local.job(job.id).status == "stoppedByInteractiveTool"
    by_delegate = last_event(local, job.id, "stopRunByDelegate")["checkpoint"]
    assert [r["toolName"] for r in by_delegate["partialToolResults"]] == ["healthCheck"]
    assert [c["toolName"] for c in by_delegate["pendingToolCalls"]] == ["askUser"]
    # back from the delegate, the pending interactive call is resumed within the returning step
    resumed = [e.type for e in local.events(job.id) if e.expert_key == "asker" and e.type in LOOP_EVENTS][-4:]
    assert resumed == ["startRun", "resumeToolCalls", "callInteractiveTool", "stopRunByInteractiveTool"]

    local.start("asker", "yes", continue_job=job.id, interactive=True)
    await local.drain()
    assert local.job(job.id).status == "completed"
    names = sorted(r.tool_name for r in tool_results(local.checkpoints(job.id)[-1]))
    assert names == ["askUser", "healthCheck", "helper"]


# --- Init from a finished run: a new user turn -----------------------------------------------------------


async def test_a_continuation_adds_a_user_turn_and_starts_clean(local: Perq) -> None:
    job = await run(local, [error("busy"), error("busy"), {"text": "now fine"}], max_retries=1)
    assert job.status == "stoppedByError"
    local.start("e", "try again", continue_job=job.id, max_retries=1)
    await local.drain()
    # the old error and retry count do not carry over: the new turn gets its retry, and succeeds
    assert local.job(job.id).status == "completed"
    start = last_event(local, job.id, "startRun")
    assert [m["type"] for m in start["inputMessages"]] == ["userMessage"]
    assert start["initialCheckpoint"]["status"] == "stoppedByError"
    final = local.checkpoints(job.id)[-1]
    assert final.error is None and final.retry_count == 0
    assert [m.type for m in final.messages].count("instructionMessage") == 1


# --- cancel ------------------------------------------------------------------------------------------------


async def test_a_cancelled_job_runs_no_further_step(local: Perq) -> None:
    local.write("perstack.toml", CONFIG)
    local.script({"e": [call("healthCheck"), call("healthCheck"), {"text": "done"}]})
    job = local.start("e", "go")
    await local.step()
    local.cancel(job.id)
    assert await local.step() is None
    assert not local.local.pending
    record = local.job(job.id)
    assert record.status == "cancelled" and record.total_steps == 1
    assert [c.step_number for c in local.checkpoints(job.id)] == [1]


# --- any failure in a state ends the run with a checkpoint -------------------------------------------------


async def test_a_step_whose_skills_cannot_be_set_up_stops_the_run(local: Perq) -> None:
    config = CONFIG + '[experts.e.skills.calc]\ntype = "mcpStdioSkill"\ncommand = "calc"\nargs = []\n'
    job = await run(local, [{"text": "never asked"}], config=config)
    assert job.status == "stoppedByError"
    assert flow(local, job.id) == ["stopRunByError"]
    [cp] = local.checkpoints(job.id)
    assert cp.error is not None and cp.error.name == "SkillError" and '"calc"' in cp.error.message


@pytest.mark.parametrize(
    ("status", "given", "message"),
    [
        ("init", RunInput(), "Input message is undefined"),
        ("stoppedByInteractiveTool", RunInput(text="hi"), "Interactive tool call result is undefined"),
        ("completed", RunInput(), "Input message is undefined"),
    ],
)
async def test_a_failure_inside_the_loop_stops_the_run_with_a_checkpoint(
    tmp_path: Path, status: str, given: RunInput, message: str
) -> None:
    expert = Expert(key="e", name="e", instruction="do")
    setting = RunSetting(
        model="m",
        provider_config={"providerName": "script"},  # type: ignore[arg-type]
        job_id="j",
        run_id="r",
        expert_key="e",
        input=given,
        experts={"e": expert},
        workspace=str(tmp_path),
    )
    start = Checkpoint(
        id=checkpoint_id("r", 1),
        job_id="j",
        run_id="r",
        status=status,  # type: ignore[arg-type]
        step_number=1,
        expert=ExpertRef(key="e", name="e"),
    )
    runner = StepRunner(setting=setting, expert=expert)
    end = await runner.run(start, begins_run=True)
    assert end.status == "stoppedByError"
    assert end.error is not None and (end.error.name, end.error.message) == ("ValueError", message)
    assert [e.type for e in runner.events] == ["stopRunByError"]


async def test_an_answer_to_a_call_not_pending_is_kept_and_the_pending_ones_stay(tmp_path: Path) -> None:
    """Init from a paused step: the answer joins the partial results, and the answered call leaves the
    pending ones (found by id, wherever it is among them)."""
    expert = Expert(key="e", name="e", instruction="do")
    asked = [
        ToolCall(id="a", skill_name="user-input", tool_name="askUser"),
        ToolCall(id="b", skill_name="user-input", tool_name="askUser"),
    ]
    answer = InteractiveToolCallResult(
        tool_call_id="b", tool_name="askUser", skill_name="user-input", text="B"
    )
    setting = RunSetting(
        model="m",
        provider_config={"providerName": "script"},  # type: ignore[arg-type]
        job_id="j",
        run_id="r",
        expert_key="e",
        input=RunInput(interactive_tool_call_result=answer),
        experts={"e": expert},
        workspace=str(tmp_path),
    )
    start = Checkpoint(
        id=checkpoint_id("r", 1),
        job_id="j",
        run_id="r",
        status="stoppedByInteractiveTool",
        step_number=1,
        expert=ExpertRef(key="e", name="e"),
        pending_tool_calls=asked,
    )
    runner = StepRunner(setting=setting, expert=expert)
    end = await runner.run(start, begins_run=True)
    # the interactive tool is unknown to this expert (no skills): the pending call is answered with an error
    assert [e.type for e in runner.events][:2] == ["startRun", "resumeToolCalls"]
    assert end.status == "proceeding"
    assert [r.tool_call_id for r in tool_results(end)] == ["b", "a"]
