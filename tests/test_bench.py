"""The benchmark suite's own logic: how figures read events, and that `python -m bench` runs end to end.

No timing is asserted here: figures are judged by the suite itself, never by a unit test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.common import BenchError, time_to_screen
from bench.figures import delegation_phase, steps_per_second
from shared.models import STEP_ENDING_EVENTS, Event

REPO = Path(__file__).resolve().parent.parent


def event(type_: str, step: int, ms: int, expert: str = "e", run: str = "r") -> Event:
    data: dict[str, Any] = {
        "type": type_,
        "jobId": "j",
        "runId": run,
        "expertKey": expert,
        "stepNumber": step,
        "timestamp": ms,
    }
    checkpoint: dict[str, Any] = {"id": f"cp{step}", "jobId": "j", "runId": run, "stepNumber": step}
    checkpoint |= {"status": "proceeding", "expert": {"key": expert, "name": expert}}
    if type_ == "startRun":
        data["initialCheckpoint"] = checkpoint
    elif type_ in STEP_ENDING_EVENTS:
        data["checkpoint"] = checkpoint
    return Event.model_validate(data)


def test_steps_per_second_counts_from_the_end_of_step_one() -> None:
    events = [event("startRun", 1, 0), event("continueToNextStep", 1, 1000)]
    events += [event("continueToNextStep", s, 1000 + 10 * (s - 1)) for s in range(2, 4)]
    events.append(event("completeRun", 4, 1030))
    assert steps_per_second(events, 4) == pytest.approx(3 / 0.030)


def test_steps_per_second_refuses_a_job_that_did_not_finish() -> None:
    with pytest.raises(BenchError, match="did not run through"):
        steps_per_second([event("startRun", 1, 0), event("continueToNextStep", 1, 5)], 100)


def test_delegation_phase_runs_from_the_stop_to_the_resumed_start() -> None:
    events = [
        event("startRun", 1, 0, "coord"),
        event("stopRunByDelegate", 1, 100, "coord"),
        event("startRun", 2, 120, "c1"),
        event("completeRun", 2, 1120, "c1"),
        event("startRun", 3, 1150, "coord", run="r2"),
    ]
    assert delegation_phase(events) == pytest.approx(1.05)
    # a step that starts its run and stops it in the same millisecond: its own startRun is not the resumption
    events[0] = event("startRun", 1, 100, "coord")
    assert delegation_phase(events) == pytest.approx(1.05)


def test_delegation_phase_says_when_the_parent_never_resumed() -> None:
    events = [event("stopRunByDelegate", 1, 100, "coord"), event("startRun", 2, 120, "c1")]
    with pytest.raises(BenchError, match="never resumed"):
        delegation_phase(events)


def test_time_to_screen_runs_the_program_on_a_terminal(tmp_path: Path) -> None:
    # the program draws the text only when its stdout is a terminal, and exits right after: a pipe, or a
    # reader that missed the text, would end in BenchError
    code = "import sys; print('drawn' if sys.stdout.isatty() else 'piped')"
    assert time_to_screen([sys.executable, "-c", code], "drawn", cwd=tmp_path, env={}) > 0


def test_time_to_screen_says_when_the_program_exits_first(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="exited before drawing 'drawn'"):
        time_to_screen([sys.executable, "-c", "print('something else')"], "drawn", cwd=tmp_path, env={})


def test_bench_entry_point_prints_json_rows() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "cli", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = json.loads(result.stdout)
    (row,) = out["rows"]
    gauge = out["cpuGaugeMs"]
    assert gauge["start"] > 0 and gauge["end"] > 0  # how fast the machine ran, beside the load average
    assert list(gauge["byFigure"]) == ["cli"] and gauge["byFigure"]["cli"] == gauge["start"]
    creates = out["fileCreateUs"]  # how slow creating a file was where the stores live
    assert creates["start"] > 0 and creates["end"] > 0
    assert creates["byFigure"] == {"cli": creates["start"]}
    assert row["figure"] == "CLI start" and row["goal"] == "<= 1.5"
    assert isinstance(row["value"], float) and row["holds"] in (True, False)
    assert result.returncode == (0 if row["holds"] else 1)


def test_the_store_figures_time_every_step_of_a_job(tmp_path: Path) -> None:
    """The growth and fsync figures read each step's store time from the timed runtime: every step must
    have one (a store path that bypasses the timing would leave the figures without their numbers)."""
    from bench.common import Area
    from bench.store_figures import run_in_process

    area = Area(bench=None, name="t", root=tmp_path, queue="unused")  # type: ignore[arg-type]
    area.storage.mkdir(parents=True)
    job = run_in_process(area, 4)
    assert sorted(job.store_ms) == [1, 2, 3, 4] and all(ms > 0 for ms in job.store_ms.values())
    assert job.store_bytes > job.conversation_bytes > 0
