"""perq's Python API for producers: submit new jobs and continuations, read status, cancel.

Everything that can be checked locally is checked before anything is written: a refused request leaves
no job behind. Async functions are the API; `*_sync` wrappers serve scripts and the CLI.

    from producer.api import RunRequest, submit_sync
    job = submit_sync(RunRequest(expert_key="hello", query="Hi", provider="script", model="script.toml"))
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field

from shared import job_record
from shared.config import (
    DEFAULT_MODEL,
    DEFAULT_PROVIDER,
    PROVIDERS,
    ConfigError,
    PerstackConfig,
    Settings,
    build_experts,
    find_config,
    load_config,
)
from shared.job_record import BUSY_STATUSES
from shared.models import (
    DEFAULT_LIMITS,
    Checkpoint,
    Expert,
    InteractiveToolCallResult,
    Job,
    ProviderConfig,
    ReasoningBudget,
    RunInput,
    RunLimits,
    RunSetting,
    TextPart,
    ToolResult,
    check_id,
    checkpoint_id,
    new_id,
    now_ms,
)
from shared.queue import CANCEL_MARK_TTL_S, StepTask, cancel_key
from shared.store import JobStore

REASONING_WORDS = ("none", "minimal", "low", "medium", "high")
SECRET_HEADER = re.compile(r"auth|key|token|secret|cookie|password", re.IGNORECASE)


class RequestError(ConfigError):
    """A request perq refuses; nothing was written (exit 2 in the CLI)."""


class QueueUnavailable(Exception):
    """Redis could not be reached; nothing was left behind (exit 1 in the CLI)."""


class RunRequest(RunLimits):
    """A submission: a new job, or a continuation of one. Its limits (`max_steps`, `max_retries`, `timeout`)
    and the other unset fields fall back to perstack.toml, then to perq's defaults."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently dropped

    expert_key: str
    query: str
    interactive: bool = False  # the query answers the pending interactive tool call (-i)
    # which job: a new one (with this id, or a fresh one), or a continuation of one
    job_id: str | None = None
    continue_latest: bool = False
    continue_job: str | None = None
    resume_from: str | None = None
    # where it runs and on what
    cwd: Path = Field(default_factory=Path.cwd)
    config: str | None = None
    workspace: str | None = None
    provider: str | None = None
    model: str | None = None
    reasoning_budget: str | int | None = None

    def replaced(self, **changes: Any) -> RunRequest:
        """This request with some fields changed, validated again."""
        return RunRequest.model_validate(self.model_dump() | changes)


def parse_reasoning_budget(value: str | int | None) -> ReasoningBudget | None:
    if value is None or isinstance(value, int):
        return value
    word = value.strip().lower()
    if word in REASONING_WORDS:
        return word  # type: ignore[return-value]
    if word.isdigit():
        return int(word)
    raise RequestError(f"invalid reasoning budget {value!r}: use none, minimal, low, medium, high or tokens")


def _provider(request: RunRequest, config: PerstackConfig) -> tuple[ProviderConfig, str]:
    name = (
        request.provider or (config.provider.provider_name if config.provider else None) or DEFAULT_PROVIDER
    )
    if name not in PROVIDERS:
        raise RequestError(f"unknown provider {name!r}: use one of {', '.join(PROVIDERS)}")
    setting: dict[str, Any] = (
        dict(config.provider.setting) if config.provider and not request.provider else {}
    )
    model = request.model or config.model or DEFAULT_MODEL
    if name == "script":
        script = (request.cwd / Path(model).expanduser()).resolve()
        if not script.is_file():
            raise RequestError(f"script file not found: {script}")
        model = str(script)
    headers = setting.get("headers") or None
    secret = next((h for h in headers or {} if SECRET_HEADER.search(h)), None)
    if secret is not None:
        raise RequestError(
            f"provider header {secret!r} looks like a credential: run settings are stored, so keys stay in "
            "the workers' environment (ANTHROPIC_API_KEY, OPENAI_API_KEY, ...)"
        )
    deployment_urls = setting.get("useDeploymentBasedUrls")
    provider = ProviderConfig(
        provider_name=name,
        base_url=setting.get("baseUrl"),
        organization=setting.get("organization"),
        project=setting.get("project"),
        headers=headers,
        resource_name=setting.get("resourceName"),
        api_version=setting.get("apiVersion"),
        use_deployment_based_urls=deployment_urls if isinstance(deployment_urls, bool) else None,
        region=setting.get("region"),
        location=setting.get("location"),
    )
    return provider, model


