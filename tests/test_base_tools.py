"""The in-process @perstack/base tools: behaviour of each tool and the inputs they must refuse."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shared.models import InlinePart, McpStdioSkill, TextPart, Todo, ToolCall
from worker.skills.base import BASE_SKILL, BASE_TOOL_DEFINITIONS, CHANGE_NOTHING, ToolContext, call_base_tool
from worker.skills.paths import ParentDirectoryMissing, PathDenied, resolve_in_workspace
from worker.skills.toolset import SkillSet

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
SECRET = "top secret"


@dataclass
class Layout:
    workspace: Path
    outside: Path
    store: Path
    ctx: ToolContext


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    root = tmp_path.resolve()
    workspace = root / "ws"
    outside = root / "outside"
    workspace.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    (outside / "pic.png").write_bytes(PNG)
    (outside / "doc.pdf").write_bytes(b"%PDF-1.4 secret")
    # the job store inside the workspace, and Perstack's own storage dir: both off-limits
    store = workspace / ".perq"
    (store / "jobs").mkdir(parents=True)
    (store / "jobs" / "job.json").write_text("{}")
    (workspace / "perstack").mkdir()
    (workspace / "perstack" / "checkpoint.json").write_text("{}")
    (workspace / "hello.txt").write_text("line 0\nline 1\nline 2")
    (workspace / "sub").mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "ANTHROPIC_API_KEY": "sk-ant-secret",
        "OPENAI_API_KEY": "sk-openai-secret",
    }
    ctx = ToolContext(workspace=workspace, store_root=store, todos=[], env=env)
    return Layout(workspace, outside, store, ctx)


async def call(name: str, ctx: ToolContext, **args: Any) -> dict[str, Any]:
    parts = await call_base_tool(name, args, ctx)
    assert len(parts) == 1
    assert isinstance(parts[0], TextPart)
    result: dict[str, Any] = json.loads(parts[0].text)
    return result


def sparse_file(path: Path, size: int) -> None:
    """A file of `size` bytes without writing them."""
    path.touch()
    os.truncate(path, size)


def assert_error(result: dict[str, Any], name: str, message_part: str = "") -> None:
    assert result.get("error") == name, result
    assert message_part in result["message"], result


# --- registry -----------------------------------------------------------------------------------------


def test_definitions_cover_the_base_tools() -> None:
    names = [d.name for d in BASE_TOOL_DEFINITIONS]
    # Perstack's base server lists its tools in this order
    text_files = ["readTextFile", "writeTextFile", "appendTextFile", "editTextFile"]
    listing = ["listDirectory", "getFileInfo"]
    file_system = ["createDirectory", "deleteDirectory", "deleteFile", "moveFile"]
    others = ["exec", "healthCheck", "readImageFile", "readPdfFile"]
    assert names == ["attemptCompletion", "todo", "clearTodo", *text_files, *listing, *file_system, *others]
    for definition in BASE_TOOL_DEFINITIONS:
        assert definition.skill_name == BASE_SKILL
        assert definition.kind == "mcp"
        assert definition.description
        assert definition.input_schema["type"] == "object"
        assert "title" not in definition.input_schema


def test_schemas_use_perstack_argument_names() -> None:
    schemas = {d.name: d.input_schema for d in BASE_TOOL_DEFINITIONS}
    assert set(schemas["todo"]["properties"]) == {"newTodos", "completedTodos"}
    assert set(schemas["readTextFile"]["properties"]) == {"path", "from", "to"}
    assert set(schemas["editTextFile"]["required"]) == {"path", "oldText", "newText"}
    assert schemas["exec"]["required"] == ["command"]
    assert schemas["readTextFile"]["properties"]["from"]["type"] == "integer"


async def test_unknown_tool_raises_key_error(layout: Layout) -> None:
    with pytest.raises(KeyError):
        await call_base_tool("think", {}, layout.ctx)


async def test_bad_arguments_are_an_answer(layout: Layout) -> None:
    assert_error(await call("readTextFile", layout.ctx), "InvalidArguments", "path")
    assert_error(await call("todo", layout.ctx, newTodos="not a list"), "InvalidArguments", "newTodos")
    assert_error(await call("exec", layout.ctx, command="true", timeout=0), "InvalidArguments", "timeout")


# --- todos and completion -----------------------------------------------------------------------------


async def test_todo_assigns_incrementing_ids(layout: Layout) -> None:
    result = await call("todo", layout.ctx, newTodos=["a", "b", "c"])
    assert result == {
        "todos": [
            {"id": 0, "title": "a", "completed": False},
            {"id": 1, "title": "b", "completed": False},
            {"id": 2, "title": "c", "completed": False},
        ]
    }
    result = await call("todo", layout.ctx, newTodos=["d"], completedTodos=[1, 99])
    assert [(t["id"], t["completed"]) for t in result["todos"]] == [
        (0, False),
        (1, True),
        (2, False),
        (3, False),
    ]


async def test_todo_mutates_the_run_list_in_place(layout: Layout) -> None:
    todos = layout.ctx.todos
    await call("todo", layout.ctx, newTodos=["a"])
    assert layout.ctx.todos is todos
    assert todos == [Todo(id=0, title="a")]


async def test_todo_ids_continue_after_restored_todos(layout: Layout) -> None:
    # a resumed run brings its todos back from the checkpoint; new ids must not collide
    layout.ctx.todos.extend([Todo(id=4, title="old", completed=True), Todo(id=2, title="older")])
    result = await call("todo", layout.ctx, newTodos=["new"])
    assert result["todos"][-1] == {"id": 5, "title": "new", "completed": False}


async def test_clear_todo_resets_ids(layout: Layout) -> None:
    await call("todo", layout.ctx, newTodos=["a", "b"])
    assert await call("clearTodo", layout.ctx) == {"todos": []}
    assert layout.ctx.todos == []
    result = await call("todo", layout.ctx, newTodos=["c"])
    assert result["todos"] == [{"id": 0, "title": "c", "completed": False}]


async def test_attempt_completion_without_todos(layout: Layout) -> None:
    assert await call("attemptCompletion", layout.ctx) == {}


async def test_attempt_completion_with_remaining_todos(layout: Layout) -> None:
    await call("todo", layout.ctx, newTodos=["a", "b"], completedTodos=[0])
    assert await call("attemptCompletion", layout.ctx) == {
        "remainingTodos": [{"id": 1, "title": "b", "completed": False}]
    }


async def test_attempt_completion_when_all_done(layout: Layout) -> None:
    await call("todo", layout.ctx, newTodos=["a", "b"])
    await call("todo", layout.ctx, completedTodos=[0, 1])
    assert await call("attemptCompletion", layout.ctx) == {}


# --- path confinement ---------------------------------------------------------------------------------


def test_resolve_relative_and_absolute_inside(layout: Layout) -> None:
    assert resolve_in_workspace("hello.txt", layout.ctx) == layout.workspace / "hello.txt"
    inside = str(layout.workspace / "sub" / "new.txt")
    assert resolve_in_workspace(inside, layout.ctx) == Path(inside)
    assert resolve_in_workspace(".", layout.ctx) == layout.workspace
    assert resolve_in_workspace("sub/../hello.txt", layout.ctx) == layout.workspace / "hello.txt"


def test_resolve_expands_home(layout: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(layout.workspace / "sub"))
    assert resolve_in_workspace("~/x.txt", layout.ctx) == layout.workspace / "sub" / "x.txt"
    monkeypatch.setenv("HOME", str(layout.outside))
    with pytest.raises(PathDenied):
        resolve_in_workspace("~/secret.txt", layout.ctx)


@pytest.mark.parametrize(
    "path",
    ["../outside/secret.txt", "sub/../../outside/secret.txt", "..", "/etc/passwd", "/"],
)
def test_resolve_refuses_escapes(layout: Layout, path: str) -> None:
    with pytest.raises(PathDenied):
        resolve_in_workspace(path, layout.ctx)


def test_resolve_refuses_symlink_pointing_outside(layout: Layout) -> None:
    # Perstack's check swallowed this very denial (spec §9 #30)
    (layout.workspace / "link.txt").symlink_to(layout.outside / "secret.txt")
    (layout.workspace / "linkdir").symlink_to(layout.outside)
    (layout.workspace / "dangling").symlink_to(layout.outside / "not-yet")
    for path in ("link.txt", "linkdir", "linkdir/secret.txt", "linkdir/new.txt", "dangling"):
        with pytest.raises(PathDenied):
            resolve_in_workspace(path, layout.ctx)


@pytest.mark.parametrize(
    "path",
    [".perq", ".perq/jobs/job.json", ".perq/new.txt", "perstack", "perstack/checkpoint.json", "PerStack/x"],
)
def test_resolve_refuses_store_and_perstack_dir(layout: Layout, path: str) -> None:
    with pytest.raises(PathDenied):
        resolve_in_workspace(path, layout.ctx)


def test_resolve_refuses_store_outside_workspace_reached_by_link(layout: Layout, tmp_path: Path) -> None:
    store = tmp_path.resolve() / "store"
    store.mkdir()
    ctx = ToolContext(workspace=layout.workspace, store_root=store, todos=[])
    with pytest.raises(PathDenied):
        resolve_in_workspace(str(store), ctx)


def test_resolve_refuses_link_into_store(layout: Layout) -> None:
    (layout.workspace / "jobs").symlink_to(layout.store / "jobs")
    with pytest.raises(PathDenied):
        resolve_in_workspace("jobs/job.json", layout.ctx)


def test_resolve_needs_existing_parent(layout: Layout) -> None:
    with pytest.raises(ParentDirectoryMissing, match="Parent directory does not exist"):
        resolve_in_workspace("a/b/c.txt", layout.ctx)
    with pytest.raises(ParentDirectoryMissing):
        resolve_in_workspace("hello.txt/x", layout.ctx)


def test_resolve_without_store(layout: Layout) -> None:
    ctx = ToolContext(workspace=layout.workspace, store_root=None, todos=[])
    assert resolve_in_workspace(".perq/jobs", ctx) == layout.store / "jobs"
    with pytest.raises(PathDenied):
        resolve_in_workspace("perstack", ctx)


# --- readTextFile -------------------------------------------------------------------------------------


async def test_read_text_file(layout: Layout) -> None:
    result = await call("readTextFile", layout.ctx, path="hello.txt")
    assert result == {
        "path": str(layout.workspace / "hello.txt"),
        "content": "line 0\nline 1\nline 2",
        "from": 0,
        "to": 3,
    }


async def test_read_text_file_slice(layout: Layout) -> None:
    parts = await call_base_tool("readTextFile", {"path": "hello.txt", "from": 1, "to": 2}, layout.ctx)
    assert isinstance(parts[0], TextPart)
    assert json.loads(parts[0].text)["content"] == "line 1"
    result = await call("readTextFile", layout.ctx, path="hello.txt", to=99)
    assert result["to"] == 3


async def test_read_text_file_absolute_inside(layout: Layout) -> None:
    result = await call("readTextFile", layout.ctx, path=str(layout.workspace / "hello.txt"))
    assert result["content"].startswith("line 0")


async def test_read_text_file_missing(layout: Layout) -> None:
    result = await call("readTextFile", layout.ctx, path="nope.txt")
    assert result == {"error": "NotFound", "message": "File nope.txt does not exist."}


async def test_read_text_file_directory(layout: Layout) -> None:
    assert_error(await call("readTextFile", layout.ctx, path="sub"), "IsADirectory")


@pytest.mark.parametrize(
    "path", ["../outside/secret.txt", "sub/../../outside/secret.txt", "/etc/passwd", ".perq/jobs/job.json"]
)
async def test_read_text_file_refuses(layout: Layout, path: str) -> None:
    result = await call("readTextFile", layout.ctx, path=path)
    assert_error(result, "PathDenied", "Access denied")
    assert SECRET not in json.dumps(result)


async def test_read_text_file_refuses_absolute_outside(layout: Layout) -> None:
    result = await call("readTextFile", layout.ctx, path=str(layout.outside / "secret.txt"))
    assert_error(result, "PathDenied")


async def test_read_text_file_refuses_symlink_outside(layout: Layout) -> None:
    (layout.workspace / "link.txt").symlink_to(layout.outside / "secret.txt")
    result = await call("readTextFile", layout.ctx, path="link.txt")
    assert_error(result, "PathDenied")
    assert SECRET not in json.dumps(result)


async def test_read_text_file_refuses_symlink_inside(layout: Layout) -> None:
    (layout.workspace / "alias.txt").symlink_to(layout.workspace / "hello.txt")
    assert_error(await call("readTextFile", layout.ctx, path="alias.txt"), "SymlinkRefused", "symbolic link")


async def test_read_text_file_refuses_fifo(layout: Layout) -> None:
    os.mkfifo(layout.workspace / "pipe")
    assert_error(await call("readTextFile", layout.ctx, path="pipe"), "NotAFile")


# --- writeTextFile / appendTextFile / editTextFile ----------------------------------------------------


async def test_write_text_file_creates_and_overwrites(layout: Layout) -> None:
    result = await call("writeTextFile", layout.ctx, path="sub/new.txt", text="héllo")
    assert result == {"path": str(layout.workspace / "sub" / "new.txt"), "text": "héllo"}
    assert (layout.workspace / "sub" / "new.txt").read_text(encoding="utf-8") == "héllo"
    await call("writeTextFile", layout.ctx, path="sub/new.txt", text="x")
    assert (layout.workspace / "sub" / "new.txt").read_text() == "x"


async def test_write_text_file_missing_parent(layout: Layout) -> None:
    result = await call("writeTextFile", layout.ctx, path="a/b/c.txt", text="x")
    assert_error(result, "ParentDirectoryMissing", "Parent directory does not exist")
    assert not (layout.workspace / "a").exists()


@pytest.mark.parametrize(
    "path", ["../outside/new.txt", "../escape.txt", ".perq/jobs/job.json", "perstack/x.txt"]
)
async def test_write_text_file_refuses(layout: Layout, path: str) -> None:
    assert_error(await call("writeTextFile", layout.ctx, path=path, text="pwned"), "PathDenied")
    assert not (layout.outside / "new.txt").exists()
    assert not (layout.workspace.parent / "escape.txt").exists()
    assert (layout.store / "jobs" / "job.json").read_text() == "{}"


async def test_write_text_file_refuses_symlink_outside(layout: Layout) -> None:
    (layout.workspace / "link.txt").symlink_to(layout.outside / "secret.txt")
    (layout.workspace / "dangling").symlink_to(layout.outside / "planted.txt")
    (layout.workspace / "linkdir").symlink_to(layout.outside)
    for path in ("link.txt", "dangling", "linkdir/planted.txt"):
        assert_error(await call("writeTextFile", layout.ctx, path=path, text="pwned"), "PathDenied")
    assert (layout.outside / "secret.txt").read_text() == SECRET
    assert not (layout.outside / "planted.txt").exists()


async def test_write_text_file_refuses_symlink_inside(layout: Layout) -> None:
    (layout.workspace / "alias.txt").symlink_to(layout.workspace / "hello.txt")
    assert_error(await call("writeTextFile", layout.ctx, path="alias.txt", text="x"), "SymlinkRefused")
    assert (layout.workspace / "hello.txt").read_text().startswith("line 0")


async def test_write_text_file_refuses_read_only(layout: Layout) -> None:
    target = layout.workspace / "ro.txt"
    target.write_text("keep")
    target.chmod(0o444)
    assert_error(await call("writeTextFile", layout.ctx, path="ro.txt", text="x"), "NotWritable")
    assert target.read_text() == "keep"


async def test_write_text_file_refuses_directory(layout: Layout) -> None:
    assert_error(await call("writeTextFile", layout.ctx, path="sub", text="x"), "IsADirectory")


async def test_append_text_file(layout: Layout) -> None:
    await call("appendTextFile", layout.ctx, path="hello.txt", text="\nline 3")
    assert (layout.workspace / "hello.txt").read_text() == "line 0\nline 1\nline 2\nline 3"


async def test_append_text_file_missing(layout: Layout) -> None:
    result = await call("appendTextFile", layout.ctx, path="nope.txt", text="x")
    assert_error(result, "NotFound", "File nope.txt does not exist.")
    assert not (layout.workspace / "nope.txt").exists()


async def test_append_text_file_refuses_symlink_outside(layout: Layout) -> None:
    (layout.workspace / "link.txt").symlink_to(layout.outside / "secret.txt")
    assert_error(await call("appendTextFile", layout.ctx, path="link.txt", text="x"), "PathDenied")
    assert (layout.outside / "secret.txt").read_text() == SECRET


async def test_edit_text_file_replaces_first_occurrence(layout: Layout) -> None:
    target = layout.workspace / "e.txt"
    target.write_bytes(b"a = 1\r\nb = 2\r\na = 1\r\n")
    result = await call("editTextFile", layout.ctx, path="e.txt", oldText="a = 1\r\nb", newText="a = 3\nb")
    assert result["path"] == str(target)
    assert target.read_bytes() == b"a = 3\nb = 2\na = 1\n"


async def test_edit_text_file_no_match(layout: Layout) -> None:
    result = await call("editTextFile", layout.ctx, path="hello.txt", oldText="absent", newText="x")
    assert_error(result, "NoMatch", "Could not find exact match for oldText")
    assert (layout.workspace / "hello.txt").read_text() == "line 0\nline 1\nline 2"


async def test_edit_text_file_missing_and_outside(layout: Layout) -> None:
    result = await call("editTextFile", layout.ctx, path="nope.txt", oldText="a", newText="b")
    assert_error(result, "NotFound", "does not exist")
    result = await call("editTextFile", layout.ctx, path="../outside/secret.txt", oldText="top", newText="x")
    assert_error(result, "PathDenied")
    assert (layout.outside / "secret.txt").read_text() == SECRET


# --- listDirectory / getFileInfo ----------------------------------------------------------------------


async def test_list_directory_hides_store_and_perstack(layout: Layout) -> None:
    (layout.workspace / "b.txt").write_text("bb")
    result = await call("listDirectory", layout.ctx, path=".")
    names = [item["name"] for item in result["items"]]
    assert names == ["b.txt", "hello.txt", "sub"]
    by_name = {item["name"]: item for item in result["items"]}
    assert by_name["b.txt"] == {
        "name": "b.txt",
        "path": "b.txt",
        "type": "file",
        "size": 2,
        "modified": by_name["b.txt"]["modified"],
    }
    assert by_name["sub"]["type"] == "directory"
    assert by_name["b.txt"]["modified"].endswith("Z")


async def test_list_directory_default_is_workspace(layout: Layout) -> None:
    result = await call("listDirectory", layout.ctx)
    assert result["path"] == str(layout.workspace)


async def test_list_directory_hides_store_deeper(layout: Layout) -> None:
    store = layout.workspace / "data" / "store"
    store.mkdir(parents=True)
    (layout.workspace / "data" / "keep.txt").write_text("")
    ctx = ToolContext(workspace=layout.workspace, store_root=store, todos=[])
    result = await call("listDirectory", ctx, path="data")
    assert [item["name"] for item in result["items"]] == ["keep.txt"]
    assert result["items"][0]["path"] == "data/keep.txt"


async def test_list_directory_shows_links_without_following(layout: Layout) -> None:
    (layout.workspace / "linkdir").symlink_to(layout.outside)
    result = await call("listDirectory", layout.ctx)
    entry = next(item for item in result["items"] if item["name"] == "linkdir")
    assert entry["type"] == "symlink"


async def test_list_directory_refuses(layout: Layout) -> None:
    (layout.workspace / "linkdir").symlink_to(layout.outside)
    for path in ("linkdir", "..", str(layout.outside), ".perq", "perstack"):
        result = await call("listDirectory", layout.ctx, path=path)
        assert_error(result, "PathDenied")
        assert "secret.txt" not in json.dumps(result)


async def test_list_directory_errors(layout: Layout) -> None:
    assert_error(
        await call("listDirectory", layout.ctx, path="nope"), "NotFound", "Directory nope does not exist."
    )
    assert_error(await call("listDirectory", layout.ctx, path="hello.txt"), "NotADirectory")


async def test_get_file_info(layout: Layout) -> None:
    result = await call("getFileInfo", layout.ctx, path="hello.txt")
    assert result["name"] == "hello.txt"
    assert result["path"] == "hello.txt"
    assert result["absolutePath"] == str(layout.workspace / "hello.txt")
    assert result["directory"] == str(layout.workspace)
    assert result["extension"] == ".txt"
    assert result["type"] == "file"
    assert result["mimeType"] == "text/plain"
    assert result["size"] == len("line 0\nline 1\nline 2")
    assert result["sizeFormatted"] == "20 B"
    assert result["modified"].endswith("Z")
    assert set(result["permissions"]) == {"readable", "writable", "executable"}
    directory = await call("getFileInfo", layout.ctx, path="sub")
    assert directory["type"] == "directory"


async def test_get_file_info_refuses(layout: Layout) -> None:
    (layout.workspace / "link.txt").symlink_to(layout.outside / "secret.txt")
    for path in ("link.txt", "../outside/secret.txt", ".perq/jobs/job.json"):
        result = await call("getFileInfo", layout.ctx, path=path)
        assert_error(result, "PathDenied")
        assert "size" not in result
    assert_error(await call("getFileInfo", layout.ctx, path="nope"), "NotFound")


# --- createDirectory / deleteDirectory / deleteFile / moveFile -----------------------------------------


async def test_create_directory(layout: Layout) -> None:
    result = await call("createDirectory", layout.ctx, path="sub/new")
    assert result == {"path": str(layout.workspace / "sub" / "new")}
    assert (layout.workspace / "sub" / "new").is_dir()
    assert_error(await call("createDirectory", layout.ctx, path="sub/new"), "AlreadyExists")
    assert_error(await call("createDirectory", layout.ctx, path="x/y/z"), "ParentDirectoryMissing")
    assert_error(await call("createDirectory", layout.ctx, path="perstack/new"), "PathDenied")
    assert_error(await call("createDirectory", layout.ctx, path="../made-outside"), "PathDenied")
    assert not (layout.workspace.parent / "made-outside").exists()


async def test_delete_directory(layout: Layout) -> None:
    (layout.workspace / "full").mkdir()
    (layout.workspace / "full" / "f.txt").write_text("x")
    assert_error(await call("deleteDirectory", layout.ctx, path="full"), "NotEmpty")
    assert (layout.workspace / "full" / "f.txt").exists()
    await call("deleteDirectory", layout.ctx, path="full", recursive=True)
    assert not (layout.workspace / "full").exists()
    await call("deleteDirectory", layout.ctx, path="sub")
    assert not (layout.workspace / "sub").exists()


async def test_delete_directory_refuses(layout: Layout) -> None:
    (layout.workspace / "linkdir").symlink_to(layout.outside)
    for path in (".", str(layout.workspace), ".perq", "perstack", "linkdir", "..", str(layout.outside)):
        assert_error(await call("deleteDirectory", layout.ctx, path=path, recursive=True), "PathDenied")
    assert (layout.outside / "secret.txt").exists()
    assert (layout.store / "jobs" / "job.json").exists()
    assert_error(await call("deleteDirectory", layout.ctx, path="hello.txt"), "NotADirectory")


async def test_delete_directory_refuses_store_ancestor(layout: Layout) -> None:
    store = layout.workspace / "data" / "store"
    store.mkdir(parents=True)
    ctx = ToolContext(workspace=layout.workspace, store_root=store, todos=[])
    assert_error(await call("deleteDirectory", ctx, path="data", recursive=True), "PathDenied", "job store")
    assert store.is_dir()


async def test_delete_file(layout: Layout) -> None:
    assert await call("deleteFile", layout.ctx, path="hello.txt") == {
        "path": str(layout.workspace / "hello.txt")
    }
    assert not (layout.workspace / "hello.txt").exists()
    assert_error(await call("deleteFile", layout.ctx, path="hello.txt"), "NotFound", "does not exist")
    assert_error(await call("deleteFile", layout.ctx, path="sub"), "IsADirectory")


async def test_delete_file_refuses(layout: Layout) -> None:
    ro = layout.workspace / "ro.txt"
    ro.write_text("x")
    ro.chmod(0o444)
    assert_error(await call("deleteFile", layout.ctx, path="ro.txt"), "NotWritable")
    (layout.workspace / "alias.txt").symlink_to(layout.workspace / "hello.txt")
    assert_error(await call("deleteFile", layout.ctx, path="alias.txt"), "SymlinkRefused")
    assert (layout.workspace / "hello.txt").exists()
    for path in ("../outside/secret.txt", ".perq/jobs/job.json", "perstack/checkpoint.json"):
        assert_error(await call("deleteFile", layout.ctx, path=path), "PathDenied")
    assert (layout.outside / "secret.txt").exists()
    assert (layout.store / "jobs" / "job.json").exists()


async def test_move_file(layout: Layout) -> None:
    result = await call("moveFile", layout.ctx, source="hello.txt", destination="sub/moved.txt")
    assert result == {
        "source": str(layout.workspace / "hello.txt"),
        "destination": str(layout.workspace / "sub" / "moved.txt"),
    }
    assert (layout.workspace / "sub" / "moved.txt").read_text().startswith("line 0")
    assert not (layout.workspace / "hello.txt").exists()


async def test_move_file_errors(layout: Layout) -> None:
    (layout.workspace / "other.txt").write_text("other")
    result = await call("moveFile", layout.ctx, source="hello.txt", destination="other.txt")
    assert_error(result, "AlreadyExists", "Destination other.txt already exists.")
    assert (layout.workspace / "other.txt").read_text() == "other"
    result = await call("moveFile", layout.ctx, source="nope.txt", destination="x.txt")
    assert_error(result, "NotFound", "Source file nope.txt does not exist.")
    result = await call("moveFile", layout.ctx, source="hello.txt", destination="a/b.txt")
    assert_error(result, "ParentDirectoryMissing")


async def test_move_file_refuses(layout: Layout) -> None:
    cases = [
        ("hello.txt", "../outside/stolen.txt"),
        ("hello.txt", ".perq/jobs/planted.json"),
        ("hello.txt", "perstack/planted.json"),
        ("../outside/secret.txt", "stolen.txt"),
        (".perq/jobs/job.json", "job.json"),
        (".perq", "store"),
        (".", "sub/ws"),
    ]
    for source, destination in cases:
        result = await call("moveFile", layout.ctx, source=source, destination=destination)
        assert_error(result, "PathDenied")
    assert (layout.workspace / "hello.txt").exists()
    assert (layout.outside / "secret.txt").exists()
    assert not (layout.outside / "stolen.txt").exists()


# --- readImageFile / readPdfFile ----------------------------------------------------------------------


async def test_read_image_file(layout: Layout) -> None:
    (layout.workspace / "pic.png").write_bytes(PNG)
    (layout.workspace / "photo.JPG").write_bytes(b"\xff\xd8\xff")
    parts = await call_base_tool("readImageFile", {"path": "pic.png"}, layout.ctx)
    assert len(parts) == 1
    image = parts[0]
    assert isinstance(image, InlinePart) and image.type == "imageInlinePart"
    assert image.mime_type == "image/png"
    assert base64.b64decode(image.encoded_data) == PNG
    parts = await call_base_tool("readImageFile", {"path": "photo.JPG"}, layout.ctx)
    assert isinstance(parts[0], InlinePart) and parts[0].type == "imageInlinePart"
    assert parts[0].mime_type == "image/jpeg"


@pytest.mark.parametrize("ext, mime", [("gif", "image/gif"), ("webp", "image/webp"), ("jpeg", "image/jpeg")])
async def test_read_image_file_types(layout: Layout, ext: str, mime: str) -> None:
    (layout.workspace / f"img.{ext}").write_bytes(b"data")
    parts = await call_base_tool("readImageFile", {"path": f"img.{ext}"}, layout.ctx)
    assert isinstance(parts[0], InlinePart) and parts[0].type == "imageInlinePart"
    assert parts[0].mime_type == mime


async def test_read_image_file_errors(layout: Layout) -> None:
    assert_error(
        await call("readImageFile", layout.ctx, path="hello.txt"), "UnsupportedType", "not supported"
    )
    assert_error(await call("readImageFile", layout.ctx, path="nope.png"), "NotFound", "does not exist")
    sparse_file(layout.workspace / "big.png", 16 * 1024 * 1024)
    result = await call("readImageFile", layout.ctx, path="big.png")
    assert_error(result, "TooLarge", "Image file too large (16.0MB). Maximum supported size is 15MB.")


async def test_read_image_file_refuses(layout: Layout) -> None:
    (layout.workspace / "pic.png").symlink_to(layout.outside / "pic.png")
    (layout.workspace / "linkdir").symlink_to(layout.outside)
    for path in ("pic.png", "linkdir/pic.png", "../outside/pic.png", str(layout.outside / "pic.png")):
        result = await call("readImageFile", layout.ctx, path=path)
        assert_error(result, "PathDenied")
    (layout.workspace / "real.png").write_bytes(PNG)
    (layout.workspace / "alias.png").symlink_to(layout.workspace / "real.png")
    assert_error(await call("readImageFile", layout.ctx, path="alias.png"), "SymlinkRefused")


async def test_read_pdf_file(layout: Layout) -> None:
    (layout.workspace / "doc.pdf").write_bytes(b"%PDF-1.4 hello")
    parts = await call_base_tool("readPdfFile", {"path": "doc.pdf"}, layout.ctx)
    assert len(parts) == 1
    pdf = parts[0]
    assert isinstance(pdf, InlinePart) and pdf.type == "fileInlinePart"
    assert pdf.mime_type == "application/pdf"
    assert base64.b64decode(pdf.encoded_data) == b"%PDF-1.4 hello"


async def test_read_pdf_file_errors(layout: Layout) -> None:
    assert_error(await call("readPdfFile", layout.ctx, path="hello.txt"), "UnsupportedType")
    (layout.workspace / "doc.pdf").symlink_to(layout.outside / "doc.pdf")
    assert_error(await call("readPdfFile", layout.ctx, path="doc.pdf"), "PathDenied")
    sparse_file(layout.workspace / "big.pdf", 31 * 1024 * 1024)
    assert_error(
        await call("readPdfFile", layout.ctx, path="big.pdf"), "TooLarge", "Maximum supported size is 30MB"
    )


# --- exec ---------------------------------------------------------------------------------------------


async def test_exec_output(layout: Layout) -> None:
    result = await call("exec", layout.ctx, command="echo", args=["hello", "$HOME", "; ls"])
    assert result == {"output": "hello $HOME ; ls\n"}  # no shell: nothing is expanded


async def test_exec_streams_flags(layout: Layout) -> None:
    script = "import sys; print('out'); print('err', file=sys.stderr)"
    both = await call("exec", layout.ctx, command=sys.executable, args=["-c", script])
    assert both["output"] == "out\nerr\n"
    only_out = await call("exec", layout.ctx, command=sys.executable, args=["-c", script], stderr=False)
    assert only_out["output"] == "out\n"
    none = await call(
        "exec", layout.ctx, command=sys.executable, args=["-c", script], stdout=False, stderr=False
    )
    assert none["output"] == "Command executed successfully, but produced no output."


async def test_exec_no_output(layout: Layout) -> None:
    result = await call("exec", layout.ctx, command="true")
    assert result == {"output": "Command executed successfully, but produced no output."}


async def test_exec_failure(layout: Layout) -> None:
    script = "import sys; print('partial'); sys.exit('boom')"
    result = await call("exec", layout.ctx, command=sys.executable, args=["-c", script])
    assert_error(result, "CommandFailed", "exit code 1")
    assert result["stdout"] == "partial\n"
    assert result["stderr"] == "boom\n"


async def test_exec_command_not_found(layout: Layout) -> None:
    assert_error(await call("exec", layout.ctx, command="no-such-command-xyz"), "CommandNotFound")


async def test_exec_timeout(layout: Layout) -> None:
    started = time.monotonic()
    result = await call(
        "exec", layout.ctx, command=sys.executable, args=["-c", "import time; time.sleep(30)"], timeout=300
    )
    assert result == {"error": "TimeoutError", "message": "Command timed out after 300 ms."}
    assert time.monotonic() - started < 10


async def test_exec_output_cap(layout: Layout) -> None:
    script = "import sys; sys.stdout.write('x' * (11 * 1024 * 1024))"
    result = await call("exec", layout.ctx, command=sys.executable, args=["-c", script])
    assert_error(result, "OutputTooLarge", "10 MiB")


async def test_exec_cancelled_kills_the_command(layout: Layout) -> None:
    pid_file = layout.workspace / "pid"
    script = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(30)"
    task = asyncio.create_task(call("exec", layout.ctx, command=sys.executable, args=["-c", script]))
    for _ in range(200):
        if pid_file.exists() and pid_file.read_text():
            break
        await asyncio.sleep(0.02)
    pid = int(pid_file.read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_exec_runs_in_cwd(layout: Layout) -> None:
    result = await call("exec", layout.ctx, command="pwd")
    assert result["output"].strip() == str(layout.workspace)
    result = await call("exec", layout.ctx, command="pwd", cwd="sub")
    assert result["output"].strip() == str(layout.workspace / "sub")


async def test_exec_refuses_cwd(layout: Layout) -> None:
    (layout.workspace / "linkdir").symlink_to(layout.outside)
    for cwd in ("linkdir", "..", str(layout.outside), ".perq", "perstack"):
        result = await call("exec", layout.ctx, command="ls", cwd=cwd)
        assert_error(result, "PathDenied")
        assert "secret.txt" not in json.dumps(result)
    assert_error(await call("exec", layout.ctx, command="ls", cwd="nope"), "NotFound")


async def test_exec_env_is_filtered(layout: Layout) -> None:
    result = await call(
        "exec",
        layout.ctx,
        command="env",
        env={"FOO": "bar", "PATH": "/evil", "LD_PRELOAD": "/evil.so", "PYTHONPATH": "/evil"},
    )
    output = result["output"]
    assert "ANTHROPIC_API_KEY" not in output
    assert "OPENAI_API_KEY" not in output
    assert "sk-ant-secret" not in output
    assert "sk-openai-secret" not in output
    assert "FOO=bar" in output
    assert f"PATH={layout.ctx.env['PATH']}" in output.splitlines()
    assert "/evil" not in output


# --- healthCheck --------------------------------------------------------------------------------------


async def test_health_check(layout: Layout) -> None:
    result = await call("healthCheck", layout.ctx)
    assert result["status"] == "ok"
    assert result["workspace"] == str(layout.workspace)
    assert result["pid"] == os.getpid()
    assert result["uptime"] >= 0
    assert result["memory"]["heapUsed"] > 0


def test_the_tools_that_change_nothing_outside_their_step_are_spelt_out() -> None:
    """They run before their answer is journaled (`SkillSet.changes_nothing`): the list is spelt out here
    so that a tool joins it only on purpose, and each is a base tool."""
    reading = {"readTextFile", "listDirectory", "getFileInfo", "readImageFile", "readPdfFile", "healthCheck"}
    assert reading | {"attemptCompletion", "todo", "clearTodo"} == CHANGE_NOTHING
    assert {t.name for t in BASE_TOOL_DEFINITIONS} >= CHANGE_NOTHING


def test_a_base_tool_served_by_an_mcp_server_may_change_anything() -> None:
    """With `perstackBaseSkillCommand` the base tools are a server of the user's own: none of them runs
    before its answer is journaled, attemptCompletion included; an unknown tool neither."""
    context = ToolContext(workspace=Path("."), store_root=None, todos=[])
    in_process = SkillSet(tools=list(BASE_TOOL_DEFINITIONS), tool_context=context)
    served = SkillSet(
        tools=list(BASE_TOOL_DEFINITIONS),
        tool_context=context,
        mcp_skills={BASE_SKILL: McpStdioSkill(name=BASE_SKILL, command="base-server", external_base=True)},
    )

    def call(name: str) -> ToolCall:
        return ToolCall(id="c1", skill_name=BASE_SKILL, tool_name=name, args={})

    assert in_process.changes_nothing(call("attemptCompletion")) and in_process.changes_nothing(call("todo"))
    assert not in_process.changes_nothing(call("writeTextFile"))
    assert not in_process.changes_nothing(call("noSuchTool"))
    assert not served.changes_nothing(call("attemptCompletion")) and not served.changes_nothing(call("todo"))
