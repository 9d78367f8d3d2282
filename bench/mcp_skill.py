"""What a step that calls a pooled stdio MCP skill costs, beside a step that calls an in-process base tool.

Two jobs of the same shape run in this process through the worker's Runtime (no Redis, so the figure is
the step itself): each step is one scripted model answer and one tool call, then the checkpoint. One job
calls `readTextFile` (perq's in-process base tool), the other `get_current_time` of mcp-server-time, a real
MCP server from PyPI, over stdio through the worker's McpSkillPool. The server is started once, before
the timed runs, as a worker keeps it; the jobs alternate so that machine noise hits both alike.

The two jobs are made alike in everything but the call: each offers two tools, and the note is padded so
that both tool results are the same length (a step copies and writes the whole conversation, so a longer
result alone would make its steps slower).

    python -m bench.mcp_skill
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import tomli_w

STEPS = 30  # tool-calling steps per job (each job then takes two more steps to finish)
ROUNDS = 5  # alternating runs of each job; the median is reported
# A pooled call is a pipe round trip to a process that is already up: what it adds to a step must be a small
# fraction of the server start the pool keeps off every step. The ratio to a base-tool step is reported, not
# judged: it moves with the cost of perq's own step (which the queue work keeps making cheaper) and with the
# server's own speed (mcp-server-time answers in a few ms of Python), neither of which the pool decides.
START_SHARE_GOAL = 5.0  # percent


def _config() -> dict[str, Any]:
    """Two experts on the bundled base skill, one also on a real stdio MCP server (mcp-server-time)."""

    def base(*pick: str) -> dict[str, Any]:
        return {
            "type": "mcpStdioSkill",
            "command": "npx",
            "packageName": "@perstack/base",
            "pick": list(pick),
        }

    time_server = {
        "type": "mcpStdioSkill",
        "command": sys.executable,
        "args": ["-m", "mcp_server_time", "--local-timezone", "UTC"],
        "pick": ["get_current_time"],
    }
    return {
        "experts": {
            "base": {
                "instruction": "Read the note",
                "skills": {"@perstack/base": base("attemptCompletion", "readTextFile")},
            },
            "mcp": {
                "instruction": "Tell the time",
                "skills": {"@perstack/base": base("attemptCompletion"), "time": time_server},
            },
        }
    }


def _script() -> str:
    """STEPS calls of one tool, then attemptCompletion and the final text, for each expert."""

    def turns(tool: str, args: dict[str, str]) -> dict[str, Any]:
        call = {"toolCalls": [{"toolName": tool, "args": args}]}
        done = {"toolCalls": [{"toolName": "attemptCompletion", "args": {}}]}
        return {"turns": [call] * STEPS + [done, {"text": "done"}]}

    experts = {
        "base": turns("readTextFile", {"path": "note.txt"}),
        "mcp": turns("get_current_time", {"timezone": "UTC"}),
    }
    return tomli_w.dumps({"experts": experts})


class Harness:
    """A scratch perq installation and one worker Runtime with its skill pool, all in this process."""

    def __init__(self, root: Path) -> None:
        from shared.store import JobStore
        from worker.runtime import Runtime
        from worker.skills.mcp.pool import McpSkillPool
        from worker.step_queue import LocalQueue

        self.root = root
        (root / "perstack.toml").write_text(tomli_w.dumps(_config()))
        (root / "script.toml").write_text(_script())
        (root / "note.txt").write_text("note")
        self.store = JobStore.open(str(root / "store"))
        self.pool = McpSkillPool()
        self.queue = LocalQueue()
        self.pending = self.queue.pending
        self.runtime = Runtime(store=self.store, queue=self.queue, pool=self.pool, env=dict(os.environ))

    def pad_note(self, extra: int) -> None:
        note = self.root / "note.txt"
        note.write_text(note.read_text() + "." * max(extra, 0))

    async def run_job(self, expert: str) -> tuple[float, int, str, int | None]:
        """Run one job to its end; returns (seconds, steps, a tool result text, server start ms if any)."""
        from producer.api import RunRequest, plan_submission
        from shared.models import SkillConnected, ToolMessage
        from shared.queue import StepTask

        request = RunRequest(
            expert_key=expert, query="go", provider="script", model="script.toml", cwd=self.root
        )
        plan = plan_submission(request, self.store)
        self.store.save_run_setting(plan.setting)
        self.store.save_initial_checkpoint(plan.initial)
        self.store.save_job(plan.job, new=True)
        self.pending.append(StepTask(job_id=plan.job.id, run_id=plan.setting.run_id, step_number=1))
        started = time.perf_counter()
        last = None
        while self.pending:
            last = await self.runtime.run_step(self.pending.popleft())
        elapsed = time.perf_counter() - started
        job = self.store.load_job(plan.job.id)
        if job is None or job.status != "completed" or last is None:
            raise RuntimeError(
                f"{expert} job ended {job.status if job else 'without a record'}: {job and job.error}"
            )
        sample = next(
            part.contents[0].text  # type: ignore[union-attr]
            for message in last.messages
            if isinstance(message, ToolMessage)
            for part in message.contents
        )
        events, _ = self.store.read_events(plan.job.id, plan.setting.run_id)
        start_ms = next((e.total_duration_ms for e in events if isinstance(e, SkillConnected)), None)
        return elapsed, job.total_steps, sample, start_ms


async def _measure(root: Path) -> list[dict[str, Any]]:
    harness = Harness(root)
    try:
        # Untimed warm-up of both paths (imports, caches); the first MCP job starts the server the pool keeps.
        _, _, note_result, _ = await harness.run_job("base")
        _, _, sample, cold_ms = await harness.run_job("mcp")
        if '"timezone": "UTC"' not in sample or cold_ms is None:
            raise RuntimeError(f"mcp-server-time did not answer as expected: {sample[:200]}")
        harness.pad_note(len(sample) - len(note_result))
        _, _, note_result, _ = await harness.run_job("base")
        base: list[float] = []
        mcp: list[float] = []
        for _ in range(ROUNDS):
            for expert, into in (("base", base), ("mcp", mcp)):
                seconds, steps, _, restarted = await harness.run_job(expert)
                if restarted is not None:
                    raise RuntimeError("the pool started the server again instead of keeping it")
                into.append(seconds / steps)
    finally:
        await harness.pool.close()
    base_ms, mcp_ms = statistics.median(base) * 1000, statistics.median(mcp) * 1000
    ratio = mcp_ms / base_ms
    extra_ms = max(mcp_ms - base_ms, 0.0)
    share = extra_ms / cold_ms * 100
    shape = f"{STEPS + 2} steps/job, median of {ROUNDS} alternating runs, in-process Runtime, no Redis"
    return [
        {
            "figure": "mcp: step with a base-tool call",
            "value": round(base_ms, 3),
            "unit": "ms",
            "goal": "reported",
            "holds": None,
            "detail": f"readTextFile, in-process, {len(note_result)}-char result; {shape}",
        },
        {
            "figure": "mcp: step with a pooled stdio MCP call",
            "value": round(mcp_ms, 3),
            "unit": "ms",
            "goal": "reported",
            "holds": None,
            "detail": f"mcp-server-time get_current_time, {len(sample)}-char result, over stdio, server kept "
            f"by the pool; {shape}",
        },
        {
            "figure": "mcp: pooled MCP step / base-tool step",
            "value": round(ratio, 3),
            "unit": "x",
            "goal": "reported",
            "holds": None,
            "detail": f"extra {mcp_ms - base_ms:.2f} ms per step; one server kept for all runs",
        },
        {
            "figure": "mcp: server start (paid once per worker)",
            "value": float(cold_ms),
            "unit": "ms",
            "goal": "reported",
            "holds": None,
            "detail": "spawn + handshake + tool listing of mcp-server-time (skillConnected totalDurationMs)",
        },
        {
            "figure": "mcp: pooled call's extra cost / server start",
            "value": round(share, 3),
            "unit": "%",
            "goal": f"<= {START_SHARE_GOAL:g} %",
            "holds": share <= START_SHARE_GOAL,
            "detail": f"{extra_ms:.2f} ms per step vs a {cold_ms:g} ms start the pool keeps off every step",
        },
    ]


def measure() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="perq-bench-mcp-") as tmp:
        return asyncio.run(_measure(Path(tmp).resolve()))


def main() -> int:
    rows = measure()
    width = max(len(r["figure"]) for r in rows)
    for r in rows:
        verdict = {True: "yes", False: "NO", None: "-"}[r["holds"]]
        value = f"{r['value']:.2f} {r['unit']}"
        print(f"{r['figure']:<{width}}  {value:>12}  {r['goal']:<8}  {verdict:<4}  {r['detail']}")
    return 0 if all(r["holds"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
