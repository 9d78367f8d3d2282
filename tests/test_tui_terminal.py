"""The real `perq start` in a terminal: tmux runs it in a pseudo-terminal, the test types keys and reads the
screen tmux shows; and the one line `perq start` says when Textual is missing."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PERQ, Perq

CONFIG = """
[experts.asker]
description = "Asks the user"
instruction = "Ask the user"

[experts.hello]
description = "Greets the user"
instruction = "Say hello"
"""
SCRIPT = """
[[experts.hello.turns]]
toolCalls = [{ toolName = "todo", args = { newTodos = ["say hello"] } }]
[[experts.hello.turns]]
toolCalls = [{ toolName = "todo", args = { completedTodos = [0] } }]
[[experts.hello.turns]]
toolCalls = [{ toolName = "attemptCompletion", args = {} }]
[[experts.hello.turns]]
text = "Hello from the terminal!"
"""
WAIT_S = 60  # how long the screen may take to show something before the test gives up


class Terminal:
    """One tmux server of the test's own (its own socket), running one program in a 120x35 terminal."""

    def __init__(self, socket: Path, env: dict[str, str]) -> None:
        self.socket = socket
        self.env = env

    def tmux(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["tmux", "-S", str(self.socket), *args], env=self.env, capture_output=True, text=True, timeout=30
        )

    def start(self, cwd: Path, argv: list[str]) -> None:
        result = self.tmux("new-session", "-d", "-s", "perq", "-x", "120", "-y", "35", "-c", str(cwd), *argv)
        assert result.returncode == 0, result.stderr

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "perq").stdout

    def alive(self) -> bool:
        return self.tmux("has-session", "-t", "perq").returncode == 0

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "perq", *keys)

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-t", "perq", "-l", text)

    def wait_for(self, text: str) -> str:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.1)
        raise AssertionError(f"{text!r} never appeared; the screen shows:\n{self.screen()}")


@pytest.fixture
def terminal(perq: Perq) -> Iterator[Terminal]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    term = Terminal(perq.root / "tmux.sock", perq.env(TERM="xterm-256color"))
    yield term
    term.tmux("kill-server")


def test_perq_start_in_a_real_terminal(perq: Perq, terminal: Terminal) -> None:
    perq.write("perstack.toml", CONFIG)
    perq.write("script.toml", SCRIPT)
    perq.start_worker()
    terminal.start(perq.root, [*PERQ, "start", "--provider", "script", "--model", "script.toml"])

    screen = terminal.wait_for("No jobs yet: press n to start a run")
    assert "perq: 0 jobs, newest first" in screen
    assert "c Checkpoints" in screen and "n New run" in screen and "q Quit" in screen

    terminal.keys("n")
    terminal.wait_for("hello  Greets the user")
    terminal.keys("Down", "Enter")  # in one write: Enter must see the cursor already moved to hello
    terminal.wait_for("New job of hello")
    terminal.type("Say hello")
    terminal.keys("Enter")
    terminal.wait_for("completed: hello - 3 steps")
    # the footer is painted after the body: wait for it rather than read the screen mid-paint
    screen = terminal.wait_for("Ctrl+C Cancel job")
    assert "completed: hello - 3 steps" in screen
    assert "Hello from the terminal!" in screen
    assert "Todos (hello): [x] say hello" in screen

    terminal.keys("Escape")
    screen = terminal.wait_for("perq: 1 jobs, newest first")
    (job,) = perq.store.list_jobs().jobs
    assert job.status == "completed"
    assert "completed".ljust(25) + f"hello - 3 steps ({job.id})" in screen  # as `perq status` lines up

    terminal.keys("c")
    screen = terminal.wait_for("Step 3 (")
    assert screen.index("Step 3 (") < screen.index("Step 2 (") < screen.index("Step 1 (")
    terminal.keys("q")
    deadline = time.monotonic() + WAIT_S
    while terminal.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not terminal.alive(), terminal.screen()


def test_perq_start_without_textual_says_so_in_one_line(perq: Perq, tmp_path: Path) -> None:
    fake = tmp_path / "no-textual" / "textual"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named textual')\n")
    result = perq.run("start", env=perq.env(PYTHONPATH=str(fake.parent)))
    assert result.returncode == 1
    assert result.stderr == "perq: perq start needs Textual: pip install 'perq[tui]'\n"
    assert result.stdout == ""
