"""What the skill pool needs to know about the step it is serving: where skill events go, and the workspace.

The pool is shared by every step a worker runs, so it cannot hold "the current run". The runtime sets a
`SkillScope` in a context variable at the start of each step; asyncio copies context into the tasks a step
spawns (the concurrent `list_tools` / `call_tool` calls), so the pool reads the scope of the step that is
calling it, and parallel steps never see each other's scope: a shared "current run" would attribute one step's
events to another.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from shared.models import Event


@dataclass
class SkillScope:
    events: list[Event]  # the step's event list (StepRunner.events), persisted with the step
    job_id: str
    run_id: str
    expert_key: str | None = None
    step_number: int | None = None
    workspace: str | None = None  # the working directory of stdio skill processes started for this step

    def emit(self, type_: str, **payload: Any) -> None:
        # Perstack's runtime events carry no expertKey / stepNumber; perq sets them so a re-run step drops
        # the skill events of its failed attempt along with the rest (store.drop_events_from_step).
        event = Event.build(type_, self.job_id, self.run_id, self.expert_key, self.step_number, **payload)
        self.events.append(event)


_current: ContextVar[SkillScope | None] = ContextVar("perq_skill_scope", default=None)


def set_skill_scope(scope: SkillScope | None) -> None:
    """Called by the runtime at the start of a step; the value lives in that step's task context only."""
    _current.set(scope)


def current_skill_scope() -> SkillScope | None:
    return _current.get()
