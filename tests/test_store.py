"""The job store, the same tests on both backends: a local directory and S3 (a moto server on 127.0.0.1).

Then a whole job on the S3 store: `perq run` + `perq worker --burst` with PERQ_STORAGE=s3://...
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.models import (
    STEP_ENDING_EVENTS,
    Checkpoint,
    Event,
    ExpertRef,
    Job,
    MessagesRef,
    ProviderConfig,
    RunInput,
    RunSetting,
    TextPart,
    UserMessage,
    checkpoint_id,
)
from shared.store import JobStore, LocalBackend, StoreError
from shared.store.backend import Steps
from shared.store.s3 import S3Backend
from tests.conftest import Perq

BUCKET = "perq-test-store"
EXPERT = ExpertRef(key="e", name="e")


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    """An S3-compatible server of our own, and the environment that points perq at it."""
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "PERQ_S3_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "perq-test",
        "AWS_SECRET_ACCESS_KEY": "perq-test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        S3Backend(BUCKET).fs.mkdir(BUCKET)
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> JobStore:
    if request.param == "local":
        return JobStore.open(str(tmp_path / "perstack"))
    request.getfixturevalue("s3_env")
    return JobStore.open(f"s3://{BUCKET}/{prefix(request)}")


def prefix(request: pytest.FixtureRequest) -> str:
    """A fresh folder of the bucket per test: the test's name without its parameters, and a clock."""
    return f"{request.node.originalname}-{time.monotonic_ns()}"


def job(job_id: str, started_at: int = 1_000, status: str = "running") -> Job:
    return Job(id=job_id, status=status, coordinator_expert_key="e", started_at=started_at)  # type: ignore[arg-type]


def checkpoint(step: int, run_id: str = "r1", job_id: str = "j1") -> Checkpoint:
    return Checkpoint(
        id=f"cp{step}", job_id=job_id, run_id=run_id, status="proceeding", step_number=step, expert=EXPERT
    )


def event(type_: str, step: int, run_id: str = "r1") -> Event:
    """An event of the type with the least payload it requires: the step's checkpoint where it has one."""
    data: dict[str, Any] = {"type": type_, "jobId": "j1", "runId": run_id, "stepNumber": step}
    if type_ == "startRun":
        data["initialCheckpoint"] = checkpoint(step, run_id).to_dict()
    elif type_ in STEP_ENDING_EVENTS:
        data["checkpoint"] = checkpoint(step, run_id).to_dict()
    return Event.model_validate(data)


def test_backends_are_what_the_location_says(store: JobStore) -> None:
    where = store.backend.describe("jobs/j1/job.json")
    if isinstance(store.backend, LocalBackend):
        assert store.local_root is not None and where.endswith("/perstack/jobs/j1/job.json")
    else:
        assert isinstance(store.backend, S3Backend) and store.local_root is None
        assert where.startswith(f"s3://{BUCKET}/") and where.endswith("/jobs/j1/job.json")


def test_jobs(store: JobStore) -> None:
    assert store.load_job("j1") is None and not store.job_exists("j1")
    store.save_job(job("j1"), new=True)
    assert store.job_exists("j1")
    loaded = store.load_job("j1")
    assert loaded is not None and loaded.status == "running"
    store.save_job(job("j1", status="completed"))  # overwritten whole
    assert store.load_job("j1").status == "completed"  # type: ignore[union-attr]
    store.save_checkpoint(checkpoint(1))
    store.delete_job("j1")
    assert store.load_job("j1") is None and not store.job_exists("j1")
    assert store.list_jobs().total == 0


def test_listing_is_newest_first_with_a_limit(store: JobStore) -> None:
    for n, started in enumerate((5_000, 1_000, 9_000, 3_000, 7_000)):
        store.save_job(job(f"j{n}", started_at=started), new=True)
    listing = store.list_jobs(limit=3)
    assert [j.started_at for j in listing.jobs] == [9_000, 7_000, 5_000]
    assert listing.total == 5 and listing.problems == []
    assert [j.started_at for j in store.list_jobs().jobs] == [9_000, 7_000, 5_000, 3_000, 1_000]
    assert store.latest_job().id == "j2"  # type: ignore[union-attr]
    # a job written without an index marker (by Perstack itself) still takes its place by startedAt
    store.backend.write("jobs/perstack1/job.json", job("perstack1", started_at=8_000).to_json().encode())
    assert [j.id for j in store.list_jobs(limit=2).jobs] == ["j2", "perstack1"]
    assert store.list_jobs().total == 6


def test_checkpoints(store: JobStore) -> None:
    for step in (3, 1, 2):
        store.save_checkpoint(checkpoint(step))
    assert store.checkpoint_exists("j1", "cp2") and not store.checkpoint_exists("j1", "cp9")
    loaded = store.load_checkpoint("j1", "cp3")
    assert loaded is not None and loaded.step_number == 3 and loaded.expert.key == "e"
    assert store.load_checkpoint("j1", "cp9") is None
    checkpoints, problems = store.list_checkpoints("j1")
    assert [c.step_number for c in checkpoints] == [1, 2, 3] and problems == []


def test_run_settings_and_initial_checkpoints(store: JobStore) -> None:
    setting = RunSetting(
        model="m",
        provider_config=ProviderConfig(provider_name="script"),
        job_id="j1",
        run_id="r1",
        expert_key="e",
        input=RunInput(text="hi"),
        experts={},
        workspace="/w",
    )
    store.save_run_setting(setting)
    store.save_initial_checkpoint(checkpoint(1))
    loaded = store.load_run_setting("j1", "r1")
    assert loaded is not None and loaded.input.text == "hi"
    assert store.load_run_setting("j1", "r2") is None
    assert store.load_initial_checkpoint("j1", "r1").step_number == 1  # type: ignore[union-attr]
    store.append_events("j1", "r2", [event("startRun", 1, "r2")])
    assert sorted(store.list_runs("j1")) == ["r1", "r2"]


def test_events_append_and_read(store: JobStore) -> None:
    assert store.read_events("j1", "r1") == ([], [])
    store.append_events("j1", "r1", [event("startRun", 1), event("continueToNextStep", 1)])
    store.append_events("j1", "r1", [])  # nothing to add: nothing written
    store.append_events("j1", "r1", [event("startGeneration", 2), event("callTools", 2)])
    events, problems = store.read_events("j1", "r1")
    assert [e.type for e in events] == ["startRun", "continueToNextStep", "startGeneration", "callTools"]
    assert problems == []
    assert store.list_runs("j1") == ["r1"]
    assert store.backend.list("jobs/j1/runs/r1") == ["events.jsonl"]  # one file, whatever the backend


