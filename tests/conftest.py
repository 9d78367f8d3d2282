"""Fixtures: a private Redis for the whole session, and per test a fresh perq installation
(tests/support/harness.py) whose steps run in-process (`local`) or in real processes on it (`perq`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from shared.queue.broker import ArqRedis, open_pool
from tests.support.harness import PERQ, Perq, script_toml
from tests.support.localredis import LocalRedis

# test modules import the harness from here too
__all__ = ["PERQ", "Perq", "script_toml"]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedis]:
    """A redis-server of our own, so the suite never depends on (or disturbs) one already running."""
    with LocalRedis() as server:
        yield server


@pytest.fixture
async def redis(redis_server: LocalRedis) -> AsyncIterator[ArqRedis]:
    """A client of the suite's Redis, as the producer and workers open one."""
    pool = await open_pool(redis_server.url, "unused")
    try:
        yield pool
    finally:
        await pool.aclose()


@pytest.fixture
def local(tmp_path: Path) -> Perq:
    """A fresh installation whose steps run in-process: no Redis, no processes."""
    (tmp_path / "perstack").mkdir()
    return Perq(root=tmp_path)


@pytest.fixture
def perq(tmp_path: Path, redis_server: LocalRedis, request: pytest.FixtureRequest) -> Iterator[Perq]:
    """A fresh installation whose steps run in real worker processes on the session's Redis."""
    queue = f"perq:test:{request.node.name}:{time.monotonic_ns()}"
    p = Perq(root=tmp_path, redis=redis_server, queue=queue)
    (tmp_path / "perstack").mkdir()
    yield p
    p.stop_workers()
