"""docker-compose.yml and the Dockerfile: valid, and the deployment the README's "Deployment" describes."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def deployment_section() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"^## Deployment\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
    assert match, "README.md has no Deployment section"
    return match[1]


def seconds(duration: str) -> float:
    """A compose duration such as 30s, 1m30s or 1m."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * unit[u] for n, u in parts)


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """volume name -> path inside the container."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        found[source] = target
    return found


def test_services_and_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "worker"}
    assert set(compose["volumes"]) == {"redis-data", "store", "workspace"}
    for service in services.values():  # every named volume a service uses is declared
        for source in mounts(service):
            assert source in compose["volumes"]


def test_redis_keeps_an_append_only_file_on_a_volume(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert mounts(redis) == {"redis-data": "/data"}
    assert "healthcheck" in redis


def test_workers_scale_and_share_one_store(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    assert worker["build"] == "."
    assert worker["command"] == ["perq", "worker"]
    # what would stop `--scale worker=N`: a fixed container name or a host port
    assert "container_name" not in worker and "ports" not in worker
    env = worker["environment"]
    assert env["PERQ_REDIS_URL"] == "redis://redis:6379/0"
    assert mounts(worker)["store"] == env["PERQ_STORAGE"]  # the same path in every worker
    assert seconds(worker["stop_grace_period"]) > float(env["PERQ_GRACE_SECONDS"])
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    # secrets come from the shell, never written into the file
    for name in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY"):
        assert env[name] == f"${{{name}:-}}"


def test_dockerfile_builds_the_worker() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.M)
    install = re.search(r'^RUN pip install "\.\[([a-z0-9,]+)\]"$', dockerfile, re.M)
    # the worker image carries every provider's SDK: google-genai (google, google-vertex) and boto3 (bedrock)
    assert install and {"mcp", "google", "bedrock"} <= set(install[1].split(","))
    assert re.search(r'^CMD \["perq", "worker"\]$', dockerfile, re.M)
    for folder in ("shared", "producer", "worker"):
        assert f"COPY {folder} ./{folder}" in dockerfile
    # the image's default store is where compose mounts the shared volume
    assert "ENV PERQ_STORAGE=/data/perstack" in dockerfile
    assert ".venv" in (ROOT / ".dockerignore").read_text().split()


def test_readme_describes_this_deployment(compose: dict[str, Any], deployment_section: str) -> None:
    text = deployment_section
    assert "docker compose up -d --build --scale worker=" in text
    for service in compose["services"]:
        assert f"`{service}`" in text or f" {service} " in text, service
    worker = compose["services"]["worker"]
    for volume, target in mounts(worker).items():
        assert f"`{volume}`" in text and f"`{target}`" in text, volume
    assert "`redis-data`" in text and "append-only" in text
    assert "`perq worker`" in text and "python:3.11-slim" in text
    assert f"`stop_grace_period` ({worker['stop_grace_period']}" in text
    assert f"`PERQ_GRACE_SECONDS` ({worker['environment']['PERQ_GRACE_SECONDS']})" in text
    # several machines: one Redis, one store on S3
    assert "PERQ_REDIS_URL" in text and "PERQ_STORAGE=s3://bucket/prefix" in text
    assert "PERQ_S3_ENDPOINT_URL" in text


def compose_command() -> list[str] | None:
    """`docker compose` or `docker-compose`, if one is installed and answers."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        try:
            probe = subprocess.run([*command, "version"], capture_output=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return command
    return None


def test_docker_compose_accepts_the_file() -> None:
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is available")
    result = subprocess.run(
        [*command, "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