def test_only_the_committed_attempts_events_are_read(store: JobStore) -> None:
    """Two attempts of step 2 (one crashed, or paused past its lease): each appends its events under its
    token before its commit; exactly one commit wins, and readers see only the winner's events."""
    store.append_events("j1", "r1", [event("startRun", 1)])
    first = checkpoint(1)
    first.id = checkpoint_id("r1", 1)
    assert store.commit_checkpoint(first, "t1")
    store.append_step_events("j1", "r1", 1, [event("continueToNextStep", 1).to_json()], "t1")
    for token in ("dead", "loser", "winner"):
        lines = [event("startGeneration", 2).to_json(), event("completeRun", 2).to_json()]
        store.append_step_events("j1", "r1", 2, lines, token)
    step2 = checkpoint(2)
    step2.id = checkpoint_id("r1", 2)
    assert store.commit_checkpoint(step2.model_copy(), "winner")
    assert not store.commit_checkpoint(step2.model_copy(), "loser")  # create-only: the name is taken
    assert store.load_checkpoint("j1", step2.id).commit == "winner"  # type: ignore[union-attr]
    store.append_step_events("j1", "r1", 3, [event("startGeneration", 3).to_json()], "in-flight")
    events, _ = store.read_events("j1", "r1")
    assert [(e.step_number, e.type) for e in events] == [
        (1, "startRun"),
        (1, "continueToNextStep"),
        (2, "startGeneration"),
        (2, "completeRun"),
    ]  # step 3 has no checkpoint yet: its events are not the store's until it commits


def said(text: str) -> UserMessage:
    return UserMessage(contents=[TextPart(text=text)])


def texts(cp: Checkpoint | None) -> list[str]:
    assert cp is not None
    return [m.contents[0].text for m in cp.messages]  # type: ignore[union-attr]


def test_messages_are_stored_once_and_read_whole(store: JobStore) -> None:
    cp = checkpoint(1)
    cp.messages = [said("a"), said("b")]
    assert store.commit_checkpoint(cp, "t1")
    step2 = cp.model_copy(update={"id": "cp2", "step_number": 2})
    step2.messages = [*step2.messages, said("c")]
    assert store.commit_checkpoint(step2, "t2")
    assert texts(store.load_checkpoint("j1", "cp2")) == ["a", "b", "c"]
    assert texts(store.load_checkpoint("j1", "cp1")) == ["a", "b"]
    assert store.load_checkpoint("j1", "cp2", messages=False).messages == []  # type: ignore[union-attr]
    # the files hold refs, the log holds each message once
    stored = json.loads(store.backend.read("jobs/j1/checkpoints/cp2.json") or b"")
    assert "messages" not in stored and stored["messagesRef"] == {"runId": "r1", "token": "t2", "count": 3}
    log = (store.backend.read("jobs/j1/runs/r1/messages.jsonl") or b"").decode()
    assert [log.count(f'"text":"{t}"') for t in "abc"] == [1, 1, 1]

    # a continuation (run r2) refers to its base instead of copying it
    initial = step2.model_copy(update={"id": "cp3", "run_id": "r2", "step_number": 3})
    store.save_initial_checkpoint(initial)
    assert not store.backend.read("jobs/j1/runs/r2/messages.jsonl")  # laid out empty (local), or none (S3)
    assert texts(store.load_initial_checkpoint("j1", "r2")) == ["a", "b", "c"]
    step3 = initial.model_copy()
    step3.messages = [*step3.messages, said("d")]
    assert store.commit_checkpoint(step3, "t3")
    assert texts(store.load_checkpoint("j1", "cp3")) == ["a", "b", "c", "d"]
    checkpoints, problems = store.list_checkpoints("j1")
    assert [texts(c) for c in checkpoints] == [["a", "b"], ["a", "b", "c"], ["a", "b", "c", "d"]]
    assert problems == []


def test_checkpoints_with_inline_messages_load_and_continue(store: JobStore) -> None:
    """Stores written before the message log (and Perstack's) hold the whole conversation in each file."""
    old = checkpoint(1)
    old.messages = [said("a"), said("b")]
    store.backend.write("jobs/j1/checkpoints/cp1.json", old.to_json().encode())
    loaded = store.load_checkpoint("j1", "cp1")
    assert texts(loaded) == ["a", "b"] and loaded.messages_ref is None  # type: ignore[union-attr]
    # going on from it: the new run's log starts with the whole base conversation, once
    nxt = old.model_copy(update={"id": "cp2", "run_id": "r2", "step_number": 2})
    nxt.messages = [*nxt.messages, said("c")]
    assert store.commit_checkpoint(nxt, "t1")
    assert texts(store.load_checkpoint("j1", "cp2")) == ["a", "b", "c"]


def test_a_torn_log_tail_is_ignored_and_a_missing_chunk_named(store: JobStore) -> None:
    cp = checkpoint(1)
    cp.messages = [said("a")]
    assert store.commit_checkpoint(cp, "t1")
    store.backend.append("jobs/j1/runs/r1/messages.jsonl", b'{"token": "t2", "prev": nul', 2)
    assert texts(store.load_checkpoint("j1", "cp1")) == ["a"]
    # the step runs again after the crash that cut the line short: its chunk must not be glued to it
    again = cp.model_copy(update={"id": "cp1b", "step_number": 2})
    again.messages = [*again.messages, said("b")]
    assert store.commit_checkpoint(again, "t3", [event("completeRun", 2).to_json()])
    assert texts(store.load_checkpoint("j1", "cp1b")) == ["a", "b"]
    broken = checkpoint(2)
    broken.messages_ref = MessagesRef(run_id="r1", token="gone", count=2)
    store.backend.write("jobs/j1/checkpoints/cp2.json", broken.to_json().encode())
    with pytest.raises(StoreError, match="chunk gone is missing"):
        store.load_checkpoint("j1", "cp2")
    checkpoints, problems = store.list_checkpoints("j1")
    assert [c.id for c in checkpoints] == ["cp1", "cp1b"] and "chunk gone is missing" in problems[0]


def test_fan_in_results(store: JobStore) -> None:
    store.save_fan_in_result("j1", "cp1", "call/with:odd chars", b"one")
    store.save_fan_in_result("j1", "cp1", "call2", b"two")
    assert sorted(store.load_fan_in_results("j1", "cp1")) == [b"one", b"two"]


def test_damaged_files_are_named(store: JobStore) -> None:
    store.save_job(job("j1"), new=True)
    store.save_job(job("j2", started_at=2_000), new=True)
    store.backend.write("jobs/j2/job.json", b"{not json")
    with pytest.raises(StoreError, match=r"damaged file .*jobs/j2/job\.json"):
        store.load_job("j2")
    listing = store.list_jobs()
    assert [j.id for j in listing.jobs] == ["j1"]
    assert len(listing.problems) == 1 and "jobs/j2/job.json" in listing.problems[0]

    store.save_checkpoint(checkpoint(1))
    store.backend.write("jobs/j1/checkpoints/cp2.json", b'{"id": "cp2"}')
    checkpoints, problems = store.list_checkpoints("j1")
    assert [c.id for c in checkpoints] == ["cp1"]
    assert len(problems) == 1 and "jobs/j1/checkpoints/cp2.json" in problems[0]

    store.append_events("j1", "r1", [event("startRun", 1)])
    store.backend.append("jobs/j1/runs/r1/events.jsonl", b"garbage\n", 1)  # in step 1
    store.append_events("j1", "r1", [event("completeRun", 1)])
    events, problems = store.read_events("j1", "r1")
    assert [e.type for e in events] == ["startRun", "completeRun"]
    assert problems == [f"damaged line 2 in {store.backend.describe('jobs/j1/runs/r1/events.jsonl')}"]


