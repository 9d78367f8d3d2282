"""perq's exit codes keep their numbers: scripts branch on them, and the README promises them."""

from __future__ import annotations

from producer.cli.exit import ExitCode


def test_exit_codes_keep_their_numbers() -> None:
    assert {c.name: int(c) for c in ExitCode} == {
        "OK": 0,
        "FAILED": 1,
        "BAD_INPUT": 2,
        "WAITING_FOR_INPUT": 3,
        "MAX_STEPS": 4,
        "INTERRUPTED": 130,
    }


def test_a_followed_job_exits_as_it_stopped() -> None:
    assert [
        ExitCode.of_status(s)
        for s in ("completed", "stoppedByInteractiveTool", "stoppedByMaxSteps", "stoppedByError", "cancelled")
    ] == [0, 3, 4, 1, 1]
    assert ExitCode.of_status("running") == 1  # a status that is not final is no success
