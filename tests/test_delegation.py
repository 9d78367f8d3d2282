"""Delegation, interactive tools and continuations: Perstack's end-to-end scenarios 21-25 (spec §8),
run through a real Redis and real worker processes with script-provider experts."""

from __future__ import annotations

import json
import time
from typing import TypeVar

from shared.models import (
    CallDelegate,
    CallTools,
    CompleteRun,
    Event,
    FinishAllToolCalls,
    Message,
    StartRun,
    StopRun,
    TextPart,
    ToolMessage,
    ToolResultPart,
    Usage,
)
from tests.conftest import Perq, script_toml
from tests.support.configs import ASKER_WITH_HELPER

SCRIPT = ("--provider", "script", "--model", "script.toml")

CHAIN_CONFIG = """
[experts.chain]
instruction = "Delegate to level1"
delegates = ["level1"]

[experts.level1]
description = "The first level"
instruction = "Delegate to level2"
delegates = ["level2"]

[experts.level2]
description = "The second level"
instruction = "Answer"
"""


def u(i: int, o: int) -> dict[str, int]:
    return {"inputTokens": i, "outputTokens": o}


def flow(events: list[Event], types: tuple[str, ...]) -> list[str]:
    return [f"{e.type}:{e.expert_key}" for e in events if e.type in types]


E = TypeVar("E", bound=Event)


def of(events: list[Event], kind: type[E], expert: str | None = None, type_: str | None = None) -> list[E]:
    """The events of one class (of one expert's runs; of one of the class's types), typed."""
    return [
        e
        for e in events
        if isinstance(e, kind) and (expert is None or e.expert_key == expert) and type_ in (None, e.type)
    ]


def text_of(message: Message | ToolResultPart) -> str:
    """The text of its first text part."""
    return next(p.text for p in message.contents if isinstance(p, TextPart))


def tool_results(message: Message) -> list[ToolResultPart]:
    """The results a tool message answers with."""
    assert isinstance(message, ToolMessage), message
    return message.contents


def test_delegate_chain(perq: Perq) -> None:
    perq.write("perstack.toml", CHAIN_CONFIG)
    perq.write(
        "script.toml",
        script_toml(
            {
                "chain": [
                    {
                        "toolCalls": [{"toolName": "level1", "args": {"query": "go deeper"}}],
                        "usage": u(100, 10),
                    },
                    {"text": "chain done", "usage": u(7, 1)},
                ],
                "level1": [
                    {
                        "toolCalls": [{"toolName": "level2", "args": {"query": "go deepest"}}],
                        "usage": u(20, 2),
                    },
                    {"text": "level1 done", "usage": u(5, 3)},
                ],
                "level2": [{"text": "level2 done", "usage": u(30, 4)}],
            }
        ),
    )
    job_id = perq.submit("chain", "start", *SCRIPT)
    perq.start_worker()
    perq.start_worker()
    job = perq.wait_job(job_id)
    assert job.status == "completed", job

    events = perq.events(job_id)
    assert flow(events, ("startRun", "callDelegate", "stopRunByDelegate", "completeRun")) == [
        "startRun:chain",
        "callDelegate:chain",
        "stopRunByDelegate:chain",
        "startRun:level1",
        "callDelegate:level1",
        "stopRunByDelegate:level1",
        "startRun:level2",
        "completeRun:level2",
        "startRun:level1",
        "completeRun:level1",
        "startRun:chain",
        "completeRun:chain",
    ]
    assert not [e for e in events if e.type == "retry"]

    # by hand: chain 1 (delegate) -> level1 2 (delegate) -> level2 3 (complete) -> level1 4 (resume), 5
    # (complete) -> chain 6 (resume), 7 (complete); usage is cumulative along the chain
    final = of(events, CompleteRun)[-1].checkpoint
    assert final.step_number == 7
    assert final.usage == Usage(input_tokens=162, output_tokens=20, total_tokens=182)
    assert job.total_steps == 7
    assert job.usage == final.usage
    # the delegate's result came back as the tool result of the parent's call
    resumed = of(events, FinishAllToolCalls, "chain")[0]
    part = tool_results(resumed.new_messages[0])[0]
    assert part.tool_name == "level1"
    assert text_of(part) == "level1 done"
    # the delegate never saw its parent's history: its conversation starts with its own instruction
    level2_start = of(events, StartRun, "level2")[0]
    messages = level2_start.input_messages
    assert [m.type for m in messages] == ["instructionMessage", "userMessage"]
    assert text_of(messages[1]) == "go deepest"


PARALLEL_CONFIG = """
[experts.coord]
instruction = "Delegate to both"
delegates = ["alpha", "beta"]

[experts.alpha]
description = "Alpha"
instruction = "Answer"

[experts.beta]
description = "Beta"
instruction = "Answer"
"""


