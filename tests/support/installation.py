"""A perq installation in a folder, as the tests' harness and the bench make them: the folder holds the
configs and the workspace, and the store lives in its `perstack` subfolder (Perstack's name for it)."""

from __future__ import annotations

from pathlib import Path

from shared.store import JobStore


class Installation:
    """Where the store of the installation in `root` lives, and the store itself; the dataclasses built on
    this one declare `root` as their field."""

    root: Path

    @property
    def storage(self) -> Path:
        return self.root / "perstack"

    @property
    def store(self) -> JobStore:
        return JobStore.open(str(self.storage))