@pytest.mark.parametrize("bad", ["../escape", "a/b", "", ".hidden", "x" * 200, "a b"])
def test_ids_are_validated(store: JobStore, bad: str) -> None:
    with pytest.raises(ValueError, match="invalid"):
        store.load_job(bad)
    with pytest.raises(ValueError, match="invalid"):
        store.load_checkpoint("j1", bad)
    with pytest.raises(ValueError, match="invalid"):
        store.read_events("j1", bad)
    with pytest.raises(ValueError, match="invalid"):
        store.save_checkpoint(checkpoint(1, job_id=bad))


# --- S3 only: logs made of segments ------------------------------------------------------------------


@pytest.fixture
def s3(s3_env: dict[str, str], request: pytest.FixtureRequest) -> S3Backend:
    return S3Backend(BUCKET, prefix(request))


def test_s3_log_survives_two_writers(s3: S3Backend) -> None:
    """If the single-writer rule were ever broken, appends would still all be kept (none overwrites)."""
    key = "jobs/j1/runs/r1/events.jsonl"

    def writer(tag: str) -> None:
        for n in range(5):
            s3.append(key, f"{tag}{n}\n".encode())

    threads = [threading.Thread(target=writer, args=(tag,)) for tag in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = (s3.read(key) or b"").decode().split()
    assert sorted(lines) == sorted(f"{t}{n}" for t in "ab" for n in range(5))
    assert [x for x in lines if x[0] == "a"] == [f"a{n}" for n in range(5)]  # each writer's order holds


def test_s3_log_reads_a_copied_local_file(s3: S3Backend) -> None:
    key = "jobs/j1/runs/r1/events.jsonl"
    s3.fs.pipe_file(s3._path(key), b"old1\nold2\n")  # a local store copied to the bucket as it is
    assert s3.read(key) == b"old1\nold2\n"
    s3.append(key, b"new\n")
    assert s3.read(key) == b"old1\nold2\nnew\n"
    with pytest.raises(ValueError, match="append-only"):
        s3.write(key, b"only\n")
    with pytest.raises(ValueError, match=r"only \.jsonl logs"):
        s3.append("jobs/j1/job.json", b"{}")
    s3.delete_tree(key)
    assert s3.read(key) is None


def test_s3_store_url_forms(s3_env: dict[str, str]) -> None:
    assert S3Backend.from_url("s3://bucket").describe("x") == "s3://bucket/x"
    assert S3Backend.from_url("s3://bucket/a/b/").describe("jobs") == "s3://bucket/a/b/jobs"
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        S3Backend.from_url("s3:///nobucket")
    with pytest.raises(ValueError, match="no"):
        S3Backend.from_url("s3://bucket/runs[1]")


# --- a whole job on the S3 store ------------------------------------------------------------------


HELLO = """
[[experts.hello.turns]]
toolCalls = [{ toolName = "todo", args = { newTodos = ["say hello"] } }]
usage = { inputTokens = 120, outputTokens = 12 }
[[experts.hello.turns]]
toolCalls = [{ toolName = "todo", args = { completedTodos = [0] } }]
[[experts.hello.turns]]
toolCalls = [{ toolName = "attemptCompletion", args = {} }]
[[experts.hello.turns]]
text = "Hello from S3"
"""


def test_a_job_runs_end_to_end_on_the_s3_store(perq: Perq, s3_env: dict[str, str]) -> None:
    url = f"s3://{BUCKET}/e2e-{time.monotonic_ns()}"
    env = perq.env(PERQ_STORAGE=url, COLUMNS="200", **s3_env)
    perq.write("perstack.toml", '[experts.hello]\ninstruction = "Say hello"\n')
    perq.write("script.toml", HELLO)
    submitted = perq.run(
        "run", "hello", "Say hello", "--provider", "script", "--model", "script.toml", env=env
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    perq.burst(PERQ_STORAGE=url, **s3_env)

    store = JobStore.open(url)
    final = store.load_job(job_id)
    assert final is not None and final.status == "completed" and final.total_steps == 3
    checkpoints, problems = store.list_checkpoints(job_id)
    assert [c.step_number for c in checkpoints] == [1, 2, 3] and problems == []
    assert final.head_checkpoint_id == checkpoints[-1].id
    (run_id,) = store.list_runs(job_id)
    events, problems = store.read_events(job_id, run_id)
    assert events[0].type == "startRun" and events[-1].type == "completeRun" and problems == []
    assert not any((perq.root / "perstack").iterdir())  # nothing went to the local directory

    status = perq.run("status", job_id, "--json", env=env)
    assert json.loads(status.stdout)["job"]["status"] == "completed"
    log = perq.run("log", "--job", job_id, "--type", "completeRun", env=env)
    assert "Result: Hello from S3" in log.stdout and f"Storage: {url}" in log.stdout


def test_a_worker_on_a_distant_s3_store_completes_every_job_exactly(
    perq: Perq, s3_env: dict[str, str]
) -> None:
    """Every request to the store waits 25 ms (a relay in front of the S3 server): the worker's concurrent
    steps run their store calls side by side, and each job still completes exactly (the figure for the
    time this takes is `./dev bench --only s3`)."""
    from bench.slow_relay import DelayRelay

    url = f"s3://{BUCKET}/slow-{time.monotonic_ns()}"
    host, port = s3_env["PERQ_S3_ENDPOINT_URL"].removeprefix("http://").split(":")
    perq.write("perstack.toml", '[experts.hello]\ninstruction = "Say hello"\n')
    perq.write("script.toml", HELLO)
    env = perq.env(PERQ_STORAGE=url, **s3_env)
    job_ids = []
    for _ in range(6):
        submitted = perq.run("run", "hello", "hi", "--provider", "script", "--model", "script.toml", env=env)
        assert submitted.returncode == 0, submitted.stderr
        job_ids.append(submitted.stdout.strip().splitlines()[-1])
    with DelayRelay(host, int(port), 0.025) as relay:
        perq.burst(PERQ_STORAGE=url, **(s3_env | {"PERQ_S3_ENDPOINT_URL": relay.url}))
        assert relay.requests > 6 * 3 * 4  # the worker's store calls all went through the relay
    store = JobStore.open(url)
    for job_id in job_ids:
        final = store.load_job(job_id)
        assert final is not None and (final.status, final.total_steps) == ("completed", 3)
        assert (final.usage.input_tokens, final.usage.output_tokens) == (150, 27)
        checkpoints, problems = store.list_checkpoints(job_id)
        assert [c.step_number for c in checkpoints] == [1, 2, 3] and problems == []
        assert checkpoints[-1].messages[-1].contents[-1].text == "Hello from S3"  # type: ignore[union-attr]


def test_group_flush_serves_every_caller_and_a_failed_flush_serves_none(tmp_path: Path) -> None:
    from shared.store import flush

    group = flush.GroupFlush(tmp_path)
    calls: list[int] = []
    real = group._syncfs

    def counted() -> None:
        calls.append(1)
        time.sleep(0.01)  # long enough for callers to queue up behind a running flush
        real()

    group._syncfs = counted  # type: ignore[method-assign]
    threads = [threading.Thread(target=group.flush) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    if group.grouped:
        assert 1 <= len(calls) < 40  # callers that came during a flush shared the next one

        def failing() -> None:
            raise OSError(5, "disk gone")

        group._syncfs = failing  # type: ignore[method-assign]
        with pytest.raises(OSError, match="disk gone"):
            group.flush()
        assert group._done < group._asked  # the failed ask is not counted as flushed


def test_local_store_without_syncfs_flushes_each_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.store import flush

    monkeypatch.setattr(flush, "_SYNCFS", None)
    store = JobStore.open(str(tmp_path / "perstack"))
    cp = checkpoint(1)
    cp.messages = [said("a")]
    assert store.commit_checkpoint(cp, "t1", [event("startRun", 1).to_json()])
    assert not store.commit_checkpoint(cp.model_copy(), "t2")
    assert texts(store.load_checkpoint("j1", "cp1")) == ["a"]


def _commit_then_record(store: JobStore, composed: bool, status: str = "running") -> None:
    """A step's writes: its commit, then its job record; `composed`: as the worker makes them, one sequence
    of steps whose commit name may wait for the record's data flush."""
    cp = checkpoint(1)
    cp.messages = [said("a")]
    lines = [event("startRun", 1).to_json()]
    record = job("j1", status=status)

    def steps() -> Steps[None]:
        assert (yield from store.commit_checkpoint_steps(cp, "t1", lines))
        yield from store.update_job_steps("j1", lambda _job: record)

    if composed:
        store.backend.run(steps())
    else:
        assert store.commit_checkpoint(cp, "t1", lines)
        store.update_job("j1", lambda _job: record)


def _record_names(monkeypatch: pytest.MonkeyPatch, done: list[str]) -> None:
    """Note each name the local store makes: link (a commit), exchange or rename (a record)."""
    from shared.store import local

    real_link, real_rename, real_exchange = os.link, os.rename, local._exchange
    # noted once made: a swap with no file to swap with fails, and a rename takes its place
    monkeypatch.setattr(os, "link", lambda a, b: (real_link(a, b), done.append("link"))[0])
    monkeypatch.setattr(os, "rename", lambda a, b: (real_rename(a, b), done.append("name"))[0])
    monkeypatch.setattr(local, "_exchange", lambda a, b: (real_exchange(a, b), done.append("name"))[0])


def test_a_commit_name_waits_for_the_records_data_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Composed, the commit's name waits for the job record's data flush: one flush fewer, and each name is
    on the disk before the next name is made (here: the checkpoint's before the record's)."""
    from shared.store import flush

    if flush._SYNCFS is None:
        pytest.skip("no syncfs here")
    done: list[str] = []
    monkeypatch.setattr(flush.GroupFlush, "_syncfs", lambda self: done.append("flush"))
    _record_names(monkeypatch, done)
    for composed in (False, True):
        store = JobStore.open(str(tmp_path / f"composed-{composed}"))
        store.save_job(job("j1", status="queued"), new=True)
        done.clear()
        _commit_then_record(store, composed)
        if composed:
            assert done == ["flush", "link", "flush", "name", "flush"]
        else:
            assert done == ["flush", "link", "flush", "flush", "name", "flush"]


def test_names_that_wait_without_syncfs_flush_their_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without syncfs, the waiting folders are flushed before the next file's data, and at the steps' end."""
    from shared.store import flush

    monkeypatch.setattr(flush, "_SYNCFS", None)
    flushed: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    store = JobStore.open(str(tmp_path / "perstack"))
    store.save_job(job("j1", status="queued"), new=True)
    monkeypatch.setattr(os, "fsync", fsync)
    _commit_then_record(store, composed=True)
    folder = str(tmp_path / "perstack" / "jobs" / "j1")
    checkpoints = flushed.index(f"{folder}/checkpoints")
    record_data = next(i for i, f in enumerate(flushed) if f.startswith(f"{folder}/.job.json."))
    assert checkpoints < record_data  # the checkpoint's name, before the record's data and name
    assert flushed[-1] == folder  # the record's name, last
    assert texts(store.load_checkpoint("j1", "cp1")) == ["a"] and store.load_job("j1") == job("j1")


def test_a_names_wait_ends_before_a_removal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job's last record removes its unfinished marker: the names made before (the commit's, the
    record's) reach the disk before the marker goes, or a power loss could keep the removal and lose the
    final record (the job would stay running, unknown to reconciliation)."""
    from shared.store import flush

    monkeypatch.setattr(flush, "_SYNCFS", None)  # per-folder flushes, whose order shows
    store = JobStore.open(str(tmp_path / "perstack"))
    store.save_job(job("j1", status="queued"), new=True)
    done: list[str] = []
    real_fsync, real_unlink = os.fsync, os.unlink
    monkeypatch.setattr(
        os, "fsync", lambda fd: (done.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1]
    )
    monkeypatch.setattr(os, "unlink", lambda p: (done.append(f"unlink {p}"), real_unlink(p))[1])
    _commit_then_record(store, composed=True, status="completed")
    folder = str(tmp_path / "perstack" / "jobs" / "j1")
    marker = next(i for i, d in enumerate(done) if d.startswith("unlink") and "unfinished" in d)
    assert f"{folder}/checkpoints" in done[:marker] and folder in done[:marker]
    assert store.list_unfinished() == [] and store.load_job("j1") == job("j1", status="completed")


def test_a_record_rewrite_frees_no_inode(tmp_path: Path) -> None:
    """The job record's versions swap names with a spare beside it: the store keeps reusing two files
    (no inode freed per rewrite), readers and listings never see the spare, and the latest version reads."""
    from shared.store import local

    if local._RENAMEAT2 is None:
        pytest.skip("no renameat2 here")
    store = JobStore.open(str(tmp_path / "perstack"))
    store.save_job(job("j1", status="queued"), new=True)
    record = tmp_path / "perstack" / "jobs" / "j1" / "job.json"
    inodes = set()
    for steps in range(1, 6):
        store.update_job(
            "j1", lambda j, n=steps: j.model_copy(update={"status": "running", "total_steps": n})
        )
        inodes.add(record.stat().st_ino)
        loaded = store.load_job("j1")
        assert loaded is not None and loaded.total_steps == steps
    assert len(inodes) == 2  # the first version and one spare, taking turns
    assert (record.parent / ".job.json.spare").exists()
    assert ".job.json.spare" not in store.backend.list("jobs/j1")
    assert [j.id for j in store.list_jobs().jobs] == ["j1"]


def test_a_steps_commit_and_record_create_only_its_checkpoint(tmp_path: Path) -> None:
    """A job's folders, its run's logs and its record's spare are laid out when it is submitted: its first
    step creates one file, its checkpoint (file creation is what a recent removal makes slow on ext4)."""
    store = JobStore.open(str(tmp_path / "perstack"))
    store.save_job(job("j1", status="queued"), new=True)
    store.save_initial_checkpoint(checkpoint(0).model_copy(update={"status": "init"}))
    root = tmp_path / "perstack"

    def files() -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*")}

    before = files()
    assert {"jobs/j1/checkpoints", "jobs/j1/.job.json.spare", "jobs/j1/runs/r1/events.jsonl"} <= before
    _commit_then_record(store, composed=True)
    assert files() - before == {"jobs/j1/checkpoints/cp1.json"}
    assert b'"startRun"' in (store.backend.read("jobs/j1/runs/r1/events.jsonl") or b"")
    assert texts(store.load_checkpoint("j1", "cp1")) == ["a"] and store.load_job("j1") == job("j1")
    # a store laid out before (or by another writer) without them: the step makes them as it goes
    other = JobStore.open(str(tmp_path / "bare"))
    other.backend.write("jobs/j1/job.json", job("j1", status="queued").model_dump_json().encode())
    _commit_then_record(other, composed=True)
    assert texts(other.load_checkpoint("j1", "cp1")) == ["a"] and other.load_job("j1") == job("j1")


def test_what_is_laid_out_is_flushed_where_no_syncfs_covers_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without syncfs each folder is flushed on its own: the folders a job's lay-out makes (the job's, its
    checkpoints folder) have their entries flushed."""
    from shared.store import flush

    monkeypatch.setattr(flush, "_SYNCFS", None)
    store = JobStore.open(str(tmp_path / "perstack"))
    flushed: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: (flushed.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1]
    )
    store.save_job(job("j1", status="queued"), new=True)
    root = str(tmp_path / "perstack")
    assert {f"{root}/jobs", f"{root}/jobs/j1"} <= set(flushed)
    assert (tmp_path / "perstack" / "jobs" / "j1" / "checkpoints").is_dir()


def test_a_laid_out_spare_is_private_and_the_record_keeps_its_mode(tmp_path: Path) -> None:
    from shared.store import local

    if local._RENAMEAT2 is None or not LocalBackend(tmp_path).flushes_shared:
        pytest.skip("no swaps here")
    store = JobStore.open(str(tmp_path / "perstack"))
    store.save_job(job("j1", status="queued"), new=True)
    record = tmp_path / "perstack" / "jobs" / "j1" / "job.json"
    modes = {record.stat().st_mode & 0o777}
    for n in range(3):
        store.update_job("j1", lambda j, n=n: j.model_copy(update={"status": "running", "total_steps": n}))
        modes.add(record.stat().st_mode & 0o777)
    assert modes == {0o600}


def test_index_markers_neither_allocate_nor_free_an_inode(tmp_path: Path) -> None:
    """The store's index entries are hard links to one empty file per folder: a job marked unfinished and
    then finished leaves no freed inode behind, and listings never show the shared file."""
    store = JobStore.open(str(tmp_path / "perstack"))
    for n in range(3):
        store.save_job(job(f"j{n}", started_at=1_000 + n, status="queued"), new=True)
    root = tmp_path / "perstack"
    shared = os.stat(root / "unfinished" / ".mark")
    assert {os.stat(root / "unfinished" / f"j{n}").st_ino for n in range(3)} == {shared.st_ino}
    assert shared.st_nlink == 4 and os.stat(root / "index" / ".mark").st_nlink == 4
    store.save_job(job("j1", status="completed"))
    assert os.stat(root / "unfinished" / ".mark").st_nlink == 3  # the marker went; its inode stays
    assert store.list_unfinished() == ["j0", "j2"]
    assert [j.id for j in store.list_jobs().jobs] == ["j2", "j1", "j0"]


def test_a_marks_shared_file_at_its_link_limit_starts_anew_and_without_links_marks_are_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = LocalBackend(tmp_path)
    backend.mark("index/a")
    first = os.stat(tmp_path / "index" / ".mark").st_ino
    real_link = os.link
    full = {first}

    def link(src: str, dst: str) -> None:
        if os.stat(src).st_ino in full:
            raise OSError(errno.EMLINK, "Too many links")
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link)
    backend.mark("index/b")
    b = os.stat(tmp_path / "index" / "b")
    assert b.st_ino != first and b.st_ino == os.stat(tmp_path / "index" / ".mark").st_ino
    assert os.stat(tmp_path / "index" / "a").st_ino == first  # the old marks keep their file

    def no_links(src: str, dst: str) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    backend.mark("index/c")
    assert os.stat(tmp_path / "index" / "c").st_nlink == 1 and (tmp_path / "index" / "c").read_bytes() == b""
    backend.mark("index/c")  # marked twice: still marked
    assert sorted(backend.list("index")) == ["a", "b", "c"]


def test_a_spare_is_overwritten_only_once_its_swap_is_on_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spare was the record until the last swap: where no flush is known to have covered that swap (a
    writer interrupted before its flush, in any process), the names are flushed before the spare changes."""
    from shared.store import flush, local

    if flush._SYNCFS is None or local._RENAMEAT2 is None:
        pytest.skip("no syncfs or renameat2 here")
    store = JobStore.open(str(tmp_path / "perstack"))
    store.save_job(job("j1", status="queued"), new=True)
    store.update_job("j1", lambda j: j.model_copy(update={"status": "running"}))  # a spare exists now
    done: list[str] = []
    real_write = os.write
    monkeypatch.setattr(flush.GroupFlush, "_syncfs", lambda self: done.append("flush"))
    monkeypatch.setattr(os, "write", lambda fd, data: (done.append("write"), real_write(fd, data))[1])
    for covered in (True, False):
        monkeypatch.setattr(flush.GroupFlush, "covers", lambda self, ns, c=covered: c)
        done.clear()
        store.update_job("j1", lambda j: j.model_copy(update={"total_steps": j.total_steps + 1}))
        assert done == (["write", "flush", "flush"] if covered else ["flush", "write", "flush", "flush"])
    final = store.load_job("j1")
    assert final is not None and final.total_steps == 2


def test_a_flush_covers_what_changed_before_it_started(tmp_path: Path) -> None:
    from shared.store import flush

    group = flush.GroupFlush(tmp_path)
    if not group.grouped:
        pytest.skip("no syncfs here")
    before = time.time_ns() - 10 * flush._STAMP_SLACK_NS
    assert not group.covers(before)  # no flush yet
    group.flush()
    assert group.covers(before)
    assert not group.covers(time.time_ns())  # after the flush began: not covered


def test_a_reader_waits_for_a_rewrite_in_progress_and_reads_past_a_stopped_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load_job reads under the record's lock, shared: never a spare that a rewrite is changing. A lock
    held past the wait (a writer stopped by SIGSTOP) is read past rather than hanging the reader."""
    from shared.store import local

    store = JobStore.open(str(tmp_path / "perstack"))
    store.save_job(job("j1", status="queued"), new=True)
    backend = store.backend
    assert isinstance(backend, LocalBackend)
    holding = backend.lock_steps("jobs/j1/job.json")
    lock = backend.run(holding)  # a writer, mid-update
    read: list[Job | None] = []
    reader = threading.Thread(target=lambda: read.append(store.load_job("j1")))
    reader.start()
    time.sleep(0.2)
    assert read == []  # waiting for the writer
    backend.unlock(lock)
    reader.join(5)
    assert [j.status for j in read if j is not None] == ["queued"]
    monkeypatch.setattr(local, "_SHARED_WAIT_S", 0.1)
    lock = backend.run(backend.lock_steps("jobs/j1/job.json"))
    try:
        started = time.monotonic()
        loaded = store.load_job("j1")
        assert loaded is not None and time.monotonic() - started < 2
    finally:
        backend.unlock(lock)


def _stopped_update(
    store: JobStore, change: Any
) -> tuple[threading.Thread, threading.Event, list[BaseException]]:
    """An update of j1's record in a thread that stops, the record read and its lock held, until let go
    (the event returned); what it raised lands in the list."""
    read, go = threading.Event(), threading.Event()
    raised: list[BaseException] = []

    def stopping(j: Job) -> Job | None:
        if not read.is_set():  # the first look only: looked at again, it goes straight on
            read.set()
            assert go.wait(10)
        return change(j)  # type: ignore[no-any-return]

    def update() -> None:
        try:
            store.update_job("j1", stopping)
        except BaseException as e:
            raised.append(e)

    writer = threading.Thread(target=update)
    writer.start()
    assert read.wait(5)
    return writer, go, raised


def _record_store(tmp_path: Path) -> JobStore:
    store = JobStore.open(str(tmp_path / "perstack"))
    store.save_job(job("j1", status="queued"), new=True)
    return store


def _steps(j: Job, n: int, **update: Any) -> Job:
    return j.model_copy(update={"total_steps": n, **update})


@pytest.mark.parametrize("holder", ["refused", "builds", "raises"])
def test_a_lock_held_too_long_is_written_past_and_its_holder_never_writes_over_what_was_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, holder: str
) -> None:
    """A writer stopped holding the record's lock (SIGSTOP) must not stall the others: they write past it
    after `_WRITE_PAST_S`. Woken, the holder finds the record is not what it read: it makes its change
    again on what was written, which the rules may refuse (None) or reject (an error, as `perq cancel` on a
    job that moved on), and never writes its first version over it."""
    from shared.store import local

    monkeypatch.setattr(local, "_WRITE_PAST_S", 0.2)
    store = _record_store(tmp_path)

    def holders_change(j: Job) -> Job | None:
        if j.status == "completed" and holder == "refused":
            return None
        if j.status == "completed" and holder == "raises":
            raise ValueError("the job moved on")
        return _steps(j, j.total_steps + 1)

    writer, go, raised = _stopped_update(store, holders_change)
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="perq.store"):
        done = store.update_job("j1", lambda j: _steps(j, 5, status="completed"))
        assert done is not None and done.total_steps == 5
        assert time.monotonic() - started >= 0.2
        loaded = store.load_job("j1")
        assert loaded is not None and (loaded.status, loaded.total_steps) == ("completed", 5)
        go.set()
        writer.join(10)
    assert not writer.is_alive()
    assert [str(e) for e in raised] == (["the job moved on"] if holder == "raises" else [])
    final = store.load_job("j1")
    assert final is not None and (final.status, final.total_steps) == (
        "completed",
        6 if holder == "builds" else 5,
    )
    assert "writing past it" in caplog.text and "changed while it was being updated" in caplog.text
    folder = tmp_path / "perstack" / "jobs" / "j1"
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == [".job.json.spare"]
    # and the lock is free again: the next update neither waits nor writes past it
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="perq.store"):
        store.update_job("j1", lambda j: _steps(j, 7))
    assert caplog.text == ""


