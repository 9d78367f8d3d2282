"""Settings: every PERQ_* variable lands in its section, bad values are refused in one line naming the
variable, and the README's table and docker-compose.yml name only variables perq reads.

Then the S3 store's re-read of a log that changed under its reader (a fake filesystem, no server)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shared.config import McpSection, Settings, SettingsError, StoreSection, WorkerSection
from shared.store.s3 import S3Backend

ROOT = Path(__file__).resolve().parent.parent

# one value per variable that differs from the default, and the setting it must fill
EXAMPLES: dict[str, tuple[str, str, Any]] = {
    "PERQ_REDIS_URL": ("redis://example:6380/2", "redis.url", "redis://example:6380/2"),
    "PERQ_QUEUE": ("q1", "redis.queue", "q1"),
    "PERQ_STORAGE": ("/srv/store", "store.location", "/srv/store"),
    "PERQ_STORE_FSYNC": ("0", "store.fsync", False),
    "PERQ_S3_ENDPOINT_URL": ("http://minio:9000", "store.s3_endpoint_url", "http://minio:9000"),
    "PERQ_CONCURRENCY": ("7", "worker.concurrency", 7),
    "PERQ_PROCESSES": ("3", "worker.processes", 3),
    "PERQ_POLL_DELAY": ("0.5", "worker.poll_delay", 0.5),
    "PERQ_LEASE_SECONDS": ("4", "worker.lease_seconds", 4.0),
    "PERQ_GRACE_SECONDS": ("6", "worker.grace_seconds", 6.0),
    "PERQ_RECONCILE_SECONDS": ("9", "worker.reconcile_seconds", 9.0),
    "PERQ_LOG_LEVEL": ("debug", "worker.log_level", "DEBUG"),
    "PERQ_SKILL_IDLE_SECONDS": ("0", "mcp.idle_seconds", 0.0),
    "PERQ_SKILL_CALL_TIMEOUT": ("5", "mcp.call_timeout", 5.0),
    "PERQ_SKILL_CONNECT_TIMEOUT": ("8", "mcp.connect_timeout", 8.0),
    "PERQ_ALLOW_LOOPBACK_SKILLS": ("1", "mcp.allow_loopback", True),
    "PERQ_SCRIPT_TRACE": ("/tmp/trace.jsonl", "script.trace", "/tmp/trace.jsonl"),
}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in Settings.variables():
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def setting(settings: Settings, path: str) -> Any:
    section, field = path.split(".")
    return getattr(getattr(settings, section), field)


def test_every_flat_variable_fills_its_section(clean_env: pytest.MonkeyPatch) -> None:
    assert set(EXAMPLES) | {"AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"} == set(Settings.variables())
    defaults = Settings()
    for name, (value, path, expected) in EXAMPLES.items():
        assert Settings.variables()[name] == path
        assert setting(defaults, path) != expected, name
        clean_env.setenv(name, value)
    settings = Settings()
    for name, (_, path, expected) in EXAMPLES.items():
        assert setting(settings, path) == expected, name


def test_defaults_and_derived_values(clean_env: pytest.MonkeyPatch) -> None:
    settings = Settings()
    assert settings.redis.url == "redis://localhost:6379/0" and settings.store.location == "./perstack"
    assert settings.worker.reconcile_period == 30.0 and settings.store.fsync is True
    clean_env.setenv("PERQ_LEASE_SECONDS", "2")
    assert Settings().worker.reconcile_period == 6.0
    # an empty variable is unset, as it always was for the S3 endpoint and the script trace
    clean_env.setenv("PERQ_PROCESSES", "")
    clean_env.setenv("PERQ_SCRIPT_TRACE", "")
    assert Settings().worker.processes is None and Settings().script.trace is None


def test_only_the_documented_names_are_read(clean_env: pytest.MonkeyPatch) -> None:
    # prefix + field name of an aliased field is not a variable perq reads
    for name in (
        "PERQ_STORE_LOCATION",
        "PERQ_REDIS_QUEUE",
        "PERQ_SKILL_ALLOW_LOOPBACK",
        "PERQ_WORKER_CONCURRENCY",
    ):
        clean_env.setenv(name, "1")
    settings = Settings()
    assert (settings.store.location, settings.redis.queue) == ("./perstack", "perq:queue")
    assert settings.mcp.allow_loopback is False and settings.worker.concurrency == 200


def test_the_s3_endpoint_falls_back_to_the_aws_variables(clean_env: pytest.MonkeyPatch) -> None:
    assert StoreSection().s3_endpoint_url is None
    clean_env.setenv("AWS_ENDPOINT_URL", "http://general")
    assert StoreSection().s3_endpoint_url == "http://general"
    clean_env.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only")
    assert StoreSection().s3_endpoint_url == "http://s3-only"
    clean_env.setenv("PERQ_S3_ENDPOINT_URL", "")  # empty: the next one answers
    assert StoreSection().s3_endpoint_url == "http://s3-only"
    clean_env.setenv("PERQ_S3_ENDPOINT_URL", "http://perq")
    assert StoreSection().s3_endpoint_url == "http://perq"


def test_one_value_given_the_rest_from_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("PERQ_STORE_FSYNC", "0")
    clean_env.setenv("PERQ_LEASE_SECONDS", "3")
    for settings in (
        Settings(store=StoreSection(location="/a")),
        Settings(store={"location": "/a"}),  # a dict is built as the section, environment included
    ):
        assert settings.store.location == "/a" and settings.store.fsync is False
        assert settings.worker.lease_seconds == 3.0
    assert McpSection(call_timeout=0.5).call_timeout == 0.5
    # a value given by name wins over its variable, aliased or not
    clean_env.setenv("PERQ_STORAGE", "/env")
    clean_env.setenv("AWS_ENDPOINT_URL", "http://env")
    given = StoreSection(location="/given", s3_endpoint_url="http://given", fsync=True)
    assert (given.location, given.s3_endpoint_url, given.fsync) == ("/given", "http://given", True)
    assert McpSection(allow_loopback=True).allow_loopback is True
    with pytest.raises(ValueError):  # the old flat keywords are refused, never silently ignored
        Settings(redis_url="redis://elsewhere")


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("PERQ_LEASE_SECONDS", "abc", "valid number"),
        ("PERQ_LEASE_SECONDS", "0", "greater than 0"),
        ("PERQ_CONCURRENCY", "many", "valid integer"),
        ("PERQ_STORE_FSYNC", "maybe", "valid boolean"),
        ("PERQ_LOG_LEVEL", "loud", "unknown log level 'loud'"),
        ("PERQ_SKILL_CALL_TIMEOUT", "soon", "valid number"),
        ("PERQ_ALLOW_LOOPBACK_SKILLS", "perhaps", "valid boolean"),
        ("PERQ_REDIS_URL", "http://user:secret@host/0", "unknown scheme 'http'"),
    ],
)
def test_a_bad_value_is_named_in_one_line(
    clean_env: pytest.MonkeyPatch, name: str, value: str, says: str
) -> None:
    clean_env.setenv(name, value)
    with pytest.raises(SettingsError) as refused:
        Settings()
    message = str(refused.value)
    assert message.startswith(f"invalid setting {name}: ") and says in message, message
    assert "\n" not in message and "secret" not in message


def test_the_cli_refuses_a_bad_setting_in_one_line() -> None:
    env = {"PATH": "/usr/bin:/bin", "PERQ_LEASE_SECONDS": "abc", "PERQ_REDIS_URL": "redis://127.0.0.1:1/0"}
    script = "from producer.cli import main; main()"
    for args in (["worker", "--burst"], ["status"], ["recover", "--dry-run"]):
        done = subprocess.run(
            [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.splitlines() == [
            "perq: invalid setting PERQ_LEASE_SECONDS: Input should be a valid number, "
            "unable to parse string as a number"
        ], (args, done.stderr)


def test_the_log_level_names_logging_knows(clean_env: pytest.MonkeyPatch) -> None:
    for given, kept in (("warning", "WARNING"), ("WARN", "WARN"), ("Error", "ERROR")):
        assert WorkerSection(log_level=given).log_level == kept


def test_the_readme_table_lists_every_variable_with_its_setting() -> None:
    text = (ROOT / "README.md").read_text()
    table = text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    documented: dict[str, str] = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        for name in re.findall(r"`([A-Z0-9_]+)`", cells[0]):
            documented[name] = cells[1].strip("`")
    assert documented == Settings.variables()


def test_deployment_files_set_only_variables_perq_reads() -> None:
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    named = {
        name
        for service in compose["services"].values()
        for name in (service.get("environment") or {})
        if name.startswith("PERQ_")
    }
    named |= set(re.findall(r"^ENV (PERQ_[A-Z0-9_]+)=", (ROOT / "Dockerfile").read_text(), re.M))
    assert named and named <= set(Settings.variables())


# --- the S3 store's re-read ---------------------------------------------------------------------------


class ChangingLog:
    """A filesystem whose log segment is gone on the first `misses` reads, as after a concurrent rewrite."""

    def __init__(self, misses: int, error: Exception | None = None) -> None:
        self.misses = misses
        self.error = error
        self.reads = 0

    def ls(self, path: str, detail: bool = False, refresh: bool = False) -> list[str]:
        return [f"{path}/000000000001-a-1.jsonl"]

    def cat_file(self, path: str) -> bytes:
        raise FileNotFoundError(path)

    def cat(self, paths: list[str], on_error: str = "raise") -> dict[str, Any]:
        self.reads += 1
        if self.error is not None:
            raise self.error
        if self.reads <= self.misses:
            return {p: FileNotFoundError(p) for p in paths}
        return {p: b'{"n": 1}' for p in paths}


def test_a_log_that_changed_while_read_is_read_again() -> None:
    fs = ChangingLog(misses=4)
    assert S3Backend("bucket", fs=fs).read("runs/r/events.jsonl") == b'{"n": 1}\n'
    assert fs.reads == 5


def test_a_log_that_keeps_changing_is_given_up_after_five_reads() -> None:
    fs = ChangingLog(misses=100)
    with pytest.raises(OSError, match=r"s3://bucket/runs/r/events.jsonl kept changing while it was read"):
        S3Backend("bucket", fs=fs).read("runs/r/events.jsonl")
    assert fs.reads == 5


def test_other_errors_reading_a_log_are_not_retried() -> None:
    fs = ChangingLog(misses=0, error=PermissionError("denied"))
    with pytest.raises(PermissionError):
        S3Backend("bucket", fs=fs).read("runs/r/events.jsonl")
    assert fs.reads == 1
