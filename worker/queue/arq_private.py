"""What perq relies on of arq beyond its documented API, in one list, and the check of it.

arq is in maintenance: perq wraps it rather than patching it, and every arq name perq uses that arq's
documentation does not promise (the Worker's internals, its key names, its job format) is pinned here.
The worker checks the list when it starts, so an arq release that changed one fails at start-up with the
names, not later in a step; `tests/test_arq_contract.py` checks it against every supported arq minor.

This module imports arq only inside its functions, so the test can point it at another arq.
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Pin:
    """One arq name perq relies on: `module:qualified.name`, the kind of thing it must be, and why."""

    path: str
    kind: str  # "async method", "method", "instance attribute", "function", "constant"
    why: str
    params: tuple[str, ...] = ()  # for callables: the parameter names perq passes, in order (no self)
    type: str = ""  # for attributes and constants: the name of the value's type
    value: Any = None  # for constants: the value perq's Redis keys and stored data assume


ARQ_PRIVATE: tuple[Pin, ...] = (
    Pin("arq.worker:Worker.main", "async method", "perq's poll loop replaces it; async_run runs it"),
    Pin("arq.worker:Worker.record_health", "async method", "writes arq's health-check key from perq's loop"),
    Pin(
        "arq.worker:Worker.tasks",
        "instance attribute",
        "perq's running steps: arq's signal handlers cancel them, its drain and close() wait for them",
        type="dict",
    ),
    Pin(
        "arq.worker:Worker.allow_pick_jobs",
        "instance attribute",
        "set false by arq's SIGTERM drain: perq's loop then takes no more steps",
        type="bool",
    ),
    Pin(
        "arq.worker:Worker.jobs_complete",
        "instance attribute",
        "perq's own run of a step counts it where arq's health check reads it",
        type="int",
    ),
    Pin(
        "arq.worker:Worker.jobs_failed",
        "instance attribute",
        "perq's own run of a step counts it where arq's health check reads it",
        type="int",
    ),
    Pin(
        "arq.worker:Worker.jobs_retried",
        "instance attribute",
        "perq's own run of a step counts it where arq's health check reads it",
        type="int",
    ),
    Pin(
        "arq.jobs:deserialize_job_raw",
        "function",
        "perq runs its steps itself and reads arq's job format (jobs enqueue_job wrote included)",
        params=("r",),
    ),
    Pin(
        "arq.constants:retry_key_prefix",
        "constant",
        "a step's try counter is arq's, counted by the pick-up script and deleted when it finishes",
        type="str",
        value="arq:retry:",
    ),
    Pin(
        "arq.jobs:serialize_job",
        "function",
        "builds a step's job for the hand-over's own enqueue, as enqueue_job would",
        params=("function_name", "args", "kwargs", "job_try", "enqueue_time_ms", "serializer"),
    ),
    Pin(
        "arq.constants:job_key_prefix",
        "constant",
        "the hand-over writes arq's job key",
        type="str",
        value="arq:job:",
    ),
    Pin(
        "arq.constants:result_key_prefix",
        "constant",
        "the hand-over refuses an id whose result is kept",
        type="str",
        value="arq:result:",
    ),
    Pin(
        "arq.constants:in_progress_key_prefix",
        "constant",
        "a step's lease is arq's in-progress key",
        type="str",
        value="arq:in-progress:",
    ),
    Pin(
        "arq.constants:health_check_key_suffix",
        "constant",
        "`perq status --queue` shows arq's health check",
        type="str",
        value=":health-check",
    ),
    Pin(
        "arq.constants:expires_extra_ms",
        "constant",
        "the lifetime of a job key the hand-over writes",
        type="int",
        value=86_400_000,
    ),
)


def _resolve(path: str) -> Any:
    """The value at `module:qualified.name`, as the class or module holds it; raises AttributeError."""
    module_name, _, qualified = path.partition(":")
    owner: Any = __import__(module_name, fromlist=["_"])
    *parents, name = qualified.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    return inspect.getattr_static(owner, name)


def _check(pin: Pin, worker: Any) -> str | None:
    """What is wrong with one pin, or None."""
    name = pin.path.rpartition(".")[2].rpartition(":")[2]
    if pin.kind == "instance attribute":
        if worker is None:
            return None
        if not hasattr(worker, name):
            return f"{pin.path}: not set by Worker.__init__"
        if type(getattr(worker, name)).__name__ != pin.type:
            return f"{pin.path}: a {type(getattr(worker, name)).__name__}, not a {pin.type}"
        return None
    try:
        found = _resolve(pin.path)
    except AttributeError:
        return f"{pin.path}: missing"
    if pin.kind == "constant":
        if type(found).__name__ != pin.type or found != pin.value:
            return f"{pin.path}: {found!r}, not {pin.value!r}"
        return None
    function = found.__func__ if isinstance(found, staticmethod | classmethod) else found
    if not inspect.isfunction(function):
        return f"{pin.path}: a {type(found).__name__}, not a {pin.kind}"
    if (pin.kind == "async method") != inspect.iscoroutinefunction(function):
        return f"{pin.path}: {'not ' if pin.kind == 'async method' else ''}a coroutine function"
    names = [p for p in inspect.signature(function).parameters if p != "self"]
    if pin.params and tuple(names[: len(pin.params)]) != pin.params:
        return f"{pin.path}: parameters ({', '.join(names)}), not ({', '.join(pin.params)})"
    return None


def arq_mismatches(worker: Any = None) -> list[str]:
    """What of `ARQ_PRIVATE` the installed arq lacks or changed (empty: all there). Instance attributes are
    checked on `worker`, an arq Worker, when one is given."""
    return [problem for pin in ARQ_PRIVATE if (problem := _check(pin, worker)) is not None]


def sample_worker() -> Any:
    """An arq Worker made without Redis (nothing connects before it runs), to check instance attributes."""
    from arq.worker import Worker, func

    async def noop(ctx: dict[str, Any]) -> None:
        return None

    async def make() -> Any:
        return Worker(functions=[func(noop, name="noop")], handle_signals=False)

    return asyncio.run(make())


def arq_version() -> str:
    import arq

    return str(arq.VERSION)
