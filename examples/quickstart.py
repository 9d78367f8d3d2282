"""The quick start: run the bundled `hello` expert end to end through Redis and a real worker.

Uses PERQ_REDIS_URL when it is set and answers; otherwise starts a private redis-server for the run.
Uses the offline script provider unless ANTHROPIC_API_KEY or OPENAI_API_KEY is set. Runs from a checkout
(`./dev example`): the private Redis is the tests' own support code, which an installed perq does not ship.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

# the private Redis is the tests' own (tests/support/localredis.py): the quick start runs from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.localredis import LocalRedis, reachable

HERE = Path(__file__).resolve().parent / "hello"
PERQ = [sys.executable, "-m", "producer"]


def provider_args() -> list[str]:
    if os.environ.get("ANTHROPIC_API_KEY"):
        return ["--provider", "anthropic", "--model", "claude-sonnet-4-5"]
    if os.environ.get("OPENAI_API_KEY"):
        return ["--provider", "openai", "--model", "gpt-4.1-mini"]
    return ["--provider", "script", "--model", "script.toml"]


def main() -> int:
    env = dict(os.environ)
    env.setdefault("PERQ_STORAGE", str(HERE / "perstack"))
    private = None
    url = env.get("PERQ_REDIS_URL")
    if not url or not reachable(url):
        private = LocalRedis().start()
        env["PERQ_REDIS_URL"] = private.url
        print(f"started a private redis-server at {private.url}", file=sys.stderr)
    worker = subprocess.Popen([*PERQ, "worker"], env=env, cwd=HERE)
    try:
        args = provider_args()
        print(f"$ perq run hello 'Say hello' {' '.join(args)} --wait", file=sys.stderr)
        run = subprocess.run(
            [*PERQ, "run", "hello", "Say hello", *args, "--wait"],
            env=env,
            cwd=HERE,
            stdout=subprocess.PIPE,
            text=True,
        )
        job_id = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
        if job_id:
            print(f"$ perq status {job_id}", file=sys.stderr)
            subprocess.run([*PERQ, "status", job_id], env=env, cwd=HERE)
        return run.returncode
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        if private is not None:
            private.stop()


if __name__ == "__main__":
    sys.exit(main())
