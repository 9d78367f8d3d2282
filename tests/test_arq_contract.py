"""What perq uses of arq beyond its documented API still holds, for every arq minor perq supports.

`worker/queue/arq_private.py` lists those names (ARQ_PRIVATE). Each supported minor's wheel is fetched once
(`pip download`, cached under pytest's cache) and the list is checked in a subprocess that imports that arq
instead of the installed one; the installed arq is checked in-process, without a download. The last test
keeps the list honest: every attribute perq's Worker subclass reads of arq's Worker must be on it.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from worker.queue.arq_private import ARQ_PRIVATE, arq_mismatches, sample_worker

ROOT = Path(__file__).resolve().parent.parent
# the minors `arq>=0.26,<0.29` in pyproject.toml admits
SUPPORTED_MINORS = ("0.26", "0.27", "0.28")
PIP_DOWNLOAD = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]

CHECK = """
import json, arq
from worker.queue.arq_private import arq_mismatches, sample_worker
problems = arq_mismatches(sample_worker())
print(json.dumps({"version": str(arq.VERSION), "file": arq.__file__, "problems": problems}))
"""


def _wheel(cache_dir: Path, minor: str) -> Path:
    """The newest wheel of this arq minor, downloaded once into the cache (skips if PyPI is unreachable)."""
    folder = cache_dir / minor
    found = sorted(folder.glob("arq-*.whl"))
    if found:
        return found[-1]
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [*PIP_DOWNLOAD, "-d", str(folder), f"arq=={minor}.*"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    found = sorted(folder.glob("arq-*.whl"))
    if done.returncode != 0 or not found:
        pytest.skip(f"cannot download arq {minor}.* to check it (pip: {done.stderr.strip()[-300:]})")
    return found[-1]


@pytest.mark.parametrize("minor", SUPPORTED_MINORS)
def test_each_supported_arq_minor_has_what_perq_relies_on(minor: str, request: pytest.FixtureRequest) -> None:
    wheel = _wheel(Path(request.config.cache.mkdir("arq-wheels")), minor)
    # a pure-Python wheel imports from the zip itself; it comes before the installed arq on the path
    env = {"PYTHONPATH": f"{wheel}:{ROOT}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["version"].startswith(minor + "."), report
    assert str(wheel) in report["file"], f"the subprocess imported {report['file']}, not {wheel}"
    assert report["problems"] == [], f"arq {report['version']}: {report['problems']}"


def test_the_installed_arq_has_what_perq_relies_on() -> None:
    assert arq_mismatches(sample_worker()) == []


def test_a_change_in_arq_is_reported_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import arq.constants
    import arq.worker

    monkeypatch.delattr(arq.worker.Worker, "record_health")
    monkeypatch.setattr(arq.constants, "in_progress_key_prefix", "arq:running:")
    problems = arq_mismatches(sample_worker())
    assert any(p.startswith("arq.worker:Worker.record_health") for p in problems), problems
    assert any(p.startswith("arq.constants:in_progress_key_prefix") for p in problems), problems


def test_every_arq_worker_attribute_perq_uses_is_pinned() -> None:
    """`self.<name>` in perq's Worker subclass where arq's Worker has `name`: pinned, or a clash."""
    source = (ROOT / "worker" / "queue" / "worker.py").read_text()
    tree = ast.parse(source)
    subclass = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "PerqWorker")
    used, own = set(), set()
    for node in ast.walk(subclass):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            (own if isinstance(node.ctx, ast.Store) else used).add(node.attr)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            own.add(node.name)
    arqs = set(dir(sample_worker()))
    pinned = {pin.path.rpartition(".")[2] for pin in ARQ_PRIVATE if pin.path.startswith("arq.worker:Worker.")}
    overridden = {"main"}  # perq's own, but arq calls it: pinned as well
    unpinned = sorted(((used | overridden) & arqs) - (own - overridden) - pinned)
    assert unpinned == [], f"add these to ARQ_PRIVATE (worker/queue/arq_private.py): {unpinned}"
    # a name perq sets that arq's Worker has too would change arq's behaviour behind its back, unless it is
    # pinned (arq's job counters, which perq's own run of a step keeps for arq's health check)
    clashes = sorted(n for n in (own - overridden - pinned) & arqs if not n.startswith("__"))
    assert clashes == [], f"perq's Worker subclass overwrites arq's {clashes}: rename them"
