"""A store written by Perstack's own runtime lists, logs and continues as it is.

`../shared/interop/perstack-written-store/` (beside the checkout, as in CI) was written by Perstack's CLI
and runtime: its events are one file each, its delegates' checkpoints name no parent run, and its job
records name no head checkpoint. Six jobs: p-hello (3 steps), p-deleg (12 steps: a chain of two delegates,
then two more), p-interactive (answered), p-waiting (waiting on askUser), p-maxsteps, p-error (stopped by
max steps after two failed generations). The tests run on a copy; continuations append to it in perq's
own format, and each job then reads as one history.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Perq, script_toml
from tests.support.configs import asker_toml

STORE = Path(__file__).resolve().parents[1].parent / "shared" / "interop" / "perstack-written-store"
pytestmark = pytest.mark.skipif(not STORE.is_dir(), reason=f"{STORE} is not there")
SCRIPT = ("--provider", "script", "--model", "script.toml")

# job -> (checkpoints, head step, events)
WRITTEN = {
    "p-hello": (3, 3, 15),
    "p-deleg": (12, 12, 50),
    "p-interactive": (3, 3, 12),
    "p-waiting": (1, 1, 5),
    "p-maxsteps": (3, 3, 16),
    "p-error": (2, 2, 7),
}

CONFIG = """
[experts.hello]
instruction = "Say hello"
[experts.coord]
instruction = "Delegate"
delegates = ["level1", "alpha", "beta"]
[experts.level1]
description = "The first level"
instruction = "Delegate to level2"
delegates = ["level2"]
[experts.level2]
description = "The second level"
instruction = "Answer"
[experts.alpha]
description = "Alpha"
instruction = "Answer"
[experts.beta]
description = "Beta"
instruction = "Answer"
[experts.looper]
instruction = "Loop"
[experts.broken]
instruction = "Fail"
""" + asker_toml()


def turns(answers: dict[int, str], n: int) -> list[dict[str, Any]]:
    """Script turns where turn k (the request after k model answers) answers with answers[k], 7 in 3 out."""
    return [
        {"text": answers.get(k, "unused"), "usage": {"inputTokens": 7, "outputTokens": 3}} for k in range(n)
    ]


def copy_store(perq: Perq) -> None:
    shutil.copytree(STORE, perq.storage, dirs_exist_ok=True)
    perq.write("perstack.toml", CONFIG)
    # Perstack's conversations hold 4 (hello, coord), 3 (asker, looper), 1 (asker waiting) and 0 (broken)
    # model answers: the next request of each is answered by that turn
    perq.write(
        "script.toml",
        script_toml(
            {
                "hello": turns({1: "branched", 4: "hello again"}, 5),
                "coord": turns({4: "coord again"}, 5),
                "asker": turns({1: "thanks", 3: "asked again"}, 4),
                "looper": turns({3: "loop done"}, 4),
                "broken": turns({0: "fixed"}, 1),
            }
        ),
    )


def status(perq: Perq, job_id: str) -> dict[str, Any]:
    result = perq.run("status", job_id, "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    assert data["problems"] == []
    return data


def log_events(perq: Perq, *args: str) -> list[dict[str, Any]]:
    result = perq.run("log", *args, "--json", "--take", "0")
    assert result.returncode == 0, result.stderr
    assert "skipped" not in result.stderr
    events: list[dict[str, Any]] = json.loads(result.stdout)["events"]
    return events


def file_order(job_id: str) -> list[tuple[int, str]]:
    """The (step, type) of each event file, in the order of the millisecond each was written."""
    names = sorted(p.name for p in (STORE / "jobs" / job_id / "runs").glob("*/event-*.json"))
    return [(int(n.split("-")[2]), n.split("-")[3].removesuffix(".json")) for n in names]


def test_a_perstack_store_lists_every_job_checkpoint_and_event(perq: Perq) -> None:
    copy_store(perq)
    listing = perq.run("status")
    assert listing.returncode == 0 and not listing.stderr, listing.stderr
    for job_id, (checkpoints, head_step, events) in WRITTEN.items():
        assert f"({job_id})" in listing.stdout
        detail = status(perq, job_id)
        assert len(detail["checkpoints"]) == checkpoints
        assert detail["job"]["headCheckpointId"] == next(
            c["id"] for c in detail["checkpoints"] if c["stepNumber"] == head_step
        )
        logged = log_events(perq, job_id)
        assert [(e["stepNumber"], e["type"]) for e in logged] == file_order(job_id)
        assert len(logged) == events
    # the delegates' checkpoints are read although they name no parent run
    deleg = status(perq, "p-deleg")["checkpoints"]
    assert [c["expertKey"] for c in deleg] == [
        "coord", "level1", "level2", "level1", "level1", "coord", "coord", "alpha", "coord", "beta", "coord",
        "coord",
    ]  # fmt: skip
    waiting = status(perq, "p-waiting")
    assert waiting["waitingFor"]["toolCall"]["toolName"] == "askUser"
    # the job given as an argument or as --job: the same events
    assert log_events(perq, "--job", "p-hello") == log_events(perq, "p-hello")
    both = perq.run("log", "p-hello", "--job", "p-deleg")
    assert both.returncode == 2 and "two jobs given" in both.stderr


def usage_of(perq: Perq, job_id: str) -> tuple[int, int, int]:
    job = perq.job(job_id)
    return job.total_steps, job.usage.input_tokens, job.usage.output_tokens


def test_a_perstack_store_continues_in_perqs_format(perq: Perq) -> None:
    copy_store(perq)
    perq.start_worker()

    def run(*args: str) -> None:
        result = perq.run("run", *args, *SCRIPT, "--wait")
        assert result.returncode == 0, result.stderr

    run("asker", "yes", "--continue-job", "p-waiting", "-i")
    assert usage_of(perq, "p-waiting") == (3, 17, 8)  # the answer is a step of its own, then the reply
    run("hello", "once more", "--continue-job", "p-hello")
    assert usage_of(perq, "p-hello") == (4, 157, 30)
    run("coord", "once more", "--continue-job", "p-deleg")
    assert usage_of(perq, "p-deleg") == (13, 297, 69)
    run("asker", "once more", "--continue-job", "p-interactive")
    assert usage_of(perq, "p-interactive") == (4, 37, 18)
    run("looper", "once more", "--continue-job", "p-maxsteps")
    assert usage_of(perq, "p-maxsteps") == (4, 37, 18)
    run("broken", "once more", "--continue")  # the latest job is p-error
    assert usage_of(perq, "p-error") == (3, 7, 3)
    for job_id in WRITTEN:
        assert perq.job(job_id).status == "completed"

    # each continued job reads as one history: Perstack's events, then the continuation's
    for job_id, (checkpoints, _, events) in WRITTEN.items():
        logged = log_events(perq, job_id)
        assert [(e["stepNumber"], e["type"]) for e in logged[:events]] == file_order(job_id)
        assert logged[events]["type"] == "startRun" and logged[-1]["type"] == "completeRun"
        steps = [e["stepNumber"] for e in logged]
        assert steps == sorted(steps)
        assert len(status(perq, job_id)["checkpoints"]) > checkpoints
    final = perq.checkpoints("p-hello")[-1]
    assert final.messages_ref is not None  # written in perq's format, on top of Perstack's conversation
    assert [m.type for m in final.messages[-2:]] == ["userMessage", "expertMessage"]
    assert len(final.messages) == 11

    # a branch from Perstack's first checkpoint of p-hello
    first = status(perq, "p-hello")["checkpoints"][0]
    assert first["stepNumber"] == 1
    run("hello", "branch", "--continue-job", "p-hello", "--resume-from", first["id"])
    assert usage_of(perq, "p-hello")[0] == 2
    head = perq.store.load_checkpoint("p-hello", perq.job("p-hello").head_checkpoint_id or "")
    assert head is not None and head.step_number == 2
    assert head.messages[-1].text == "branched"  # type: ignore[union-attr]
