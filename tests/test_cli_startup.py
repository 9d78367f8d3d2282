"""The CLI starts fast: `perq --help` loads none of the heavy modules the worker needs."""

from __future__ import annotations


def test_perq_help_imports_no_heavy_module() -> None:
    """`perq --help` must feel instant: no model SDK, MCP, pydantic, arq, Textual or worker module loaded."""
    import subprocess
    import sys

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
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
