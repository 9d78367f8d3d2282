"""Redis forgets, the store remembers: real workers, a real Redis flushed, restarted empty, or failed over
by a real Sentinel, and every job still finishes with exact totals (issue: Redis may forget)."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_sync

from producer.api import Client, RunRequest
from shared.config import RedisSection, Settings, StoreSection
from tests.conftest import PERQ, Perq, script_toml
from tests.support.localredis import LocalRedis, free_port, reachable, redis_server_binary
from tests.test_resilience import CONFIG, SCRIPT, tool_turns, wait_until

# a pass every 2 s here (3 leases by default): the bound on recovery below follows from it and the lease
RECONCILE = {"PERQ_RECONCILE_SECONDS": "2"}
# four steps of tokens 10+i in, 1+i out, then the answer's 3 in, 2 out
USAGE = (10 + 11 + 12 + 3, 1 + 2 + 3 + 2)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[LocalRedis]:
    directory = tmp_path / "redis-data"
    directory.mkdir()
    with LocalRedis(directory=str(directory)) as server:
        yield server


@pytest.fixture
def lone(tmp_path: Path, own_redis: LocalRedis) -> Iterator[Perq]:
    """A perq on a Redis of its own, which the test may flush or restart."""
    perq = Perq(root=tmp_path / "p", redis=own_redis, queue="perq:forgetful")
    perq.storage.mkdir(parents=True)
    perq.write("perstack.toml", CONFIG)
    perq.write("script.toml", script_toml({"worker-test": tool_turns(3, 400)}))
    yield perq
    perq.stop_workers()


def submit(perq: Perq, count: int, query: str = "go", expert: str = "worker-test") -> list[str]:
    """Submit `count` jobs through the producer API in one process (a `perq run` each costs a start-up)."""

    async def go() -> list[str]:
        settings = Settings(
            redis=RedisSection(url=perq.redis.url, queue=perq.queue),
            store=StoreSection(location=str(perq.storage)),
        )
        request = RunRequest(
            expert_key=expert, query=query, provider="script", model="script.toml", cwd=perq.root
        )
        async with Client(settings) as client:
            return [(await client.submit(request)).id for _ in range(count)]

    return asyncio.run(go())


def assert_exact(perq: Perq, jobs: list[str], timeout: float) -> None:
    for job_id in jobs:
        job = perq.wait_job(job_id, timeout=timeout)
        assert job.status == "completed", job
        assert job.total_steps == 4
        assert (job.usage.input_tokens, job.usage.output_tokens) == USAGE
        assert [c.step_number for c in perq.checkpoints(job_id)] == [1, 2, 3, 4]


def in_flight(perq: Perq, jobs: list[str]) -> bool:
    return sum(perq.job(j).total_steps for j in jobs) >= 3


def test_flushed_redis_mid_batch_every_job_completes(lone: Perq) -> None:
    client = redis_sync.Redis.from_url(lone.redis.url)
    jobs = submit(lone, 6)
    worker = lone.start_worker(PERQ_CONCURRENCY="3", **RECONCILE)
    wait_until(lambda: in_flight(lone, jobs), what="work under way")
    # frozen, the worker cannot hand a step on (or reconcile) between the flush and the look that it took
    worker.send_signal(signal.SIGSTOP)
    try:
        client.flushdb()
        assert client.dbsize() == 0
    finally:
        worker.send_signal(signal.SIGCONT)
    flushed_at = time.monotonic()
    # the lease (3 s), one reconcile period (2 s) and what is left of the work (about 3 s on 3 slots) bound it
    assert_exact(lone, jobs, timeout=45)
    print(f"all jobs completed {time.monotonic() - flushed_at:.1f} s after the flush")


def test_redis_restarted_without_persistence_every_job_completes(lone: Perq, own_redis: LocalRedis) -> None:
    jobs = submit(lone, 6)
    lone.start_worker(PERQ_CONCURRENCY="3", **RECONCILE)
    wait_until(lambda: in_flight(lone, jobs), what="work under way")
    own_redis.stop(kill=True)
    for path in Path(own_redis.directory).iterdir():  # its data gone, as a Redis without persistence
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    own_redis.start()
    assert redis_sync.Redis.from_url(own_redis.url).dbsize() == 0
    assert_exact(lone, jobs, timeout=60)


def test_a_cancelled_job_is_not_resurrected(lone: Perq) -> None:
    lone.write("perstack.toml", CONFIG + '[experts.slow]\ninstruction = "Work slowly"\n')
    lone.write("script.toml", script_toml({"worker-test": tool_turns(3, 400), "slow": tool_turns(20, 1500)}))
    client = redis_sync.Redis.from_url(lone.redis.url)
    [cancelled] = submit(lone, 1, "stop me", expert="slow")
    lone.start_worker(**RECONCILE)

    def running() -> bool:
        return bool(client.keys(f"arq:in-progress:perq:{cancelled}:*"))

    wait_until(lambda: len(lone.checkpoints(cancelled)) >= 1 and running(), what="a step in flight")
    assert lone.run("cancel", cancelled).returncode == 0
    at_cancel = len(lone.checkpoints(cancelled))
    [orphan] = submit(lone, 1, "lost")
    client.flushdb()  # the queue and the cancel mark are gone; a step of the cancelled job still runs
    assert_exact(lone, [orphan], timeout=45)  # reconciliation ran, and brought back only this one
    wait_until(lambda: not running(), what="the cancelled job's last step")
    time.sleep(2.5)  # a step handed on without the mark would be running again by now
    assert not running()
    assert lone.job(cancelled).status == "cancelled"
    # the step in flight ends, and at most one it handed on before a pass put the mark back
    assert len(lone.checkpoints(cancelled)) <= at_cancel + 2
    assert client.get(f"perq:cancel:{cancelled}") is not None


def test_recover_dry_run_lists_exactly_the_orphans_then_recovers_them(lone: Perq) -> None:
    lone.write("script.toml", script_toml({"worker-test": tool_turns(1, 0)}))
    client = redis_sync.Redis.from_url(lone.redis.url)
    done, stopped = submit(lone, 2)
    assert lone.run("cancel", stopped).returncode == 0
    lone.burst()
    orphans = sorted(submit(lone, 3, "lost"))
    client.flushdb()
    [waiting] = submit(lone, 1, "queued after the flush")

    quick = lone.env(PERQ_LEASE_SECONDS="1")  # recover waits half a lease between its two looks
    dry = lone.run("recover", "--dry-run", "--json", env=quick)
    assert dry.returncode == 0, dry.stderr
    units = json.loads(dry.stdout)["units"]
    assert sorted(u["jobId"] for u in units) == orphans
    assert {(u["stepNumber"], u["outcome"]) for u in units} == {(1, "would enqueue")}
    assert client.zcard(lone.queue) == 1  # only `waiting`: nothing was enqueued
    text = lone.run("recover", "--dry-run", env=quick)
    assert all(j in text.stdout for j in orphans) and "would re-enqueue 3 steps of 3 jobs" in text.stdout
    assert done not in text.stdout and stopped not in text.stdout and waiting not in text.stdout

    real = lone.run("recover", env=quick)
    assert real.returncode == 0 and "re-enqueued 3 steps of 3 jobs" in real.stdout, real.stdout
    assert client.zcard(lone.queue) == 4
    assert "nothing to recover" in lone.run("recover", env=quick).stdout  # queued now: not orphans any more
    lone.burst()
    for job_id in [*orphans, waiting]:
        assert lone.job(job_id).status == "completed"
    assert lone.job(stopped).status == "cancelled"


def test_a_bad_sentinel_url_is_one_line_and_exit_2(lone: Perq) -> None:
    env = lone.env(PERQ_REDIS_URL="redis+sentinel://127.0.0.1:26379")
    for args in (("run", "worker-test", "go", *SCRIPT), ("recover",), ("worker", "--burst")):
        result = lone.run(*args, env=env)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "PERQ_REDIS_URL" in lines[0] and "master's name" in lines[0], lines
    assert not (lone.storage / "jobs").exists()  # the refused `perq run` wrote nothing


def test_followers_survive_a_redis_restarted_empty(lone: Perq, own_redis: LocalRedis) -> None:
    def start(*args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*PERQ, *args],
            cwd=lone.root,
            env=lone.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    waiter = start("run", "worker-test", "go", *SCRIPT, "--wait", "--json")
    wait_until(lambda: bool(lone.store.list_jobs().jobs), what="the job record")
    job_id = lone.store.list_jobs().jobs[0].id
    follower = start("log", "--follow", "--json", "--job", job_id)
    watcher = start("status", "--queue", "--watch")
    time.sleep(1.0)  # the followers are reading the stream
    lone.start_worker(**RECONCILE)
    wait_until(lambda: lone.job(job_id).total_steps >= 1, what="a step done")
    own_redis.stop(kill=True)
    for path in Path(own_redis.directory).iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    time.sleep(1.0)
    own_redis.start()

    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, err
    assert json.loads(out)["status"] == "completed"
    out, err = follower.communicate(timeout=30)
    assert follower.returncode == 0, err
    assert "lost the event stream" in err
    *lines, last = out.strip().splitlines()
    assert json.loads(last)["status"] == "completed"
    printed = [json.loads(line)["id"] for line in lines]
    # every event of the job, shown once: what the stream lost came from the store
    assert sorted(printed) == sorted(e.id for e in lone.events(job_id))
    assert watcher.poll() is None  # the live queue view outlived the outage
    watcher.send_signal(signal.SIGINT)
    assert watcher.wait(10) == 0


# --- a real Sentinel set-up on loopback -----------------------------------------------------------


class SentinelSetup:
    """One master, one replica, three sentinels: all redis-server processes on loopback ports."""

    def __init__(self, root: Path) -> None:
        binary = redis_server_binary()
        assert binary is not None
        self.binary, self.root = binary, root
        self.master_port, self.replica_port = free_port(), free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/perqmaster/0"

    def _start(self, name: str, *args: str) -> None:
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        common = ("--bind", "127.0.0.1", "--dir", str(folder), "--save", "", "--loglevel", "warning")
        self.procs[name] = subprocess.Popen(
            [self.binary, *args, *common], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def start(self) -> SentinelSetup:
        self._start("master", "--port", str(self.master_port))
        self._start(
            "replica", "--port", str(self.replica_port), "--replicaof", "127.0.0.1", str(self.master_port)
        )
        for n, port in enumerate(self.sentinel_ports):
            conf = self.root / f"sentinel-{n}.conf"
            conf.write_text(
                f"port {port}\n"
                f"sentinel monitor perqmaster 127.0.0.1 {self.master_port} 2\n"
                "sentinel down-after-milliseconds perqmaster 1000\n"
                "sentinel failover-timeout perqmaster 4000\n"
                "sentinel parallel-syncs perqmaster 1\n"
            )
            self._start(f"sentinel-{n}", str(conf), "--sentinel")
        ports = [self.master_port, self.replica_port, *self.sentinel_ports]
        wait_until(lambda: all(reachable(f"redis://127.0.0.1:{p}") for p in ports), what="the set-up")
        replica = redis_sync.Redis(port=self.replica_port)
        wait_until(lambda: replica.info("replication")["master_link_status"] == "up", what="replication")
        sentinel = redis_sync.Redis(port=self.sentinel_ports[0])
        wait_until(
            lambda: (
                sentinel.info("sentinel")["master0"]["slaves"] == 1
                and sentinel.info("sentinel")["master0"]["sentinels"] == 3
            ),
            what="the sentinels to see each other",
        )
        return self

    def master(self) -> int:
        sentinel = redis_sync.Redis(port=self.sentinel_ports[0])
        return int(sentinel.sentinel_get_master_addr_by_name("perqmaster")[1])

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSetup]:
    setup = SentinelSetup(tmp_path / "redis").start()
    try:
        yield setup
    finally:
        setup.stop()


def test_sentinel_failover_mid_batch_every_job_completes(tmp_path: Path, sentinels: SentinelSetup) -> None:
    # every perq process of this test (producer, workers) reaches Redis through the sentinels
    perq = Perq(root=tmp_path / "p", redis=sentinels, queue="perq:failover")  # type: ignore[arg-type]
    perq.storage.mkdir(parents=True)
    try:
        perq.write("perstack.toml", CONFIG)
        perq.write("script.toml", script_toml({"worker-test": tool_turns(3, 400)}))
        jobs = submit(perq, 6)
        perq.start_worker(PERQ_CONCURRENCY="3", **RECONCILE)
        perq.start_worker(PERQ_CONCURRENCY="3", **RECONCILE)
        wait_until(lambda: in_flight(perq, jobs), what="work under way")
        assert sentinels.master() == sentinels.master_port
        assert reachable(sentinels.url)  # what `./dev example` asks of PERQ_REDIS_URL
        sentinels.procs["master"].send_signal(signal.SIGKILL)
        wait_until(lambda: sentinels.master() == sentinels.replica_port, timeout=30, what="the failover")
        assert_exact(perq, jobs, timeout=60)
    finally:
        perq.stop_workers()