def test_parallel_delegation_then_continue(perq: Perq) -> None:
    perq.write("perstack.toml", PARALLEL_CONFIG)
    perq.write(
        "script.toml",
        script_toml(
            {
                "coord": [
                    {
                        "toolCalls": [
                            {"toolName": "alpha", "args": {"query": "a?"}},
                            {"toolName": "beta", "args": {"query": "b?"}},
                        ],
                        "usage": u(100, 10),
                    },
                    {"text": "both answered", "usage": u(1, 1)},
                    {"text": "OK", "usage": u(2, 2)},
                ],
                "alpha": [{"text": "alpha says hi", "delayMs": 1000, "usage": u(7, 3)}],
                "beta": [{"text": "beta says hi", "delayMs": 1000, "usage": u(11, 4)}],
            }
        ),
    )
    # one step at a time per worker: overlapping children prove they ran on different workers
    perq.start_worker(PERQ_CONCURRENCY="1")
    perq.start_worker(PERQ_CONCURRENCY="1")
    job_id = perq.submit("coord", "ask both", *SCRIPT)
    job = perq.wait_job(job_id)
    assert job.status == "completed", job

    events = perq.events(job_id)
    [delegate] = of(events, CallDelegate)
    assert len(delegate.tool_calls) == 2
    completes = [e for e in events if e.type == "completeRun"]
    assert sorted(e.expert_key or "" for e in completes) == ["alpha", "beta", "coord"]

    def span(key: str) -> tuple[int, int]:
        mine = [e for e in events if e.expert_key == key]
        return mine[0].timestamp, mine[-1].timestamp

    (a0, a1), (b0, b1) = span("alpha"), span("beta")
    assert a0 < b1 and b0 < a1, "the two children did not run at the same time"

    # usage = parent + both deltas, exactly; steps continue from the highest child step
    assert job.usage == Usage(input_tokens=119, output_tokens=18, total_tokens=137)
    assert job.total_steps == 4
    results = tool_results(of(events, FinishAllToolCalls)[0].new_messages[0])
    assert {r.tool_name: text_of(r) for r in results} == {
        "alpha": "alpha says hi",
        "beta": "beta says hi",
    }

    again = perq.run("run", "coord", "Complete with OK", "--continue-job", job_id, *SCRIPT, "--wait")
    assert again.returncode == 0, again.stderr
    after = perq.events(job_id)
    new = after[len(events) :]
    assert [e.type for e in new if e.type == "completeRun"] == ["completeRun"]
    assert new[0].type == "startRun"
    assert perq.job(job_id).total_steps == 5
    assert perq.job(job_id).usage == Usage(input_tokens=121, output_tokens=20, total_tokens=141)


def test_interactive_stop_and_answer(perq: Perq) -> None:
    perq.write("perstack.toml", ASKER_WITH_HELPER)
    perq.write(
        "script.toml",
        script_toml(
            {
                "asker": [
                    {"toolCalls": [{"toolName": "askUser", "args": {"question": "ok?"}}]},
                    {"text": "thanks"},
                ],
            }
        ),
    )
    perq.start_worker()
    first = perq.run("run", "asker", "start", *SCRIPT, "--wait")
    assert first.returncode == 3, first.stderr
    job_id = first.stdout.strip().splitlines()[-1]
    events = perq.events(job_id)
    assert [e.type for e in events].count("stopRunByInteractiveTool") == 1
    stop = of(events, StopRun, type_="stopRunByInteractiveTool")[0]
    assert stop.checkpoint.id
    status = perq.run("status", job_id)
    assert "askUser" in status.stdout and f"--continue-job {job_id} -i" in status.stdout

    not_answered = perq.run("run", "asker", "go on", "--continue-job", job_id, *SCRIPT)
    assert not_answered.returncode == 2 and "answer it with -i" in not_answered.stderr

    second = perq.run(
        "run", "asker", "User confirmed the test", "--continue-job", job_id, "-i", *SCRIPT, "--wait"
    )
    assert second.returncode == 0, second.stderr
    new = perq.events(job_id)[len(events) :]
    assert new[0].type == "startRun"
    assert isinstance(new[0], StartRun) and new[0].initial_checkpoint.status == "stoppedByInteractiveTool"
    assert [e.type for e in new].count("completeRun") == 1
    answer = tool_results(of(new, FinishAllToolCalls)[0].new_messages[0])[0]
    assert answer.tool_name == "askUser"
    assert text_of(answer) == "User confirmed the test"

    done = perq.run("run", "asker", "again", "--continue-job", job_id, "-i", *SCRIPT)
    assert done.returncode == 2 and "not waiting for input" in done.stderr


