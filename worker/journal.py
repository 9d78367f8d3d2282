"""Model answers journaled beside the queue before any tool call that may change anything runs, and before
the step commits.

A step that dies after the model answered but before its checkpoint is run again; the journal gives it
the same answers, so the model is not asked (and paid) twice and the re-run takes the same path. The
answers live beside the step's queue entry (Redis), as durable as the step itself, and are forgotten
when the step hands over.
"""

from __future__ import annotations

import asyncio
import json

from shared.models import ThinkingPart, Usage
from worker.loop import AnswerJournal, StepInterrupted
from worker.models.contract import GeneratedToolCall, GenerationResult
from worker.step_queue import StepQueue


def answer_key(run_id: str, step_number: int, n: int) -> str:
    return f"perq:answer:{run_id}:{step_number}:{n}"


class QueueAnswerJournal(AnswerJournal):
    def __init__(self, queue: StepQueue, run_id: str, step_number: int, first_attempt: bool) -> None:
        self.queue, self.run_id, self.step_number = queue, run_id, step_number
        self.first_attempt = first_attempt
        self.keys: list[str] = []  # the answers recorded: forgotten when the step hands over
        self._saving: list[asyncio.Future[None]] = []

    async def load(self, n: int) -> GenerationResult | None:
        if self.first_attempt:  # nothing can have been recorded before the first attempt
            return None
        try:
            data = await self.queue.load_answer(answer_key(self.run_id, self.step_number, n))
        except Exception as e:
            raise StepInterrupted(f"cannot read the journal: {e}") from e
        if data is None:
            return None
        raw = json.loads(data)
        self.keys.append(answer_key(self.run_id, self.step_number, n))
        return GenerationResult(
            text=raw.get("text"),
            thinking=[ThinkingPart.model_validate(t) for t in raw.get("thinking", [])],
            tool_calls=[GeneratedToolCall(**c) for c in raw["toolCalls"]],
            finish_reason=raw["finishReason"],
            usage=Usage.model_validate(raw["usage"]),
        )

    async def begin(self, n: int, result: GenerationResult) -> None:
        saving = asyncio.ensure_future(self.save(n, result))
        # a step cancelled meanwhile never awaits it: its failure is then nobody's to report
        saving.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._saving.append(saving)
        await asyncio.sleep(0)  # a turn of the loop: the save asks for its command in the next batch in it

    async def recorded(self) -> None:
        while self._saving:  # each let go once recorded: one that fails or is cut short is `abandon`'s
            await self._saving[0]
            self._saving.pop(0)

    def abandon(self) -> None:
        for one in self._saving:
            one.cancel()
        self._saving = []

    async def save(self, n: int, result: GenerationResult) -> None:
        raw = {
            "text": result.text,
            "thinking": [t.to_dict() for t in result.thinking],
            "toolCalls": [{"id": c.id, "tool_name": c.tool_name, "args": c.args} for c in result.tool_calls],
            "finishReason": result.finish_reason,
            "usage": result.usage.to_dict(),
        }
        key = answer_key(self.run_id, self.step_number, n)
        try:
            await self.queue.save_answer(key, json.dumps(raw).encode())
        except Exception as e:  # without the record nothing that changes anything runs, nothing commits
            raise StepInterrupted(f"cannot journal the answer: {e}") from e
        self.keys.append(key)