def _workspace(request: RunRequest) -> str:
    path = (request.cwd / Path(request.workspace or ".").expanduser()).resolve()
    if not path.is_dir():
        raise RequestError(f"workspace is not a directory: {path}")
    return str(path)


@dataclass
class Plan:
    """Everything a submission will write, computed before anything is written."""

    job: Job
    setting: RunSetting
    initial: Checkpoint
    new_job: bool


def plan_submission(request: RunRequest, store: JobStore) -> Plan:
    if request.resume_from and not request.continue_job:
        raise RequestError("--resume-from requires --continue-job")
    if request.interactive and not (request.continue_job or request.continue_latest):
        raise RequestError("-i answers a waiting job: use it with --continue-job JOB (or --continue)")
    config_path = find_config(request.config, request.cwd)
    if config_path is None:
        raise RequestError(f"no perstack.toml found in {request.cwd} or its parents (use --config)")
    config = load_config(config_path)
    experts = build_experts(config)
    if request.expert_key not in experts:
        known = ", ".join(sorted(experts)) or "none"
        raise RequestError(f"expert {request.expert_key!r} not found in {config_path} (experts: {known})")
    provider, model = _provider(request, config)
    budget = parse_reasoning_budget(request.reasoning_budget)
    budget = budget if budget is not None else (config.reasoning_budget or "low")
    _check_limits(request, "--max-steps", "--max-retries", "--timeout")
    _check_limits(config, *(f"{config_path}: {key}" for key in ("maxSteps", "maxRetries", "timeout")))
    said = request.over(config)  # the job record keeps a max that neither says as None
    limits = said.over(DEFAULT_LIMITS)
    workspace = _workspace(request)

    continuing = request.continue_job is not None or request.continue_latest
    if continuing:
        if request.job_id:
            raise RequestError("--job-id names a new job; to continue one use --continue-job alone")
        job, start = _continuation_start(request, store)
    else:
        job_id = check_id(request.job_id, "job id") if request.job_id else new_id()
        if request.job_id and store.job_exists(job_id):
            raise RequestError(f"job {job_id} already exists; continue it with --continue-job {job_id}")
        job = Job(
            id=job_id,
            status="queued",
            coordinator_expert_key=request.expert_key,
            max_steps=said.max_steps,
            started_at=now_ms(),
        )
        start = None

    run_id = new_id()
    run_input = _run_input(request, start)
    setting = RunSetting(
        model=model,
        provider_config=provider,
        job_id=job.id,
        run_id=run_id,
        expert_key=request.expert_key,
        input=run_input,
        experts=experts,
        reasoning_budget=budget,
        workspace=workspace,
        **limits.model_dump(),
    )
    initial = _initial_checkpoint(setting, experts[request.expert_key], start)
    job = job_record.submitted(job, epoch=setting.epoch, start=start)
    return Plan(job=job, setting=setting, initial=initial, new_job=not continuing)


def _check_limits(limits: RunLimits, steps: str, retries: str, timeout: str) -> None:
    """Refuse limits no run could keep: fewer than one step, negative retries, a timeout under 1 ms."""
    for name, value, least in (
        (steps, limits.max_steps, 1),
        (retries, limits.max_retries, 0),
        (timeout, limits.timeout, 1),
    ):
        if value is not None and value < least:
            raise RequestError(
                f"{name} must be {'at least 0' if least == 0 else 'a positive number'}, got {value}"
            )


