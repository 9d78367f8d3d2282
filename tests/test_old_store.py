"""A store written before checkpoints referred to a message log still lists, logs and continues.

`tests/data/store-before-message-log/` was written by perq's own runtime at the commit before the log
(every checkpoint holds its whole conversation): a completed job with a delegation (`old-done`, 5 steps)
and a job waiting on an interactive tool (`old-waiting`). No migration step runs: the new code reads the
old files as they are, and a continuation appends to the job in the new format.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from shared.models import Usage
from tests.conftest import Perq

DATA = Path(__file__).parent / "data" / "store-before-message-log"
SCRIPT = ("--provider", "script", "--model", "script.toml")


def copy_store(perq: Perq) -> None:
    shutil.copytree(DATA / "perstack", perq.storage, dirs_exist_ok=True)
    for name in ("perstack.toml", "script.toml"):
        shutil.copy(DATA / name, perq.root / name)


def test_an_old_store_lists_and_logs(perq: Perq) -> None:
    copy_store(perq)
    listing = perq.run("status")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert "planner - 5 steps (old-done)" in listing.stdout and "asker - 1 steps (old-waiting)" in lines[0]

    detail = json.loads(perq.run("status", "old-done", "--json").stdout)
    assert [c["stepNumber"] for c in detail["checkpoints"]] == [1, 2, 3, 4, 5]
    assert {c["expertKey"] for c in detail["checkpoints"]} == {"planner", "helper"}

    log = perq.run("log", "--job", "old-done", "--json")
    assert log.returncode == 0, log.stderr
    types = [e["type"] for e in json.loads(log.stdout)["events"]]
    assert (types.count("startRun"), types.count("stopRunByDelegate"), types.count("completeRun")) == (
        3,
        1,
        2,
    )
    assert types[-1] == "completeRun"

    head = perq.store.load_checkpoint("old-done", perq.job("old-done").head_checkpoint_id or "")
    assert head is not None and head.messages_ref is None and head.messages[-1].type == "expertMessage"


def test_an_old_store_continues_in_the_new_format(perq: Perq) -> None:
    copy_store(perq)
    before = perq.job("old-done")
    head = perq.store.load_checkpoint("old-done", before.head_checkpoint_id or "")
    assert head is not None
    perq.start_worker()

    again = perq.run("run", "planner", "once more", "--continue-job", "old-done", *SCRIPT, "--wait")
    assert again.returncode == 0, again.stderr
    job = perq.job("old-done")
    assert (job.status, job.total_steps) == ("completed", 6)
    assert job.usage == before.usage + Usage(input_tokens=130, output_tokens=13, total_tokens=143)
    final = perq.checkpoints("old-done")[-1]
    assert final.messages_ref is not None  # written in the new format
    assert final.messages[: len(head.messages)] == head.messages  # one history: the old one, then the new
    assert [m.type for m in final.messages[len(head.messages) :]] == ["userMessage", "expertMessage"]

    answered = perq.run("run", "asker", "yes", "--continue-job", "old-waiting", "-i", *SCRIPT, "--wait")
    assert answered.returncode == 0, answered.stderr
    waiting = perq.job("old-waiting")
    assert (waiting.status, waiting.total_steps) == ("completed", 3)  # the answer is a step of its own
    assert waiting.usage == Usage(input_tokens=70, output_tokens=7, total_tokens=77)