def test_a_writer_past_the_lock_waits_for_the_holders_check_and_swap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder checks that the record is what it read and swaps it in under a lock of the record file
    itself, which is never written past: a writer past the folder's lock cannot swap between the two, and
    makes its change on what the holder swapped in (no update lost)."""
    from shared.store import flush, local

    if flush._SYNCFS is None or local._RENAMEAT2 is None:
        pytest.skip("no syncfs or renameat2 here: the holder does not swap")
    monkeypatch.setattr(local, "_WRITE_PAST_S", 0.2)
    store = _record_store(tmp_path)
    swapping, go = threading.Event(), threading.Event()
    real_exchange = local._exchange

    def stopped_in_its_swap(a: str, b: str) -> None:  # only the holder swaps: a writer past it replaces
        swapping.set()
        assert go.wait(10)
        real_exchange(a, b)

    monkeypatch.setattr(local, "_exchange", stopped_in_its_swap)
    holder = threading.Thread(target=lambda: store.update_job("j1", lambda j: _steps(j, j.total_steps + 1)))
    holder.start()
    assert swapping.wait(5)
    done: list[Job | None] = []
    past = threading.Thread(
        target=lambda: done.append(store.update_job("j1", lambda j: _steps(j, j.total_steps + 10)))
    )
    past.start()
    backend = store.backend
    assert isinstance(backend, LocalBackend)
    deadline = time.monotonic() + 10
    while not backend._stuck and time.monotonic() < deadline:  # past the folder's lock (0.2 s)...
        time.sleep(0.01)
    assert list(backend._stuck) == [str(tmp_path / "perstack" / "jobs" / "j1")]
    past.join(0.2)
    assert past.is_alive() and done == []  # ...and waiting for the record file's
    go.set()
    holder.join(5)
    past.join(5)
    final = store.load_job("j1")
    assert [j.total_steps for j in done if j] == [11]
    assert final is not None and final.total_steps == 11


def test_a_stuck_lock_is_written_past_sooner_by_later_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each write of a job whose record's lock is stuck would wait `_WRITE_PAST_S`: once it was found stuck,
    this process's later writes wait only `_STUCK_GRACE_S`, until it takes the lock again."""
    from shared.store import local

    monkeypatch.setattr(local, "_WRITE_PAST_S", 0.2)
    monkeypatch.setattr(local, "_STUCK_GRACE_S", 0.0)
    store = _record_store(tmp_path)
    writer, go, raised = _stopped_update(store, lambda j: _steps(j, j.total_steps + 1))
    waits: list[float] = []
    real_sleep = time.sleep
    monkeypatch.setattr(local.time, "sleep", lambda s: (waits.append(s), real_sleep(s))[1])
    try:
        store.update_job("j1", lambda j: _steps(j, 2))
        assert len(waits) > 1  # the first write waited
        waits.clear()
        store.update_job("j1", lambda j: _steps(j, 3))
        assert len(waits) == 1  # the second looked once more
    finally:
        go.set()
        writer.join(10)
    assert raised == [] and not writer.is_alive()
    final = store.load_job("j1")
    assert final is not None and final.total_steps == 4  # the holder's change, made on what was written
    backend = store.backend
    assert isinstance(backend, LocalBackend) and backend._stuck
    store.update_job("j1", lambda j: _steps(j, 5))
    assert not backend._stuck  # the holder let go: the lock was taken again


