"""`python -m bench [--only NAME] [--json] [--profile DIR]`: run the figures and print the table."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench.common import Row, bench_session, error_row
from bench.figures import FIGURES


def mcp_rows() -> list[Row] | None:
    """The MCP skill figures, when bench/mcp_skill.py (written separately) is present."""
    try:
        mcp_skill = importlib.import_module("bench.mcp_skill")
    except ModuleNotFoundError as e:
        if e.name != "bench.mcp_skill":
            raise  # present but broken: its row says so
        return None
    rows: list[Row] = []
    for raw in mcp_skill.measure():
        rows.append(
            Row(
                figure=str(raw["figure"]),
                value=raw.get("value"),
                unit=str(raw.get("unit", "")),
                goal=str(raw.get("goal", "")),
                holds=raw.get("holds"),
                detail=str(raw.get("detail", "")),
            )
        )
    return rows


def format_value(row: Row) -> str:
    if row.value is None:
        return "error" if row.holds is False else "-"
    return f"{row.value:.2f} {row.unit}".strip()


def verdict(row: Row) -> str:
    if row.value is None and row.holds is False:
        return "ERROR"
    return {True: "yes", False: "NO", None: "-"}[row.holds]


def print_table(rows: list[Row]) -> None:
    table = [("figure", "value", "goal", "holds", "detail")]
    table += [(r.figure, format_value(r), r.goal, verdict(r), r.detail) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(4)]
    for n, line in enumerate(table):
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line[:4])) + "  " + line[4])
        if n == 0:
            print("  ".join("-" * w for w in widths) + "  " + "-" * 6)


GAUGE_LOOP = 2_000_000


def cpu_gauge_ms() -> float:
    """How long this machine takes right now for a fixed loop of Python additions, best of 3 (ms). Why:
    on a shared VM the host's other tenants slow every process alike, which the load average does not show
    (it counts only this machine's runnable tasks); the figures that are times against an ideal
    (concurrency) move with it, and the ratios with it whenever their two sides run at different moments."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        total = 0
        for i in range(GAUGE_LOOP):
            total += i
        best = min(best, time.perf_counter() - start)
    return round(best * 1000, 1)


CREATE_FILES = 100


def file_create_us(root: Path) -> float | None:
    """How long creating an empty file takes right now where the stores live, mean of `CREATE_FILES` (µs),
    in a folder of its own (kept till the run's scratch goes: a removal is what slows creation); None when
    no file can be made there (the figures say why). Why: on ext4 without a journal (this project's VMs)
    every file created scans past the inodes freed in the last 1 to 6 minutes, and a step creates one file
    (its checkpoint); settled, this reads tens of µs, within minutes of a removal of thousands of files
    (a test run's, another bench run's) hundreds, and the figures that write stores read worse with it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        folder = Path(tempfile.mkdtemp(prefix="create-gauge-", dir=root))
        start = time.perf_counter()
        for i in range(CREATE_FILES):
            os.close(os.open(folder / f"f{i}", flags, 0o644))
    except OSError:
        return None
    return round((time.perf_counter() - start) / CREATE_FILES * 1e6, 1)


def _us(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f} µs"


def main(argv: list[str] | None = None) -> int:
    names = [*FIGURES, "mcp"]
    parser = argparse.ArgumentParser(prog="python -m bench", description="perq's benchmark figures")
    parser.add_argument("--only", choices=names, help="run one figure")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        default=os.environ.get("PERQ_BENCH_PROFILE"),
        help="run every worker under cProfile and write DIR/<figure>-<worker>.prof (env PERQ_BENCH_PROFILE)",
    )
    parser.add_argument(
        "--tmpdir",
        metavar="DIR",
        help="where the scratch stores live (default: the system's temp folder); e.g. /dev/shm to take "
        "the disk out of the figures",
    )
    args = parser.parse_args(argv)
    profile_dir = Path(args.profile).resolve() if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)

    rows: list[Row] = []
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    gauge_before = cpu_gauge_ms()
    chosen = [args.only] if args.only else names
    gauges: dict[str, float] = {}  # the CPU gauge as each figure began: how fast the machine ran for it
    creates: dict[str, float | None] = {}  # the file creation gauge as each figure began
    with bench_session(profile_dir, args.tmpdir) as bench:
        for name in chosen:
            gauges[name] = gauge_before if name == chosen[0] else cpu_gauge_ms()
            creates[name] = file_create_us(bench.root)
            if not args.json:
                gauged = f"CPU gauge {gauges[name]:.0f} ms, file creation {_us(creates[name])}"
                print(f"running {name} ({gauged}) ...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            try:
                if name == "mcp":
                    found = mcp_rows()
                    if found is None:
                        if args.only:
                            rows.append(error_row("mcp", "", "bench/mcp_skill.py is not present"))
                        continue
                    rows.extend(found)
                else:
                    rows.extend(FIGURES[name][0](bench))
            except Exception as e:  # one broken figure must not hide the others
                if not args.json:
                    traceback.print_exc()
                _, title, goal = FIGURES.get(name, (None, name, ""))
                rows.append(error_row(title, goal, str(e)))
            finally:
                bench.stop_all()
                bench.flush()
            if not args.json:
                print(f"  {name}: {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
        create_after = file_create_us(bench.root)
    total = time.monotonic() - started
    # other work on the machine moves every figure: the load average says how quiet the run was
    load = (round(load_before, 2), round(os.getloadavg()[0], 2))
    gauge = (gauge_before, cpu_gauge_ms())
    if args.json:
        out: dict[str, Any] = {
            "rows": [r.to_dict() for r in rows],
            "seconds": round(total, 1),
            "cpus": os.cpu_count(),
            "loadAverage": {"start": load[0], "end": load[1]},
            "cpuGaugeMs": {"start": gauge[0], "end": gauge[1], "byFigure": gauges},
            "fileCreateUs": {"start": creates[chosen[0]], "end": create_after, "byFigure": creates},
        }
        print(json.dumps(out, indent=2))
    else:
        print_table(rows)
        print(
            f"\n{len(rows)} rows in {total:.0f} s on {os.cpu_count()} CPUs; "
            f"1-minute load average {load[0]:.2f} at start, {load[1]:.2f} at end; "
            f"CPU gauge ({GAUGE_LOOP:,} Python additions, best of 3) {gauge[0]:.0f} ms at start, "
            f"{gauge[1]:.0f} ms at end; file creation (an empty file where the stores live, mean of "
            f"{CREATE_FILES}) {_us(creates[chosen[0]])} at start, {_us(create_after)} at end"
        )
    return 0 if all(r.holds is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