def _continuation_start(request: RunRequest, store: JobStore) -> tuple[Job, Checkpoint]:
    if request.continue_job:
        job_id = check_id(request.continue_job, "job id")
        job = store.load_job(job_id)
        if job is None:
            raise RequestError(f"job {job_id} not found in {store.backend.describe('jobs')}")
    else:
        latest = store.latest_job()
        if latest is None:
            raise RequestError("no job to continue: the store has no jobs")
        job = latest
    if job.status in BUSY_STATUSES:
        raise RequestError(f"job {job.id} is {job.status}; wait for it to stop before continuing it")
    if job.coordinator_expert_key != request.expert_key:
        raise RequestError(
            f"job {job.id} belongs to expert {job.coordinator_expert_key!r}, not {request.expert_key!r}"
        )
    checkpoint_id = (
        check_id(request.resume_from, "checkpoint id")
        if request.resume_from
        else store.head_checkpoint_id(job)
    )
    if checkpoint_id is None:
        raise RequestError(f"No checkpoint found for job {job.id}")
    start = store.load_checkpoint(job.id, checkpoint_id)
    if start is None:
        raise RequestError(f"checkpoint {checkpoint_id} not found in job {job.id}")
    if start.delegated_by is not None or start.expert.key != job.coordinator_expert_key:
        raise RequestError(
            f"checkpoint {checkpoint_id} belongs to delegate {start.expert.key!r}; "
            "resume from a checkpoint of the coordinator"
        )
    if request.interactive and start.status != "stoppedByInteractiveTool":
        raise RequestError(f"job {job.id} is not waiting for input (its checkpoint is {start.status})")
    if not request.interactive and start.status == "stoppedByInteractiveTool":
        pending = start.pending_tool_calls or []
        name = pending[0].tool_name if pending else "a tool call"
        raise RequestError(f"job {job.id} is waiting for an answer to {name}: answer it with -i")
    if start.status == "init":
        raise RequestError(f"checkpoint {checkpoint_id} is a run's starting point; it cannot be resumed")
    return job, start


def _run_input(request: RunRequest, start: Checkpoint | None) -> RunInput:
    if request.interactive:
        assert start is not None and start.pending_tool_calls
        # the call perq answers is the first pending one, found by type, not by position among the parts
        call = start.pending_tool_calls[0]
        return RunInput(
            interactive_tool_call_result=InteractiveToolCallResult(
                tool_call_id=call.id, tool_name=call.tool_name, skill_name=call.skill_name, text=request.query
            )
        )
    if start is not None and start.status == "stoppedByDelegate":
        # the job stopped (cancelled, or a delegate hit max steps) while delegates ran: their calls are
        # answered as interrupted, then the new query follows
        results = [
            ToolResult(
                id=t.tool_call_id,
                skill_name=f"delegate/{t.expert.key}",
                tool_name=t.tool_name,
                result=[TextPart(text=INTERRUPTED_DELEGATE)],
            )
            for t in start.delegate_to or []
        ]
        if results:
            first = results[0]
            return RunInput(
                text=request.query,
                interactive_tool_call_result=InteractiveToolCallResult(
                    tool_call_id=first.id,
                    tool_name=first.tool_name,
                    skill_name=first.skill_name,
                    text=INTERRUPTED_DELEGATE,
                ),
                extra_tool_results=results[1:] or None,
            )
    return RunInput(text=request.query)


INTERRUPTED_DELEGATE = "Delegation interrupted: the job stopped before this delegate finished."


def _initial_checkpoint(setting: RunSetting, expert: Expert, start: Checkpoint | None) -> Checkpoint:
    if start is None:
        return Checkpoint(
            id=checkpoint_id(setting.run_id, 1),
            job_id=setting.job_id,
            run_id=setting.run_id,
            status="init",
            step_number=1,
            expert=expert.ref(),
            context_window_usage=0.0,
        )
    step = start.step_number + 1
    return start.model_copy(
        update={"id": checkpoint_id(setting.run_id, step), "run_id": setting.run_id, "step_number": step}
    )


async def _create_pool_quiet(settings: Settings) -> Any:
    """The queue's pool, or QueueUnavailable at once: a producer wants one fast answer, not retries."""
    from shared.queue.broker import open_pool  # arq is imported only by commands that talk to Redis

    try:
        redis = await open_pool(settings.redis.url, settings.redis.queue)
    except Exception as e:
        raise QueueUnavailable(f"cannot reach Redis at {settings.redis.url}: {e}") from e
    return redis


