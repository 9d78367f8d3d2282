"""The job record's rules (shared/job_record.py): pure functions, so every transition is checked here."""

from __future__ import annotations

from shared import job_record
from shared.models import Checkpoint, DelegatedBy, ExpertRef, Job, RunError, Usage

EXPERT = ExpertRef(key="boss", name="boss")
HELPER = ExpertRef(key="helper", name="helper")


def job(status: str = "running", steps: int = 2, epoch: int = 100) -> Job:
    return Job(
        id="j",
        status=status,  # type: ignore[arg-type]
        coordinator_expert_key="boss",
        total_steps=steps,
        usage=Usage(input_tokens=steps),
        started_at=1,
        epoch=epoch,
    )


def end(step: int, status: str = "proceeding", *, delegate: bool = False) -> Checkpoint:
    by = DelegatedBy(expert=EXPERT, tool_call_id="c", tool_name="helper", checkpoint_id="p", run_id="r")
    return Checkpoint(
        id=f"cp{step}",
        job_id="j",
        run_id="r",
        status=status,  # type: ignore[arg-type]
        step_number=step,
        expert=HELPER if delegate else EXPERT,
        usage=Usage(input_tokens=step * 10),
        delegated_by=by if delegate else None,
        error=RunError(name="E", message="boom") if status == "stoppedByError" else None,
    )


def after(record: Job, checkpoint: Checkpoint, **kw: object) -> Job | None:
    options: dict[str, object] = {"epoch": 100, "expert_key": checkpoint.expert.key, "parallel_branch": False}
    return job_record.after_step(record, checkpoint, now=5, **(options | kw))  # type: ignore[arg-type]


def test_a_step_assigns_totals_and_the_head() -> None:
    new = after(job("queued", 0), end(3))
    assert new is not None
    assert (new.status, new.total_steps, new.usage.input_tokens, new.head_checkpoint_id) == (
        "running",
        3,
        30,
        "cp3",
    )


def test_the_end_of_the_coordinators_run_settles_the_job() -> None:
    for status, settled in [
        ("completed", "completed"),
        ("stoppedByError", "stoppedByError"),
        ("stoppedByExceededMaxSteps", "stoppedByMaxSteps"),
        ("stoppedByInteractiveTool", "stoppedByInteractiveTool"),
    ]:
        new = after(job(), end(3, status))
        assert new is not None and new.status == settled
        assert (new.finished_at is None) == (settled == "stoppedByInteractiveTool")
        assert (new.error is not None) == (settled == "stoppedByError")


def test_a_delegates_end_goes_back_to_its_parent_not_to_the_job() -> None:
    new = after(job(), end(4, "completed", delegate=True))
    assert new is not None and new.status == "running" and new.head_checkpoint_id is None
    assert new.total_steps == 4  # the main chain's totals, delegates included


def test_a_finished_job_never_moves_back() -> None:
    """A worker that paused past its lease wakes up and records a step the job has long passed."""
    for status in ("completed", "stoppedByError", "stoppedByMaxSteps", "stoppedByInteractiveTool"):
        assert after(job(status, 3), end(2)) is None
        assert after(job(status, 3), end(3, "completed"), catch_up=True) is None


def test_a_late_step_older_than_the_record_changes_nothing() -> None:
    assert after(job("running", 5), end(3)) is None
    assert after(job("running", 5), end(5)) is not None


def test_a_run_of_an_earlier_submission_changes_nothing() -> None:
    assert after(job("queued", 5, epoch=200), end(6), epoch=100) is None


def test_a_cancelled_job_counts_its_last_step_and_stays_cancelled() -> None:
    new = after(job("cancelled", 2), end(3))
    assert new is not None and (new.status, new.total_steps) == ("cancelled", 3)


def test_parallel_branches_never_write_totals_but_max_steps_stops_the_job() -> None:
    assert after(job(), end(9), parallel_branch=True) is None
    stopped = after(job(), end(9, "stoppedByExceededMaxSteps"), parallel_branch=True)
    assert stopped is not None and (stopped.status, stopped.total_steps) == ("stoppedByMaxSteps", 9)
    assert (
        after(job("stoppedByMaxSteps", 9), end(9, "stoppedByExceededMaxSteps"), parallel_branch=True) is None
    )


def test_a_catch_up_of_the_recorded_head_is_a_no_op() -> None:
    record = job("running", 3).model_copy(update={"head_checkpoint_id": "cp3"})
    assert after(record, end(3), catch_up=True) is None


def test_cancel_settle_and_fail() -> None:
    assert job_record.cancel(job(), now=7).status == "cancelled"
    assert job_record.settle_cancel(job(epoch=100), epoch=100, now=7).status == "cancelled"  # type: ignore[union-attr]
    assert job_record.settle_cancel(job(epoch=200), epoch=100, now=7) is None  # a later submission runs
    assert job_record.settle_cancel(job("completed"), epoch=100, now=7) is None
    failed = job_record.fail(job(), RunError(name="E", message="m"), now=7)
    assert failed is not None and failed.status == "stoppedByError" and failed.finished_at == 7
    assert job_record.fail(job("completed"), RunError(name="E", message="m"), now=7) is None


def test_a_submission_queues_and_a_branch_rewinds_the_totals() -> None:
    stopped = job("completed", 7).model_copy(update={"finished_at": 9, "error": None})
    again = job_record.submitted(stopped, epoch=300, start=end(3))
    assert (again.status, again.epoch, again.total_steps, again.finished_at) == ("queued", 300, 3, None)
    assert again.usage.input_tokens == 30
    fresh = job_record.submitted(job("queued", 0), epoch=300, start=None)
    assert fresh.total_steps == 0 and fresh.epoch == 300
