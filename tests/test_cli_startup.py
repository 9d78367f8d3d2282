"""Fast starts: `perq --help` loads none of the heavy modules the worker needs, and a worker loads the mcp
SDK only when an MCP server starts."""

from __future__ import annotations

import subprocess
import sys


def last_line_of(code: str) -> str:
    """What a fresh interpreter running `code` prints last (each test needs its own sys.modules)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


def test_perq_help_imports_no_heavy_module() -> None:
    """`perq --help` must feel instant: no model SDK, MCP, pydantic, arq, Textual or worker module loaded."""
    code = (
        "import sys\n"
        "sys.argv = ['perq', '--help']\n"
        "from producer.cli import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('pydantic', 'pydantic_ai', 'anthropic', 'openai', 'google', 'boto3', 'botocore',"
        " 'mcp', 'arq', 'redis', 'worker', 'textual')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    assert last_line_of(code) == "[]"


def test_a_worker_starts_without_the_mcp_sdk_until_a_server_starts() -> None:
    """Half a worker's start-up was importing the mcp SDK: the skill pool is made without it, and imports
    it when an expert's MCP server first starts."""
    code = (
        "import sys\n"
        "from shared.config import Settings\n"
        "from worker.main import _skill_pool\n"
        "import worker.queue.worker\n"
        "pool = _skill_pool(Settings())\n"
        "print(type(pool).__name__, sorted(m for m in sys.modules if m.split('.')[0] == 'mcp'))\n"
    )
    assert last_line_of(code) == "McpSkillPool []"
