"""`perq export` writes Perstack's own layout, and Perstack's schemas accept every file.

The jobs are the suite's scenarios, run through a real Redis and a real worker: delegation (a chain and a
parallel pair), interactive tools (mixed calls, one job answered, one left waiting), max steps, errors
(retried, then one that stops the run), an MCP stdio server, thinking, a cancelled and a queued job. The
export is checked with `../shared/interop/validate` (Perstack's zod schemas at PR #83 and at a later main)
when that kit and node are beside the checkout, as in CI.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.perstack_layout import event_files
from tests.conftest import Perq, script_toml
from tests.support.localredis import LocalRedis

KIT = Path(__file__).resolve().parents[1].parent / "shared" / "interop"
VALIDATE = KIT / "validate"
SCRIPT = ("--provider", "script", "--model", "script.toml")
PYTHON = json.dumps(sys.executable)
PROVIDERS = ("anthropic", "openai", "ollama", "amazon-bedrock")

CONFIG = f"""
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

[experts.coord]
instruction = "Delegate to both"
delegates = ["alpha", "beta"]
[experts.alpha]
description = "Alpha"
instruction = "Answer"
[experts.beta]
description = "Beta"
instruction = "Answer"

[experts.asker]
instruction = "Ask the user"
delegates = ["helper"]
[experts.asker.skills."@perstack/base"]
type = "mcpStdioSkill"
command = "npx"
packageName = "@perstack/base"
[experts.asker.skills."user-input"]
type = "interactiveSkill"
[experts.asker.skills."user-input".tools.askUser]
description = "Ask the user a question"
inputJsonSchema = '{{"type": "object", "properties": {{"question": {{"type": "string"}}}}}}'
[experts.helper]
description = "Helps"
instruction = "Help"

[experts.looper]
instruction = "Loop"
[experts.retrier]
instruction = "Fail, then answer"
[experts.broken]
instruction = "Fail"
[experts.thinker]
instruction = "Think"

[experts.clock]
instruction = "Answer time questions"
[experts.clock.skills.time]
type = "mcpStdioSkill"
command = {PYTHON}
args = ["-m", "mcp_server_time", "--local-timezone", "UTC"]
[experts.clock.skills."@perstack/base"]
type = "mcpStdioSkill"
command = "npx"
packageName = "@perstack/base"
pick = ["attemptCompletion", "todo"]
"""

TURNS: dict[str, list[dict[str, Any]]] = {
    "chain": [
        {"toolCalls": [{"toolName": "level1", "args": {"query": "go deeper"}}]},
        {"text": "chain done"},
    ],
    "level1": [{"toolCalls": [{"toolName": "level2", "args": {"query": "go deepest"}}]}, {"text": "l1 done"}],
    "level2": [{"text": "level2 done"}],
    "coord": [
        {
            "toolCalls": [
                {"toolName": "alpha", "args": {"query": "a?"}},
                {"toolName": "beta", "args": {"query": "b?"}},
            ]
        },
        {"text": "both answered"},
    ],
    "alpha": [{"text": "alpha says hi"}],
    "beta": [{"text": "beta says hi"}],
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
    "looper": [{"toolCalls": [{"toolName": "todo", "args": {"newTodos": [f"item {i}"]}}]} for i in range(5)],
    "retrier": [{"error": {"message": "overloaded"}}, {"text": "fine now"}],
    "broken": [{"error": {"message": "invalid x-api-key", "retryable": False, "statusCode": 401}}],
    "thinker": [
        {
            "thinking": "Let me write a todo first.",
            "toolCalls": [{"toolName": "todo", "args": {"newTodos": ["x"]}}],
        },
        {"thinking": "Done.", "text": "thought it through"},
    ],
    "clock": [
        {
            "toolCalls": [
                {
                    "toolName": "convert_time",
                    "args": {"source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"},
                }
            ]
        },
        {"toolCalls": [{"toolName": "attemptCompletion", "args": {}}]},
        {"text": "21:00 in Tokyo"},
    ],
}


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory, redis_server: LocalRedis
) -> Iterator[tuple[Perq, Path]]:
    """A store holding every kind of job perq makes, and its export (built once for this module)."""
    root = tmp_path_factory.mktemp("export")
    perq = Perq(root=root, redis=redis_server, queue=f"perq:test:export:{time.monotonic_ns()}")
    perq.storage.mkdir()
    perq.write("perstack.toml", CONFIG)
    perq.write("script.toml", script_toml(TURNS))
    # cancelled before any worker runs; the jobs of Perstack's providers too (no model is ever asked)
    for job_id, provider in [("x-cancelled", SCRIPT), *((f"x-{p}", ("--provider", p)) for p in PROVIDERS)]:
        perq.submit("chain", "never run", *provider, "--job-id", job_id)
        assert perq.run("cancel", job_id).returncode == 0
    try:
        perq.start_worker()
        jobs = {
            "x-chain": ("chain", "start"),
            "x-parallel": ("coord", "ask both"),
            "x-mixed": ("asker", "start"),
            "x-waiting": ("asker", "start"),
            "x-maxsteps": ("looper", "loop"),
            "x-retry": ("retrier", "go"),
            "x-error": ("broken", "go"),
            "x-thinking": ("thinker", "think"),
            "x-mcp": ("clock", "noon UTC in Tokyo?"),
        }
        for job_id, (expert, query) in jobs.items():
            extra = ("--max-steps", "3") if expert == "looper" else ()
            perq.submit(expert, query, *SCRIPT, "--job-id", job_id, *extra)
        for job_id in jobs:
            perq.wait_job(job_id)
        answered = perq.run("run", "asker", "yes", "--continue-job", "x-mixed", "-i", *SCRIPT, "--wait")
        assert answered.returncode == 0, answered.stderr
        perq.wait_job("x-cancelled")
    finally:
        perq.stop_workers()
    perq.submit("chain", "never run", *SCRIPT, "--job-id", "x-queued")  # no worker left to take it
    out = root / "export"
    result = perq.run("export", "--all", "--to", str(out))
    assert result.returncode == 0, result.stderr
    assert not result.stderr
    yield perq, out


def load(path: Path) -> Any:
    return json.loads(path.read_text())


def events_of(out: Path, job_id: str) -> list[dict[str, Any]]:
    """A job's exported events, run by run, each run's in the order Perstack's file names give."""
    events: list[dict[str, Any]] = []
    for run in sorted((out / "jobs" / job_id / "runs").iterdir()):
        events.extend(load(run / name) for name in event_files([p.name for p in run.iterdir()]))
    return events


