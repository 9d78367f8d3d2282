"""What a job waits on, derived from hand-made stores (worker/reconcile.py: next_units), a pass against a real
Redis (`reconcile`), and Sentinel URLs."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest
from arq.connections import ArqRedis

from shared.config import RedisSection, Settings, SettingsError
from shared.models import (
    Checkpoint,
    DelegatedBy,
    DelegationTarget,
    ExpertRef,
    Job,
    ProviderConfig,
    RunInput,
    RunSetting,
    checkpoint_id,
    derived_id,
    now_ms,
)
from shared.queue import StepTask, cancel_key, step_job_id
from shared.queue.broker import job_key_prefix, redis_settings
from shared.redisurl import check_redis_url, parse_sentinel_url
from shared.store import JobStore
from worker.reconcile import next_units, reconcile

BOSS = ExpertRef(key="boss", name="boss")
HELPER = ExpertRef(key="helper", name="helper")
EPOCH = 1_000


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore.open(str(tmp_path / "perstack"))


def save_job(store: JobStore, status: str = "running", epoch: int = EPOCH) -> Job:
    job = Job(id="j", status=status, coordinator_expert_key="boss", started_at=1, epoch=epoch)  # type: ignore[arg-type]
    store.save_job(job, new=True)
    return job


def begin_run(store: JobStore, run_id: str, step: int = 1, epoch: int = EPOCH, **initial: object) -> None:
    """A run as the runtime begins one: its setting, then its initial checkpoint."""
    setting = RunSetting(
        model="m",
        provider_config=ProviderConfig(provider_name="script"),
        job_id="j",
        run_id=run_id,
        expert_key="boss",
        input=RunInput(text="q"),
        experts={},
        workspace="/tmp",
        epoch=epoch,
    )
    store.save_run_setting(setting)
    store.save_initial_checkpoint(checkpoint(run_id, step, "init", **initial))


def checkpoint(run_id: str, step: int, status: str, **fields: object) -> Checkpoint:
    return Checkpoint.model_validate(
        {
            "id": checkpoint_id(run_id, step),
            "jobId": "j",
            "runId": run_id,
            "status": status,
            "stepNumber": step,
            "expert": BOSS.to_dict(),
            **{k: v.to_dict() if hasattr(v, "to_dict") else v for k, v in fields.items()},
        }
    )


def record(store: JobStore, run_id: str, step: int, status: str, **fields: object) -> Checkpoint:
    cp = checkpoint(run_id, step, status, **fields)
    store.save_checkpoint(cp)
    return cp


def steps(store: JobStore, job: Job) -> list[tuple[str, int]]:
    return [(u.task.run_id, u.task.step_number) for u in next_units(store, job)]


def delegating(store: JobStore, calls: list[str]) -> Checkpoint:
    """Run r1 of the boss stopped at step 2 on a delegation to the helper, one target per call id."""
    begin_run(store, "r1")
    record(store, "r1", 1, "proceeding")
    targets = [
        DelegationTarget(expert=HELPER, tool_call_id=c, tool_name="helper", query="q").to_dict()
        for c in calls
    ]
    return record(store, "r1", 2, "stoppedByDelegate", delegateTo=targets)


def child(store: JobStore, parent: Checkpoint, call: str) -> str:
    run_id = derived_id("delegate", parent.id, call)
    by = DelegatedBy(expert=BOSS, tool_call_id=call, tool_name="helper", checkpoint_id=parent.id, run_id="r1")
    begin_run(store, run_id, step=3, delegatedBy=by)
    return run_id


def by(parent: Checkpoint, call: str) -> dict[str, object]:
    return DelegatedBy(
        expert=BOSS, tool_call_id=call, tool_name="helper", checkpoint_id=parent.id, run_id="r1"
    ).to_dict()


def test_a_queued_job_waits_on_its_first_step(store: JobStore) -> None:
    job = save_job(store, "queued")
    begin_run(store, "r1")
    assert steps(store, job) == [("r1", 1)]
    assert "first step" in next_units(store, job)[0].reason


def test_a_proceeding_checkpoint_waits_on_the_next_step(store: JobStore) -> None:
    job = save_job(store)
    begin_run(store, "r1")
    record(store, "r1", 1, "proceeding")
    record(store, "r1", 2, "proceeding")
    assert steps(store, job) == [("r1", 3)]


@pytest.mark.parametrize("status", ["completed", "stoppedByInteractiveTool", "cancelled", "stoppedByError"])
def test_a_settled_job_waits_on_nothing(store: JobStore, status: str) -> None:
    job = save_job(store, status)
    begin_run(store, "r1")
    record(store, "r1", 1, "proceeding")
    assert steps(store, job) == []


def test_a_cancelled_job_shows_where_a_step_may_still_run(store: JobStore) -> None:
    job = save_job(store, "cancelled")
    begin_run(store, "r1")
    record(store, "r1", 1, "proceeding")
    assert steps(store, job) == []
    assert [(u.task.run_id, u.task.step_number) for u in next_units(store, job, cancelled=True)] == [
        ("r1", 2)
    ]


def test_a_record_behind_its_final_checkpoint_reruns_that_step(store: JobStore) -> None:
    # the step's checkpoint ended the job, and its worker died before the record: running the step again
    # finds the checkpoint and writes the record
    job = save_job(store)
    begin_run(store, "r1")
    record(store, "r1", 1, "proceeding")
    record(store, "r1", 2, "completed")
    units = next_units(store, job)
    assert [(u.task.run_id, u.task.step_number) for u in units] == [("r1", 2)]
    assert "completed" in units[0].reason


def test_runs_of_an_earlier_submission_are_not_resumed(store: JobStore) -> None:
    job = save_job(store, "queued", epoch=2_000)
    begin_run(store, "old", epoch=EPOCH)
    record(store, "old", 1, "proceeding")  # cancelled while it ran: its next step must never come back
    begin_run(store, "new", step=2, epoch=2_000)
    assert steps(store, job) == [("new", 2)]


def test_delegates_not_started_rerun_the_delegating_step(store: JobStore) -> None:
    job = save_job(store)
    parent = delegating(store, ["a", "b"])
    a = child(store, parent, "a")  # b was never begun: the worker died between the two
    # the delegating step runs again and begins b (a's beginning is idempotent); a's first step is lost too
    assert sorted(steps(store, job)) == sorted([("r1", 2), (a, 3)])


def test_delegates_at_work_are_their_own_units(store: JobStore) -> None:
    job = save_job(store)
    parent = delegating(store, ["a", "b"])
    a, b = child(store, parent, "a"), child(store, parent, "b")
    record(store, a, 3, "completed", delegatedBy=by(parent, "a"))
    record(store, b, 3, "proceeding", delegatedBy=by(parent, "b"))
    assert steps(store, job) == [(b, 4)]


def test_parallel_delegates_all_done_but_parent_not_resumed(store: JobStore) -> None:
    job = save_job(store)
    parent = delegating(store, ["a", "b"])
    a, b = child(store, parent, "a"), child(store, parent, "b")
    record(store, a, 3, "completed", delegatedBy=by(parent, "a"))
    record(store, b, 4, "stoppedByError", delegatedBy=by(parent, "b"))
    # b died before leaving its result: b's last step runs again, leaves it, and resumes the parent
    store.save_fan_in_result("j", parent.id, "a", json.dumps({"toolCallId": "a"}).encode())
    assert steps(store, job) == [(b, 4)]
    # both results are in, but the one who saw the set complete died before resuming: one re-run suffices
    store.save_fan_in_result("j", parent.id, "b", json.dumps({"toolCallId": "b"}).encode())
    assert len(steps(store, job)) == 1
    # once the resumption has begun it is a run of its own
    resume = derived_id("fan-in", parent.id)
    begin_run(store, resume, step=5)
    assert steps(store, job) == [(resume, 5)]


def test_a_sequential_delegate_done_resumes_its_parent(store: JobStore) -> None:
    job = save_job(store)
    parent = delegating(store, ["a"])
    a = child(store, parent, "a")
    record(store, a, 3, "proceeding", delegatedBy=by(parent, "a"))
    record(store, a, 4, "completed", delegatedBy=by(parent, "a"))
    assert steps(store, job) == [(a, 4)]
    back = derived_id("return", a)
    begin_run(store, back, step=5)
    assert steps(store, job) == [(back, 5)]
    record(store, back, 5, "proceeding")
    assert steps(store, job) == [(back, 6)]


async def in_queue(redis: ArqRedis, queue: str, run_id: str, step: int) -> None:
    """A step of job `j` as the queue holds it while it waits or runs (its member in the sorted set)."""
    await redis.zadd(queue, {step_job_id(StepTask(job_id="j", run_id=run_id, step_number=step)): now_ms()})


@pytest.mark.parametrize("thorough", [True, False], ids=["thorough", "workers"])
async def test_a_delegate_lost_beside_one_queued_is_found_by_every_pass_in_time(
    store: JobStore, redis: ArqRedis, thorough: bool
) -> None:
    """A workers' pass (not thorough) takes a job with a step in the queue as busy, without deriving it: a
    parallel delegate lost beside a queued one is found once the job has nothing queued; `perq recover`
    (thorough) finds it at once."""
    queue = f"perq:test:reconcile:{thorough}:{now_ms()}"
    job = save_job(store, status="queued")  # submitted (which marks it unfinished), then running
    store.save_job(job.model_copy(update={"status": "running"}))
    parent = delegating(store, ["a", "b"])
    a, b = child(store, parent, "a"), child(store, parent, "b")
    b_step = step_job_id(StepTask(job_id="j", run_id=b, step_number=3))
    await redis.delete(job_key_prefix + b_step)  # left by another case: ids are the same in every store
    await in_queue(redis, queue, a, 3)  # b's first step was lost
    found = await reconcile(redis, store, queue, settle_s=0, dry_run=True, thorough=thorough)
    assert [(r.unit.task.run_id, r.unit.task.step_number) for r in found] == ([(b, 3)] if thorough else [])
    # a's step ran and ended; b's is still missing, and now the job has nothing queued
    await redis.zrem(queue, step_job_id(StepTask(job_id="j", run_id=a, step_number=3)))
    record(store, a, 3, "completed", delegatedBy=by(parent, "a"))
    found = await reconcile(redis, store, queue, settle_s=0, thorough=thorough)
    assert [(r.unit.task.run_id, r.unit.task.step_number, r.outcome) for r in found] == [(b, 3, "enqueued")]
    assert job.id == "j" and await redis.zscore(
        queue, step_job_id(StepTask(job_id="j", run_id=b, step_number=3))
    )


async def test_a_workers_pass_restores_the_mark_of_a_cancelled_job_with_a_step_queued(
    store: JobStore, redis: ArqRedis
) -> None:
    """A cancelled job whose step is still queued is not derived by a workers' pass, but its record is read:
    a Redis that forgot its cancel mark gets it back, so the step cannot hand the job on."""
    queue = f"perq:test:reconcile:cancelled:{now_ms()}"
    job = save_job(store, status="queued")
    store.save_job(job.model_copy(update={"status": "cancelled", "finished_at": 1234}))
    begin_run(store, "r1")
    await in_queue(redis, queue, "r1", 1)
    await redis.delete(cancel_key("j"))
    assert await reconcile(redis, store, queue, settle_s=0, thorough=False) == []
    assert await redis.get(cancel_key("j")) == b"1234"
    assert store.list_unfinished() == ["j"]  # a step of it may still run: not settled


async def test_workers_passes_are_thorough_every_few_periods_but_never_at_start_up(
    store: JobStore, redis: ArqRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """So a step lost beside a queued one waits a bounded time, while a worker starting beside a full queue
    still reads one record per job."""
    import asyncio

    from worker import reconcile as reconciling

    seen: list[tuple[float, bool]] = []
    enough = asyncio.Event()

    async def pass_(*_args: object, thorough: bool = True, **_kwargs: object) -> list[object]:
        seen.append((time.monotonic(), thorough))
        if len(seen) >= 25:
            enough.set()
        return []

    monkeypatch.setattr(reconciling, "reconcile", pass_)
    queue = f"perq:test:reconcile:every:{now_ms()}"
    period = 0.02
    service = asyncio.create_task(
        reconciling.reconcile_forever(
            redis, store, queue, period_s=period, settle_s=0, enqueued=lambda _: None
        )
    )
    try:
        await asyncio.wait_for(enough.wait(), 30)
    finally:
        service.cancel()
    assert seen[0][1] is False and seen[1][1] is True  # the start-up pass is light; the next one is thorough
    thorough = [at for at, t in seen if t]
    assert len(thorough) >= 2 and len(thorough) < len(seen) / 2
    # one thorough pass per THOROUGH_EVERY periods across the queue's workers (a Redis key's lifetime)
    assert all(b - a >= 0.5 * reconciling.THOROUGH_EVERY * period for a, b in itertools.pairwise(thorough))


def test_the_unfinished_index_follows_the_status(store: JobStore) -> None:
    job = save_job(store, "queued")
    other = Job(id="k", status="queued", coordinator_expert_key="boss", started_at=2)
    store.save_job(other, new=True)
    assert store.list_unfinished() == ["j", "k"]
    store.save_job(job.model_copy(update={"status": "running"}))
    assert store.list_unfinished() == ["j", "k"]
    store.save_job(job.model_copy(update={"status": "completed"}))
    assert store.list_unfinished() == ["k"]
    store.save_job(job.model_copy(update={"status": "queued"}))  # continued
    assert store.list_unfinished() == ["j", "k"]
    # a cancelled job stays until reconciliation has seen its last step end
    store.save_job(job.model_copy(update={"status": "cancelled"}))
    assert store.list_unfinished() == ["j", "k"]
    store.settle_unfinished("j")
    assert store.list_unfinished() == ["k"]
    store.delete_job("k")
    assert store.list_unfinished() == []


# --- Sentinel addresses ---------------------------------------------------------------------------


def test_sentinel_urls_parse_as_redis_py_users_write_them() -> None:
    address = parse_sentinel_url("redis+sentinel://:s3cret@h1:26379,h2:26380/mymaster/2")
    assert address.sentinels == [("h1", 26379), ("h2", 26380)]
    assert (address.master, address.database, address.password, address.ssl) == (
        "mymaster",
        2,
        "s3cret",
        False,
    )
    assert parse_sentinel_url("rediss+sentinel://h1/m").sentinels == [("h1", 26379)]
    settings = redis_settings("redis+sentinel://h1:1,h2:2/m/0")
    assert settings.sentinel and settings.host == [("h1", 1), ("h2", 2)] and settings.sentinel_master == "m"
    assert not redis_settings("redis://localhost:6379/0").sentinel


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://h1:26379", "master's name"),
        ("redis+sentinel:///m/0", "at least one sentinel"),
        ("redis+sentinel://h1:port/m", "invalid port"),
        ("redis+sentinel://h1:26379/m/zero", "/master[/db]"),
        ("sentinel://h1:26379/m", "unknown scheme"),
    ],
)
def test_bad_redis_urls_say_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(ValueError) as e:
        check_redis_url(url)
    assert says in str(e.value)
    with pytest.raises(SettingsError, match="PERQ_REDIS_URL") as refused:  # every command refuses it at start
        Settings(redis=RedisSection(url=url))
    assert says in str(refused.value) and "\n" not in str(refused.value)