def test_a_lock_found_stuck_is_still_waited_for_a_little(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stopped holder may have let go since, and another writer hold the lock for the milliseconds of an
    update: a later write waits `_STUCK_GRACE_S` for it before it goes past."""
    from shared.store import local

    store = _record_store(tmp_path)
    backend = store.backend
    assert isinstance(backend, LocalBackend)
    folder = str(tmp_path / "perstack" / "jobs" / "j1")
    backend._stuck.add(folder)  # found stuck before
    monkeypatch.setattr(
        local, "_WRITE_PAST_S", 0.0
    )  # were the folder not remembered, it would go past at once
    monkeypatch.setattr(local, "_STUCK_GRACE_S", 30.0)
    holding = os.open(folder, os.O_RDONLY)  # another writer, mid-update (not through this backend)
    fcntl.flock(holding, fcntl.LOCK_EX)
    waited = threading.Event()
    real_sleep = time.sleep
    monkeypatch.setattr(local.time, "sleep", lambda s: (waited.set(), real_sleep(s))[1])
    writing = threading.Thread(target=lambda: store.update_job("j1", lambda j: _steps(j, 1)))
    writing.start()
    try:
        assert waited.wait(10)
        real_sleep(0.1)
        assert writing.is_alive() and folder in backend._stuck  # still waiting, not gone past
    finally:
        os.close(holding)
    writing.join(10)
    assert not writing.is_alive() and not backend._stuck  # it took the lock: not written past


def test_a_whole_save_waits_for_a_check_and_swap_and_is_not_undone_by_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """save_job (tools, tests) overwrites the record whole, but through the same check and swap: it cannot
    land between a writer's check and that writer's swap, which would then swap it away."""
    from shared.store import local

    monkeypatch.setattr(local, "_WRITE_PAST_S", 0.0)
    store = _record_store(tmp_path)
    backend = store.backend
    assert isinstance(backend, LocalBackend)
    folder = str(tmp_path / "perstack" / "jobs" / "j1")
    holding = os.open(folder, os.O_RDONLY)  # a stopped holder: both writers below go past it
    fcntl.flock(holding, fcntl.LOCK_EX)
    checked, go = threading.Event(), threading.Event()
    real_replace = os.replace

    def stopped_after_its_check(a: str, b: str) -> None:
        if threading.current_thread().name == "checking":
            checked.set()
            assert go.wait(10)
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", stopped_after_its_check)
    checking = threading.Thread(
        target=lambda: store.update_job("j1", lambda j: _steps(j, 1)), name="checking"
    )
    checking.start()
    try:
        assert checked.wait(5)
        saving = threading.Thread(target=lambda: store.save_job(_steps(job("j1", status="completed"), 9)))
        saving.start()
        saving.join(0.5)
        assert saving.is_alive()  # waits for the check and swap in progress
        go.set()
        checking.join(5)
        saving.join(5)
    finally:
        go.set()
        os.close(holding)
    final = store.load_job("j1")
    assert final is not None and (final.status, final.total_steps) == ("completed", 9)


def test_a_check_never_passes_on_the_file_swapped_out_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer opens the record file, and before it locks it the holder swaps it out: the file it then
    locks is the spare, still holding what the writer read. The check must see that it has lost its name,
    or the writer would swap its change in over the holder's."""
    from shared.store import flush, local

    if flush._SYNCFS is None or local._RENAMEAT2 is None:
        pytest.skip("no syncfs or renameat2 here: the holder does not swap")
    store = _record_store(tmp_path)
    backend = store.backend
    assert isinstance(backend, LocalBackend)
    store.update_job("j1", lambda j: _steps(j, 1))  # the holder's first update: the spare holds the record
    key = "jobs/j1/job.json"
    path = str(tmp_path / "perstack" / key)
    read = backend.read(key)
    assert read is not None
    real_flock = fcntl.flock
    swapped: list[bool] = []

    def holder_swaps_first(fd: int, flags: int) -> None:
        if (
            not swapped
            and flags == fcntl.LOCK_EX | fcntl.LOCK_NB
            and os.fstat(fd).st_ino == os.stat(path).st_ino
        ):
            swapped.append(True)
            store.update_job("j1", lambda j: _steps(j, 2))  # the holder, between the open and the lock
        real_flock(fd, flags)

    monkeypatch.setattr(local.fcntl, "flock", holder_swaps_first)
    data = _steps(job("j1", status="queued"), 10).model_dump_json(by_alias=True).encode()
    assert not backend.run(backend.rewrite_steps(key, data, replacing=read, past_lock=True))
    assert swapped == [True]
    final = store.load_job("j1")
    assert final is not None and final.total_steps == 2
    assert sorted(
        p.name for p in (tmp_path / "perstack" / "jobs" / "j1").iterdir() if p.name.startswith(".")
    ) == [".job.json.spare"]


@pytest.mark.parametrize("past_lock", [True, False])
def test_a_record_that_does_not_parse_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, past_lock: bool
) -> None:
    """Read past its lock, a record may be a spare being rewritten (swapped out under the reader): it is read
    again; one damaged on the disk still fails after a few reads."""
    from shared.store import local

    store = _record_store(tmp_path)
    backend = store.backend
    assert isinstance(backend, LocalBackend)
    real_read = LocalBackend.read
    reads: list[str] = []

    def torn_once(self: LocalBackend, key: str) -> bytes | None:
        reads.append(key)
        data = real_read(self, key)
        return data[:10] if key.endswith("job.json") and len(reads) == 1 and data else data

    monkeypatch.setattr(LocalBackend, "read", torn_once)
    if past_lock:
        monkeypatch.setattr(local, "_WRITE_PAST_S", 0.0)
        lock = backend.run(backend.lock_steps("jobs/j1/job.json"))  # held: the update goes past it
    done = store.update_job("j1", lambda j: _steps(j, 1))
    assert done is not None and done.total_steps == 1
    assert reads.count("jobs/j1/job.json") == 2
    if past_lock:
        backend.unlock(lock)
    (tmp_path / "perstack" / "jobs" / "j1" / "job.json").write_text("{damaged")
    with pytest.raises(StoreError, match="damaged file"):
        store.load_job("j1")