def test_export_is_perstacks_layout_with_whole_events(exported: tuple[Perq, Path]) -> None:
    perq, out = exported
    statuses = {p.name: load(p / "job.json")["status"] for p in (out / "jobs").iterdir()}
    assert statuses == {
        "x-chain": "completed",
        "x-parallel": "completed",
        "x-mixed": "completed",
        "x-waiting": "stoppedByInteractiveTool",
        "x-maxsteps": "stoppedByMaxSteps",
        "x-retry": "completed",
        "x-error": "stoppedByError",
        "x-thinking": "completed",
        "x-mcp": "completed",
        "x-cancelled": "stoppedByError",  # perq's cancelled, as Perstack can say it
        "x-queued": "running",  # perq's queued
    } | {f"x-{p}": "stoppedByError" for p in PROVIDERS}
    for job_id in statuses:
        job = out / "jobs" / job_id
        stored, _ = perq.store.list_checkpoints(job_id)
        assert sorted(p.stem for p in job.glob("checkpoints/*.json")) == sorted(c.id for c in stored)
        for cp in stored:  # whole checkpoints: the messages the store keeps once are all there
            written = load(job / "checkpoints" / f"{cp.id}.json")
            assert len(written["messages"]) == len(cp.messages) and "messagesRef" not in written
        for run in (job / "runs").iterdir():
            setting = load(run / "run-setting.json")
            assert setting["providerConfig"]["apiKey"] == "" and setting["env"] == {}
            assert {p.name for p in run.iterdir()} <= {"run-setting.json"} | {
                p.name for p in run.glob("event-*-*-*.json")
            }

    # every event the store logged for the chain is there, one file each, in the same order
    events = events_of(out, "x-chain")
    logged = [e for e in perq.events("x-chain") if not e.type.startswith("skill")]
    assert sorted((e["timestamp"], e["id"]) for e in events) == sorted((e.timestamp, e.id) for e in logged)
    for event in events:
        if "checkpoint" in event:
            assert event["checkpoint"]["messages"] and event["step"]["newMessages"]
        if event["type"] == "continueToNextStep":
            following = event["nextCheckpoint"]
            assert following["stepNumber"] == event["stepNumber"] + 1
            assert following["messages"] == event["checkpoint"]["messages"]
        if event["type"] == "callDelegate":
            assert event["toolCall"] == event["toolCalls"][0]  # both formats
        if event["type"] == "startRun" and event["expertKey"] == "level1":
            assert event["initialCheckpoint"]["delegatedBy"]["runId"]
    # startGeneration carries the conversation as the model got it: the step's start
    for job_id in ("x-chain", "x-mixed", "x-maxsteps", "x-mcp"):
        events = events_of(out, job_id)
        for i, event in enumerate(events):
            if event["type"] != "startGeneration":
                continue
            end = next(e for e in events[i:] if "checkpoint" in e and e["runId"] == event["runId"])
            sent = event["messages"]
            assert sent == end["checkpoint"]["messages"][: len(sent)]
            assert sent + end["step"]["newMessages"] == end["checkpoint"]["messages"]
            assert sent[-1]["type"] in ("userMessage", "toolMessage")


