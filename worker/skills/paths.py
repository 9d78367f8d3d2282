"""Workspace confinement for the base file tools (Perstack's rules, and a hole in them closed).

Every path a model names is resolved to its real path (symlinks followed) and checked after resolution, so
a link inside the workspace that points outside is refused like any outside path. The checks raise and
nothing here catches its own denial: that was Perstack's bug (§9 #30), where a swallowed denial let such a
link through.

The functions block on file-system calls; callers on the event loop run them in a thread.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

STORAGE_DIR_NAME = "perstack"  # Perstack's own storage inside the workspace, off-limits to the tools


class PathError(Exception):
    """A path a tool may not use. The class name is what the tool result reports as `error`."""


class PathDenied(PathError):
    """The path resolves outside the workspace, or into the job store or the workspace's perstack/ dir."""


class ParentDirectoryMissing(PathError):
    """A path that does not exist yet, whose parent directory does not exist either."""


class WorkspaceScope(Protocol):
    """What the checks need from a tool context."""

    @property
    def workspace(self) -> Path: ...

    @property
    def store_root(self) -> Path | None: ...


def requested_path(path: str, scope: WorkspaceScope) -> str:
    """The path as asked for: `~` expanded, made absolute against the workspace, symlinks not resolved."""
    return os.path.join(scope.workspace, os.path.expanduser(path))


def is_symlink(path: str, scope: WorkspaceScope) -> bool:
    """Whether the path as asked for is itself a symlink (content I/O refuses those, as Perstack does)."""
    return os.path.islink(requested_path(path, scope))


def _inside(child: str, parent: str) -> bool:
    # Case-folded: on a case-insensitive file system PERSTACK/ and perstack/ are the same directory, and on
    # a case-sensitive one folding only refuses a few more names, never fewer.
    child_f, parent_f = os.path.normcase(child).casefold(), os.path.normcase(parent).casefold()
    return child_f == parent_f or child_f.startswith(parent_f.rstrip(os.sep) + os.sep)


def _forbidden_reason(
    candidate: str, workspace: str, store_root: str | None, *, check_containment: bool = True
) -> str | None:
    if check_containment and not Path(candidate).is_relative_to(workspace):
        return "outside the workspace"
    if _inside(candidate, os.path.join(workspace, STORAGE_DIR_NAME)):
        return f"inside the workspace's {STORAGE_DIR_NAME}/ directory"
    if store_root is not None and _inside(candidate, store_root):
        return "inside the job store"
    return None


def _real_path(absolute: str, shown: str) -> str:
    if os.path.lexists(absolute):
        # Not strict: a dangling link resolves to where it points, which must itself be inside.
        return os.path.realpath(absolute)
    parent, name = os.path.split(absolute.rstrip(os.sep) or os.sep)
    real_parent = os.path.realpath(parent)
    if not os.path.isdir(real_parent):
        raise ParentDirectoryMissing(f"Parent directory does not exist: {shown}")
    return os.path.join(real_parent, name)


def _roots(scope: WorkspaceScope) -> tuple[str, str | None]:
    workspace = os.path.realpath(scope.workspace)
    store_root = os.path.realpath(scope.store_root) if scope.store_root is not None else None
    return workspace, store_root


def reserved_entries(directory: Path, scope: WorkspaceScope) -> Callable[[str], bool]:
    """A test for the names in the real directory `directory` that a listing hides (perstack/, store)."""
    workspace, store_root = _roots(scope)

    def hidden(name: str) -> bool:
        candidate = os.path.join(directory, name)
        return _forbidden_reason(candidate, workspace, store_root, check_containment=False) is not None

    return hidden


def resolve_in_workspace(path: str, scope: WorkspaceScope) -> Path:
    """The real path of `path`, or PathDenied / ParentDirectoryMissing.

    Relative paths are taken from the workspace; absolute paths are allowed when they land inside it.
    A path that does not exist yet needs an existing parent directory inside the workspace.
    """
    workspace, store_root = _roots(scope)
    absolute = requested_path(path, scope)
    # The lexical form is checked too, so "perstack/x" is refused even when perstack/ is a link elsewhere.
    # Containment is not judged on it: an absolute path through a link into the workspace is lexically
    # outside but really inside, and only the real path decides that.
    reason = _forbidden_reason(os.path.normpath(absolute), workspace, store_root, check_containment=False)
    if reason is not None:
        raise PathDenied(f"Access denied: {path} is {reason}.")
    real = _real_path(absolute, path)
    reason = _forbidden_reason(real, workspace, store_root)
    if reason is not None:
        raise PathDenied(f"Access denied: {path} is {reason}.")
    return Path(real)
