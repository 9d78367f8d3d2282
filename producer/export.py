"""`perq export`: jobs written out in Perstack's own on-disk layout, for Perstack's runtime and tools to read.

    {to}/jobs/{jobId}/job.json
    {to}/jobs/{jobId}/checkpoints/{checkpointId}.json                    whole checkpoints, messages included
    {to}/jobs/{jobId}/runs/{runId}/run-setting.json                      no secret: apiKey "", env {}
    {to}/jobs/{jobId}/runs/{runId}/event-{timestamp}-{step}-{type}.json  one file per event

Built on the store's readers (whole checkpoints, committed events), so it does not depend on how perq keeps
them. Each event is made whole again, as Perstack's runtime emits it: a step-ending event carries its whole
checkpoint and the step's new messages, startGeneration the conversation sent to the model, and
continueToNextStep the checkpoint the next step starts from. Where Perstack's format changed over time
(callDelegate's one `toolCall`, later a `toolCalls` list; `delegatedBy.runId`, added later) both forms are
written: Perstack's readers ignore keys they do not know. Events Perstack does not store (skill lifecycle,
perq's cancel) are left out.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from producer.log_query import run_ids
from shared import perstack_layout
from shared.models import (
    PERSTACK_JOB_STATUS,
    STEP_ENDING_EVENTS,
    CallDelegate,
    Checkpoint,
    ContinueToNextStep,
    Event,
    Job,
    Message,
    PerqModel,
    PerstackJob,
    PerstackRunSetting,
    RunSetting,
    StartGeneration,
    StartRun,
    Step,
    StepEnd,
    misfit,
)
from shared.store import JobStore, StoreError

# what only perq's store needs: where the messages are kept, which attempt committed
_STORE_ONLY = {"messages_ref", "commit"}
_CREDENTIALS = {"amazon-bedrock": {"access_key_id": "", "secret_access_key": "", "region": ""}}


class ExportError(ValueError):
    """An export perq refuses before writing anything; the message says why."""


@dataclass
class Exported:
    job_id: str
    path: Path
    checkpoints: int = 0
    runs: int = 0
    events: int = 0
    problems: list[str] = field(default_factory=list)  # damaged files that were skipped


def export_jobs(store: JobStore, jobs: list[Job], to: Path) -> list[Exported]:
    """Write each job under `to`/jobs/, replacing an earlier export of it. A job is written to a temporary
    folder and renamed into place, so an export that fails leaves the earlier one as it was."""
    check_destination(store, to)
    folder = to / "jobs"
    folder.mkdir(parents=True, exist_ok=True)
    return [_export_job(store, job, folder) for job in jobs]


def check_destination(store: JobStore, to: Path) -> None:
    if to.exists() and not to.is_dir():
        raise ExportError(f"--to {to} is a file, not a directory")
    root = store.local_root
    target = to.resolve()
    if root is not None and (target == root or root in target.parents):
        raise ExportError(f"--to {to} is inside the job store {root}: export somewhere else")


def _export_job(store: JobStore, job: Job, folder: Path) -> Exported:
    final = folder / job.id
    work = folder / f".{job.id}.{secrets.token_hex(4)}.tmp"
    out = Exported(job_id=job.id, path=final)
    try:
        _write_job(store, job, work, out)
        if final.exists():
            old = folder / f".{job.id}.{secrets.token_hex(4)}.old"
            os.rename(final, old)
            os.rename(work, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(work, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _write(path: Path, data: Any, *, indent: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent, ensure_ascii=False))


def _write_job(store: JobStore, job: Job, work: Path, out: Exported) -> None:
    _write(work / "job.json", job_form(job), indent=2)  # Perstack writes its job records indented
    checkpoints, problems = store.list_checkpoints(job.id)
    out.problems.extend(problems)
    by_id = {c.id: c for c in checkpoints}
    forms = {c.id: checkpoint_form(c, by_id) for c in checkpoints}
    for cp_id, form in forms.items():
        _write(work / "checkpoints" / f"{cp_id}.json", form)
    out.checkpoints = len(forms)
    for run_id in run_ids(store, job.id):
        out.runs += 1
        run = work / "runs" / run_id
        try:
            setting = store.load_run_setting(job.id, run_id)
        except StoreError as e:  # e.g. one Perstack wrote, which holds its API key: never copied as it is
            setting = None
            out.problems.append(f"{e} (its run setting is not exported)")
        if setting is not None:
            _write(run / "run-setting.json", run_setting_form(setting))
        events, problems = store.read_events(job.id, run_id)
        out.problems.extend(problems)
        initial = _initial_messages(store, job.id, run_id)
        names: set[str] = set()
        for event in whole_events(events, by_id, forms, initial):
            name = _unique_name(event, names)
            _write(run / name, event)
            out.events += 1


def _unique_name(event: dict[str, Any], taken: set[str]) -> str:
    """Perstack names an event file by millisecond, step and type; two such events of one run would share
    a name, so the later one moves to the next free millisecond (its content keeps its own timestamp)."""
    timestamp = int(event["timestamp"])
    while True:
        name = perstack_layout.event_file_name(timestamp, int(event["stepNumber"]), str(event["type"]))
        if name not in taken:
            taken.add(name)
            return name
        timestamp += 1


# --- forms of the records ---------------------------------------------------------------------------


def job_form(job: Job) -> dict[str, Any]:
    data = job.model_dump()
    data["status"] = PERSTACK_JOB_STATUS.get(job.status, job.status)
    return PerstackJob.model_validate(data).to_dict()


def run_setting_form(setting: RunSetting) -> dict[str, Any]:
    data = setting.model_dump()
    data["provider_config"] |= _CREDENTIALS.get(setting.provider_config.provider_name, {})
    return PerstackRunSetting.model_validate(data).to_dict()


def checkpoint_form(cp: Checkpoint, by_id: dict[str, Checkpoint]) -> dict[str, Any]:
    """A whole checkpoint as Perstack writes it; a delegate's names its parent's run in both formats'
    way (Perstack's older format names the parent's checkpoint only)."""
    data = cp.model_dump(mode="json", by_alias=True, exclude_none=True, exclude=_STORE_ONLY)
    by = data.get("delegatedBy")
    if by is not None and "runId" not in by and by.get("checkpointId") in by_id:
        by["runId"] = by_id[by["checkpointId"]].run_id
    return data


def _initial_messages(store: JobStore, job_id: str, run_id: str) -> list[Message] | None:
    """The conversation a perq run starts from (its initial checkpoint's); None for a run without one."""
    try:
        initial = store.load_initial_checkpoint(job_id, run_id)
    except StoreError:
        return None
    if initial is None:
        return None
    return initial.messages


# --- events made whole ------------------------------------------------------------------------------


def whole_events(
    events: list[Event],
    by_id: dict[str, Checkpoint],
    forms: dict[str, dict[str, Any]],
    initial: list[Message] | None,
) -> list[dict[str, Any]]:
    """One run's events (in order) as Perstack's runtime emits them. The conversation is followed along
    the run: a startRun sets it to the run's initial conversation and its input, a step's end to the
    step's checkpoint, and each step's new messages are what its checkpoint adds to it."""
    conversation: list[dict[str, Any]] = []
    step_input: list[dict[str, Any]] | None = None  # the startRun input, in the step that began the run
    whole: list[dict[str, Any]] = []
    for event in events:
        if event.type not in perstack_layout.RUN_EVENT_TYPES or event.step_number is None:
            continue
        if misfit(event) and event.type in STEP_ENDING_EVENTS:
            continue  # its checkpoint is missing or damaged: the store's reader named it already
        data = event.to_dict()
        if isinstance(event, StartRun):
            start = event.initial_checkpoint
            if not start.messages and initial:  # perq's event leaves them to the run's initial checkpoint
                start = start.model_copy(update={"messages": list(initial)})
            data["initialCheckpoint"] = checkpoint_form(start, by_id)
            step_input = _dicts(event.input_messages)
            conversation = [*data["initialCheckpoint"].get("messages", []), *step_input]
        elif isinstance(event, StartGeneration):
            data.pop("messageCount", None)  # perq's stand-in for the messages
            data.setdefault("messages", conversation)
        elif isinstance(event, CallDelegate):
            calls = event.calls
            if calls:  # both of Perstack's formats: one `toolCall`, later a `toolCalls` list
                data["toolCall"] = calls[0].to_dict()
                data["toolCalls"] = _dicts(calls)
        elif isinstance(event, StepEnd):
            end = forms.get(event.checkpoint.id) or checkpoint_form(event.checkpoint, by_id)
            data["checkpoint"] = end
            data["step"] = _whole_step(event.step, end, conversation, step_input)
            if isinstance(event, ContinueToNextStep) and event.next_checkpoint is not None:
                following = event.next_checkpoint
                data["nextCheckpoint"] = {**end, "id": following.id, "stepNumber": following.step_number}
            conversation = list(end.get("messages") or [])
            step_input = None
        whole.append(data)
    return whole


def _dicts(models: Sequence[PerqModel]) -> list[dict[str, Any]]:
    return [m.to_dict() for m in models]


def _whole_step(
    step: Step | None,
    end: dict[str, Any],
    conversation: list[dict[str, Any]],
    step_input: list[dict[str, Any]] | None,
) -> dict[str, Any]:
    """The step's record with what perq's stored form leaves to the checkpoint and the run put back."""
    data = step.to_dict() if step is not None else {}
    if step is None or not step.new_messages:
        data["newMessages"] = (end.get("messages") or [])[len(conversation) :]
    if step_input is not None and (step is None or step.input_messages is None):
        data["inputMessages"] = step_input
    if end.get("partialToolResults") and (step is None or step.partial_tool_results is None):
        data["partialToolResults"] = end["partialToolResults"]
    return data