class Client:
    """A producer's connection to one store and one Redis; reuse it to submit many jobs."""

    def __init__(self, settings: Settings | None = None, store: JobStore | None = None) -> None:
        self.settings = settings or Settings()
        self.store = store or JobStore.open(self.settings.store.location, fsync=self.settings.store.fsync)
        self._redis: Any = None

    async def redis(self) -> Any:
        if self._redis is None:
            self._redis = await _create_pool_quiet(self.settings)
        return self._redis

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def submit(self, request: RunRequest) -> Job:
        """Validate, write the job record (queued) and the run, and enqueue its first step."""
        plan = plan_submission(request, self.store)
        redis = await self.redis()
        lock = f"perq:lock:{plan.job.id}"
        if not plan.new_job and not await redis.set(lock, "1", nx=True, ex=10):
            raise RequestError(f"job {plan.job.id} is being continued by another request")
        try:
            await self._write_and_enqueue(plan, redis)
        finally:
            if not plan.new_job:
                await redis.delete(lock)
        return plan.job

    async def _write_and_enqueue(self, plan: Plan, redis: Any) -> None:
        from shared.queue.broker import enqueue_step

        store = self.store
        previous: Job | None = None
        store.save_run_setting(plan.setting)
        store.save_initial_checkpoint(plan.initial)
        if plan.new_job:
            store.save_job(plan.job, new=True)
        else:
            # under the record's lock, so that a step of the stopped submission still finishing cannot
            # write its older record over this one; planned before the lock was ours, so check again
            def take_over(current: Job) -> Job:
                nonlocal previous
                if current.status in BUSY_STATUSES:
                    raise RequestError(f"job {plan.job.id} is {current.status}; wait for it to stop first")
                previous = current
                return plan.job

            try:
                store.update_job(plan.job.id, take_over)
            except RequestError:
                store.backend.delete_tree(f"jobs/{plan.job.id}/runs/{plan.setting.run_id}")
                raise
        task = StepTask(job_id=plan.job.id, run_id=plan.setting.run_id, step_number=plan.initial.step_number)
        try:
            # a cancel mark stays: it stops runs of earlier submissions only (RunSetting.epoch)
            await enqueue_step(redis, task, self.settings.redis.queue)
        except Exception as e:
            if plan.new_job:
                store.delete_job(plan.job.id)
            else:
                store.backend.delete_tree(f"jobs/{plan.job.id}/runs/{plan.setting.run_id}")
                if previous is not None:
                    restored = previous
                    store.update_job(
                        plan.job.id, lambda now: restored if now.epoch == plan.job.epoch else None
                    )
            raise QueueUnavailable(f"cannot reach Redis at {self.settings.redis.url}: {e}") from e

    async def status(self, job_id: str) -> Job | None:
        """The job record, as the store has it now (None for an unknown job)."""
        return self.store.load_job(check_id(job_id, "job id"))

    async def cancel(self, job_id: str) -> Job:
        """Stop a queued or running job (and its delegates) before its next step; status `cancelled`."""
        job = self.store.load_job(check_id(job_id, "job id"))
        if job is None:
            raise RequestError(f"job {job_id} not found")
        if job.status not in BUSY_STATUSES:
            raise RequestError(f"job {job_id} is {job.status}; only queued or running jobs can be cancelled")
        redis = await self.redis()
        await redis.set(cancel_key(job.id), str(now_ms()), ex=CANCEL_MARK_TTL_S)

        # read again under the record's lock: a step may have written it since
        def stop(current: Job) -> Job:
            if current.status not in BUSY_STATUSES:  # it stopped on its own meanwhile
                raise RequestError(
                    f"job {job_id} is {current.status}; only queued or running jobs can be cancelled"
                )
            return job_record.cancel(current, now=now_ms())

        return self.store.update_job(job.id, stop) or job


def submit_sync(request: RunRequest, settings: Settings | None = None) -> Job:
    async def go() -> Job:
        async with Client(settings) as client:
            return await client.submit(request)

    return asyncio.run(go())


def job_status(job_id: str, settings: Settings | None = None) -> Job | None:
    """The sync twin of `Client.status`: reads the store only, no Redis needed."""
    return JobStore.open((settings or Settings()).store.location).load_job(check_id(job_id, "job id"))