def test_mixed_tool_calls(perq: Perq) -> None:
    perq.write("perstack.toml", ASKER_WITH_HELPER)
    perq.write(
        "script.toml",
        script_toml(
            {
                "asker": [
                    {
                        "toolCalls": [
                            {"toolName": "askUser", "args": {"question": "ok?"}},
                            {"toolName": "helper", "args": {"query": "help me"}},
                            {"toolName": "healthCheck", "args": {}},
                        ]
                    },
                    {"text": "all done"},
                ],
                "helper": [{"text": "helped"}],
            }
        ),
    )
    perq.start_worker()
    first = perq.run("run", "asker", "start", *SCRIPT, "--wait")
    assert first.returncode == 3, first.stderr
    job_id = first.stdout.strip().splitlines()[-1]
    events = perq.events(job_id)

    [call] = of(events, CallTools)
    assert [c.tool_name for c in call.tool_calls] == ["healthCheck", "helper", "askUser"]
    assert [
        f"{e.type}:{e.expert_key}"
        for e in events
        if e.type
        in (
            "startRun",
            "callTools",
            "callDelegate",
            "stopRunByDelegate",
            "completeRun",
            "resumeToolCalls",
            "callInteractiveTool",
            "stopRunByInteractiveTool",
        )
    ] == [
        "startRun:asker",
        "callTools:asker",
        "callDelegate:asker",
        "stopRunByDelegate:asker",
        "startRun:helper",
        "completeRun:helper",
        "startRun:asker",
        "resumeToolCalls:asker",
        "callInteractiveTool:asker",
        "stopRunByInteractiveTool:asker",
    ]
    by_delegate = of(events, StopRun, type_="stopRunByDelegate")[0].checkpoint
    assert [r.tool_name for r in by_delegate.partial_tool_results or []] == ["healthCheck"]
    stopped = of(events, StopRun, type_="stopRunByInteractiveTool")[0].checkpoint
    assert stopped.status == "stoppedByInteractiveTool"
    assert len(stopped.partial_tool_results or []) == 2
    assert [c.tool_name for c in stopped.pending_tool_calls or []] == ["askUser"]

    second = perq.run("run", "asker", "yes", "--continue-job", job_id, "-i", *SCRIPT, "--wait")
    assert second.returncode == 0, second.stderr
    final = perq.checkpoints(job_id)[-1]
    tool_message = next(m for m in reversed(final.messages) if m.type == "toolMessage")
    assert sorted(p.tool_name for p in tool_results(tool_message)) == ["askUser", "healthCheck", "helper"]


def test_resume_from_branches_from_a_coordinator_checkpoint(perq: Perq) -> None:
    perq.write("perstack.toml", ASKER_WITH_HELPER)
    perq.write(
        "script.toml",
        script_toml(
            {
                "asker": [
                    {"toolCalls": [{"toolName": "healthCheck", "args": {}}]},
                    {"toolCalls": [{"toolName": "healthCheck", "args": {}}]},
                    {"text": "first end"},
                    {"text": "branch end"},
                ],
            }
        ),
    )
    job_id = perq.submit("asker", "start", *SCRIPT)
    perq.burst()
    checkpoints = perq.checkpoints(job_id)
    assert [c.step_number for c in checkpoints] == [1, 2, 3]

    refused = perq.run("run", "asker", "again", "--resume-from", checkpoints[0].id, *SCRIPT)
    assert refused.returncode == 2
    assert refused.stderr.strip() == "perq: --resume-from requires --continue-job"

    branch = perq.run(
        "run", "asker", "branch", "--continue-job", job_id, "--resume-from", checkpoints[0].id, *SCRIPT
    )
    assert branch.returncode == 0, branch.stderr
    perq.burst()
    job = perq.job(job_id)
    assert job.status == "completed"
    # the branch continues from step 1: its own steps 2 and 3 (the script answers by conversation length)
    assert job.total_steps == 3
    head = perq.store.load_checkpoint(job_id, job.head_checkpoint_id or "")
    assert head is not None and head.step_number == 3
    assert head.id not in {c.id for c in checkpoints}
    assert text_of(head.messages[-1]) == "first end"
    assert sorted(c.step_number for c in perq.checkpoints(job_id)) == [1, 2, 2, 3, 3]
    user_texts = [text_of(m) for m in head.messages if m.type == "userMessage"]
    assert user_texts == ["start", "branch"]