def test_export_reads_back_as_a_store(exported: tuple[Perq, Path]) -> None:
    """An export is a store perq reads: the same checkpoints and events, in the same order."""
    perq, out = exported
    env = perq.env(PERQ_STORAGE=str(out))
    for job_id in ("x-chain", "x-parallel", "x-mixed"):
        original = perq.run("log", job_id, "--json", "--take", "0")
        again = perq.run("log", job_id, "--json", "--take", "0", env=env)
        assert again.returncode == 0 and not again.stderr, again.stderr
        kept = [e for e in json.loads(original.stdout)["events"] if not e["type"].startswith("skill")]
        assert [e["type"] for e in json.loads(again.stdout)["events"]] == [e["type"] for e in kept]
        status = json.loads(perq.run("status", job_id, "--json", env=env).stdout)
        assert len(status["checkpoints"]) == len(perq.checkpoints(job_id)) and not status["problems"]


def validate(out: Path, tree: str) -> list[dict[str, Any]]:
    if not (VALIDATE.is_file() and shutil.which("node") and shutil.which("npm")):
        pytest.skip(f"Perstack's validator needs {VALIDATE} and node with npm")
    report = out.parent / f"validate-{tree}.json"
    result = subprocess.run(
        [str(VALIDATE), str(out), tree, "--quiet", "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode in (0, 1), result.stdout + result.stderr
    assert "passed," in result.stdout.splitlines()[-1]
    results: list[dict[str, Any]] = load(report)
    assert len(results) > 150  # every file was looked at
    return results


def script_run_setting(failure: dict[str, Any]) -> bool:
    """The one documented exception: the script provider is not one of Perstack's."""
    return (
        failure["kind"] == "run-setting.json"
        and failure["file"].split("/")[1] not in {f"x-{p}" for p in PROVIDERS}
        and all(i.startswith("providerConfig.providerName") for i in failure["issues"])
    )


def test_export_passes_perstacks_latest_schemas(exported: tuple[Perq, Path]) -> None:
    _, out = exported
    results = validate(out, "latest")
    failed = [r for r in results if r["ok"] is False]
    assert [f for f in failed if not script_run_setting(f)] == []
    assert failed  # the script provider's run settings are still refused: the check does look
    passed = {r["file"].split("/")[1] for r in results if r["kind"] == "run-setting.json" and r["ok"]}
    assert passed == {f"x-{p}" for p in PROVIDERS}  # a real provider's run setting passes, its key empty


def test_export_passes_perstacks_pr83_schemas_but_for_what_it_cannot_express(
    exported: tuple[Perq, Path],
) -> None:
    _, out = exported
    failed = [r for r in validate(out, "pr83") if r["ok"] is False]
    thinking = [f for f in failed if "thinkingPart" in (out / f["file"]).read_text()]
    no_such_event = [f for f in failed if f["kind"] == "event-*.json (stopRunByError)"]
    others = [f for f in failed if f not in thinking and f not in no_such_event and not script_run_setting(f)]
    assert others == []
    assert {f["file"].split("/")[1] for f in thinking} == {"x-thinking"}
    assert {f["file"].split("/")[1] for f in no_such_event} == {"x-error"}


def test_export_bad_inputs(perq: Perq) -> None:
    perq.write("perstack.toml", CONFIG)
    perq.write("script.toml", script_toml(TURNS))
    out = perq.root / "out"
    cases = [
        (("export", "--all", "--to", str(out)), "nothing to export"),  # an empty store
        (("export", "--to", str(out)), "nothing to export"),
        (("export", "nope", "--to", str(out)), "job nope not found"),
        (("export", "../x", "--to", str(out)), "invalid job id"),
        (("export", "--all"), "--to DIR is needed"),
    ]
    for args, message in cases:
        result = perq.run(*args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
    job_id = perq.submit("level2", "hi", *SCRIPT)
    perq.burst()
    a_file = perq.root / "a-file"
    a_file.write_text("")
    for args, message in [
        (("export", job_id, "--to", str(a_file)), "is a file"),
        (("export", job_id, "--to", str(perq.storage / "sub")), "inside the job store"),
        (("export", job_id, "--all", "--to", str(out)), "not both"),
        (("export", job_id, "nope", "--to", str(out)), "job nope not found"),
    ]:
        result = perq.run(*args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
    assert not out.exists()  # nothing was written by a refused export
    first = perq.run("export", job_id, "--to", str(out))
    assert first.returncode == 0 and job_id in first.stdout, first.stderr
    again = perq.run("export", job_id, "--to", str(out), "--json")  # an export again replaces the first
    assert json.loads(again.stdout)["jobs"][0]["checkpoints"] == 1
    assert [p.name for p in (out / "jobs").iterdir()] == [job_id]