def test_a_lock_is_waited_for_as_long_as_it_takes_where_folders_cannot_be_locked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On NFS, locks are a `.lock` file's, and a record file cannot be locked for its check and swap: no
    writer goes past the lock there."""
    from shared.store import local

    monkeypatch.setattr(local, "_WRITE_PAST_S", 0.1)
    store = _record_store(tmp_path)
    backend = store.backend
    assert isinstance(backend, LocalBackend)
    monkeypatch.setattr(backend, "_lock_folders", False)  # as found on NFS
    writer, go, _ = _stopped_update(store, lambda j: _steps(j, 1))
    done: list[Job | None] = []
    waiting = threading.Thread(target=lambda: done.append(store.update_job("j1", lambda j: _steps(j, 2))))
    waiting.start()
    waiting.join(0.6)
    assert waiting.is_alive() and done == []
    go.set()
    writer.join(5)
    waiting.join(5)
    final = store.load_job("j1")
    assert final is not None and final.total_steps == 2


def test_a_rewrite_falls_back_where_names_cannot_be_swapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system without RENAME_EXCHANGE (EINVAL) still gets the new record, by a plain replace."""
    import errno

    from shared.store import local

    def refuse(a: str, b: str) -> None:
        if os.path.exists(b):
            raise OSError(errno.EINVAL, "not here")
        raise FileNotFoundError(errno.ENOENT, "missing", a)

    monkeypatch.setattr(local, "_exchange", refuse)
    _updated_twice(tmp_path)


