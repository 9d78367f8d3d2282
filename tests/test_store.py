"""The job store, the same tests on both backends: a local directory and S3 (a moto server on 127.0.0.1).

Then a whole job on the S3 store: `perq run` + `perq worker --burst` with PERQ_STORAGE=s3://...
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.models import Checkpoint, Event, ExpertRef, Job, ProviderConfig, RunInput, RunSetting
from shared.s3store import S3Backend
from shared.store import JobStore, LocalBackend, StoreError
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
    return Event.model_validate({"type": type_, "jobId": "j1", "runId": run_id, "stepNumber": step})


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


def test_events_append_read_and_rewrite(store: JobStore) -> None:
    assert store.read_events("j1", "r1") == ([], [])
    store.append_events("j1", "r1", [event("startRun", 1), event("continueToNextStep", 1)])
    store.append_events("j1", "r1", [])  # nothing to add: nothing written
    store.append_events("j1", "r1", [event("startGeneration", 2), event("callTools", 2)])
    events, problems = store.read_events("j1", "r1")
    assert [e.type for e in events] == ["startRun", "continueToNextStep", "startGeneration", "callTools"]
    assert problems == []
    # a crashed attempt of step 2 left events behind: they go before the step runs again
    store.drop_events_from_step("j1", "r1", 2)
    store.append_events("j1", "r1", [event("startGeneration", 2), event("completeRun", 2)])
    events, _ = store.read_events("j1", "r1")
    assert [(e.step_number, e.type) for e in events] == [
        (1, "startRun"),
        (1, "continueToNextStep"),
        (2, "startGeneration"),
        (2, "completeRun"),
    ]
    assert store.list_runs("j1") == ["r1"]
    assert store.backend.list("jobs/j1/runs/r1") == ["events.jsonl"]  # one file, whatever the backend


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
    store.backend.append("jobs/j1/runs/r1/events.jsonl", b"garbage\n")
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


def test_s3_log_reads_a_copied_local_file_and_rewrites_cleanly(s3: S3Backend) -> None:
    key = "jobs/j1/runs/r1/events.jsonl"
    s3.fs.pipe_file(s3._path(key), b"old1\nold2\n")  # a local store copied to the bucket as it is
    assert s3.read(key) == b"old1\nold2\n"
    s3.append(key, b"new\n")
    assert s3.read(key) == b"old1\nold2\nnew\n"
    s3.write(key, b"only\n")
    s3.append(key, b"after\n")
    assert s3.read(key) == b"only\nafter\n"
    assert len(s3.fs.ls(s3._path(key + ".parts"))) == 2  # the rewrite removed the segments it replaced
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