def test_failing_delegate_returns_its_error_to_the_parent(perq: Perq) -> None:
    perq.write("perstack.toml", CHAIN_CONFIG)
    perq.write(
        "script.toml",
        script_toml(
            {
                "chain": [
                    {"toolCalls": [{"toolName": "level1", "args": {"query": "try"}}]},
                    {"text": "recovered"},
                ],
                "level1": [{"error": {"message": "invalid api key", "retryable": False, "statusCode": 401}}],
            }
        ),
    )
    job_id = perq.submit("chain", "start", *SCRIPT)
    perq.burst()
    job = perq.job(job_id)
    assert job.status == "completed"
    final = perq.checkpoints(job_id)[-1]
    assert final.expert.key == "chain"
    tool_message = next(m for m in reversed(final.messages) if m.type == "toolMessage")
    text = text_of(tool_results(tool_message)[0])
    assert "Delegation failed" in text and "invalid api key" in text


def test_delegate_hitting_max_steps_stops_the_job(perq: Perq) -> None:
    perq.write("perstack.toml", CHAIN_CONFIG)
    perq.write(
        "script.toml",
        script_toml(
            {
                "chain": [
                    {"toolCalls": [{"toolName": "level1", "args": {"query": "loop"}}]},
                    {"text": "gave up"},
                ],
                "level1": [{"toolCalls": [{"toolName": "healthCheck", "args": {}}]}] * 10,
            }
        ),
    )
    job_id = perq.submit("chain", "start", *SCRIPT, "--max-steps", "3")
    perq.burst()
    job = perq.job(job_id)
    assert job.status == "stoppedByMaxSteps"
    assert job.total_steps == 3
    stop = perq.checkpoints(job_id)[-1]
    assert stop.status == "stoppedByExceededMaxSteps" and stop.expert.key == "level1"
    # the job's head stays the coordinator's own checkpoint, so the job can be continued (spec §9 #19)
    head = perq.store.load_checkpoint(job_id, job.head_checkpoint_id or "")
    assert head is not None and head.expert.key == "chain" and head.status == "stoppedByDelegate"

    # continuing answers the interrupted delegate call, then asks the new query
    again = perq.run("run", "chain", "stop looping", "--continue-job", job_id, "--max-steps", "10", *SCRIPT)
    assert again.returncode == 0, again.stderr
    perq.burst()
    job = perq.job(job_id)
    assert job.status == "completed"
    final = perq.store.load_checkpoint(job_id, job.head_checkpoint_id or "")
    assert final is not None and final.status == "completed"
    assert final.expert.key == "chain" and text_of(final.messages[-1]) == "gave up"
    kinds = [m.type for m in final.messages]
    assert kinds[-3:] == ["toolMessage", "userMessage", "expertMessage"]


def test_continuation_rules(perq: Perq) -> None:
    perq.write("perstack.toml", CHAIN_CONFIG)
    perq.write("script.toml", script_toml({"chain": [{"text": "one", "delayMs": 1500}, {"text": "two"}]}))
    job_id = perq.submit("chain", "start", *SCRIPT)

    busy = perq.run("run", "chain", "more", "--continue-job", job_id, *SCRIPT)
    assert busy.returncode == 2 and "queued" in busy.stderr
    wrong = perq.run("run", "level1", "more", "--continue-job", job_id, *SCRIPT)
    assert wrong.returncode == 2
    perq.burst()
    assert perq.job(job_id).status == "completed"
    wrong = perq.run("run", "level1", "more", "--continue-job", job_id, *SCRIPT)
    assert wrong.returncode == 2 and "belongs to expert 'chain'" in wrong.stderr
    missing = perq.run("run", "chain", "more", "--continue-job", "nope", *SCRIPT)
    assert missing.returncode == 2 and "not found" in missing.stderr
    named = perq.run("run", "chain", "more", "--continue-job", job_id, "--job-id", "x", *SCRIPT)
    assert named.returncode == 2

    latest = perq.run("run", "chain", "more", "--continue", *SCRIPT, "--json")
    assert json.loads(latest.stdout)["jobId"] == job_id
    perq.burst()
    job = perq.job(job_id)
    assert job.status == "completed" and job.total_steps == 2


def test_waiting_parent_holds_no_worker_slot(perq: Perq) -> None:
    """With one worker that runs one step at a time, a parent waiting on its delegate does not block it."""
    perq.write("perstack.toml", CHAIN_CONFIG)
    perq.write(
        "script.toml",
        script_toml(
            {
                "chain": [{"toolCalls": [{"toolName": "level1", "args": {"query": "x"}}]}, {"text": "done"}],
                "level1": [{"text": "sub", "delayMs": 300}],
            }
        ),
    )
    perq.start_worker(PERQ_CONCURRENCY="1")
    job_id = perq.submit("chain", "start", *SCRIPT)
    started = time.monotonic()
    assert perq.wait_job(job_id).status == "completed"
    assert time.monotonic() - started < 30