async def test_steps_on_an_event_loop_share_flushes_and_wait_for_a_busy_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps run on one event loop (as a worker runs them): many commits share a few flushes, and two
    updates of one record (a lock held across a flush) both land, neither blocking the loop."""
    import asyncio

    from shared.store import flush

    if flush._SYNCFS is None:
        pytest.skip("no syncfs here")
    store = JobStore.open(str(tmp_path / "perstack"))
    backend = store.backend
    assert isinstance(backend, LocalBackend) and backend.flushes_shared
    calls: list[int] = []
    real = flush.GroupFlush._syncfs

    def counted(self: flush.GroupFlush) -> None:
        calls.append(1)
        time.sleep(0.005)
        real(self)

    monkeypatch.setattr(flush.GroupFlush, "_syncfs", counted)
    flusher = flush.LoopFlush(backend.flush_group)
    try:
        store.save_job(job("j1", status="queued"), new=True)

        async def commit(n: int) -> bool:
            cp = checkpoint(n)
            cp.id = checkpoint_id("r1", n)
            cp.messages = [said(f"m{n}")]
            return await backend.run_async(store.commit_checkpoint_steps(cp, f"t{n}"), flusher, None)

        async def count_up() -> None:
            def add(j: Job) -> Job:
                return j.model_copy(update={"status": "running", "total_steps": j.total_steps + 1})

            await backend.run_async(store.update_job_steps("j1", add), flusher, None)

        results = await asyncio.wait_for(
            asyncio.gather(*(commit(n) for n in range(1, 41)), *(count_up() for _ in range(5))), 30
        )
    finally:
        flusher.close()
    assert all(results[:40])
    assert len(calls) < 40  # shared: far fewer flushes than the 40 commits' (and 5 records') needs
    final = store.load_job("j1")
    assert final is not None and final.total_steps == 5  # no update lost to another
    assert [c.step_number for c in store.list_checkpoints("j1")[0]] == list(range(1, 41))


async def test_a_failed_shared_flush_fails_its_steps_and_the_next_flush_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from shared.store import flush

    group = flush.GroupFlush(tmp_path)
    flusher = flush.LoopFlush(group)
    fail = [True]
    real = group._syncfs

    def maybe_fail() -> None:
        if fail[0]:
            raise OSError(5, "disk gone")
        real()

    group._syncfs = maybe_fail  # type: ignore[method-assign]
    try:
        outcomes = await asyncio.gather(*(flusher.flush() for _ in range(3)), return_exceptions=True)
        assert outcomes and all(isinstance(o, OSError) for o in outcomes)
        fail[0] = False
        await asyncio.wait_for(flusher.flush(), 10)
    finally:
        flusher.close()


def test_a_read_that_stops_short_reads_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """os.read may return less than asked (a network file system, a file over 2 GiB): the store reads on."""
    store = JobStore.open(str(tmp_path / "perstack"))
    store.save_job(job("j1"))
    real = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: real(fd, min(n, 5)))
    assert store.load_job("j1") == job("j1")


def test_a_short_write_is_finished_not_published_cut_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """os.write may write less than asked (a full disk): the store goes on writing, never publishing half."""
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, bytes(data[:7])))
    store = JobStore.open(str(tmp_path / "perstack"))
    cp = checkpoint(1)
    cp.id = checkpoint_id("r1", 1)
    cp.messages = [said("a" * 100)]
    assert store.commit_checkpoint(cp, "t1", [event("startRun", 1).to_json()])
    store.save_job(job("j1"))
    monkeypatch.setattr(os, "write", real)
    assert texts(store.load_checkpoint("j1", cp.id)) == ["a" * 100]
    assert store.load_job("j1") == job("j1")
    assert [e.type for e in store.read_events("j1", "r1")[0]] == ["startRun"]


def test_the_unfinished_index_on_every_backend(store: JobStore) -> None:
    store.save_job(job("j1", status="queued"), new=True)
    store.save_job(job("j2", status="queued"), new=True)
    store.save_job(job("j1", status="running"))  # a step's write leaves the marker alone
    assert store.list_unfinished() == ["j1", "j2"]
    store.save_job(job("j1", status="completed"))
    assert store.list_unfinished() == ["j2"]
    store.save_job(job("j2", status="cancelled"))  # kept until reconciliation settles it
    assert store.list_unfinished() == ["j2"]
    store.settle_unfinished("j2")
    assert store.list_unfinished() == []


def test_where_folders_cannot_be_locked_a_lock_file_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job record is locked by its folder; a file system that cannot lock a folder (NFS) gets a lock
    file in it instead, for writers and readers alike."""
    import errno
    import fcntl
    import stat

    real = fcntl.flock

    def flock(fd: int, operation: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EBADF, "cannot lock a folder here")
        real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    _updated_twice(tmp_path)
    assert (tmp_path / "perstack" / "jobs" / "j1" / ".lock").exists()


def _updated_twice(tmp_path: Path) -> None:
    """A new record, updated twice: each version reads back."""
    store = JobStore.open(str(tmp_path / "perstack"))
    store.save_job(job("j1", status="queued"), new=True)
    for n in (1, 2):
        store.update_job("j1", lambda j, n=n: j.model_copy(update={"status": "running", "total_steps": n}))
        loaded = store.load_job("j1")
        assert loaded is not None and loaded.total_steps == n
