"""Step tasks on the queue: JSON only, validated on the way in (a pickle or a bad id is refused)."""

from __future__ import annotations

import pickle

import pytest
from pydantic import ValidationError

from shared.queue import PayloadError, StepTask, deserialize, serialize


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
