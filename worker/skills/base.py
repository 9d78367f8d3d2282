"""The `@perstack/base` tools, run in-process, answering as Perstack's own base server does.

Each tool answers with one text part holding JSON, as Perstack's base server does; readImageFile and
readPdfFile answer with the file itself inlined (Perstack's runtime does that after the tool; here it
happens under the same workspace checks as every other read; a symlink out of the workspace is refused
wherever a file is read). A failure is an
answer too, `{"error": <name>, "message": ...}`, so a model can read it and try again; only an unknown
tool name raises, because that is the caller's bug, not the model's.

Todos are per run, not per process (parallel runs must not see each other's list): the caller owns the list,
keeps it in the checkpoint and hands it in.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import inspect
import json
import mimetypes
import os
import resource
import shutil
import signal
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from shared.models import BASE_SKILL_NAME, InlinePart, TextPart, Todo, ToolDefinition
from worker.skills.envfilter import filtered_env
from worker.skills.paths import PathDenied, is_symlink, reserved_entries, resolve_in_workspace

BASE_SKILL = BASE_SKILL_NAME  # what perstack.toml calls the in-process tools

MIB = 1024 * 1024
IMAGE_MAX_BYTES = 15 * MIB
PDF_MAX_BYTES = 30 * MIB
EXEC_OUTPUT_MAX_BYTES = 10 * MIB  # per stream, as Node's execFile maxBuffer
EXEC_DEFAULT_TIMEOUT_MS = 60_000
NO_OUTPUT = "Command executed successfully, but produced no output."

IMAGE_MIME_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
}
PDF_MIME_TYPES = {".pdf": "application/pdf"}

_STARTED = time.monotonic()


@dataclass
class ToolContext:
    workspace: Path  # absolute real path
    store_root: Path | None  # the job store; refused by every file tool
    todos: list[Todo]  # per-run todo list; todo/clearTodo mutate it in place; attemptCompletion reads it
    env: Mapping[str, str] = field(default_factory=dict)  # the worker env, filtered through filtered_env


ContentPart = TextPart | InlinePart
ToolOutput = dict[str, Any] | InlinePart


class ToolError(Exception):
    """A failure reported to the model as `{"error": name, "message": message, **details}`."""

    def __init__(self, name: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.name = name
        self.message = message
        self.details = details


# --- registry -----------------------------------------------------------------------------------------

In = TypeVar("In", bound=BaseModel)
Handler = Callable[[Any, ToolContext], Awaitable[ToolOutput]]


@dataclass(frozen=True)
class _BaseTool:
    name: str
    description: str
    input_model: type[BaseModel]
    run: Handler


_TOOLS: dict[str, _BaseTool] = {}


AsyncImpl = Callable[[In, ToolContext], Awaitable[ToolOutput]]
SyncImpl = Callable[[In, ToolContext], ToolOutput]


def _declared(fn: Callable[..., Any], run: Handler) -> None:
    """Register a tool as its function declares it: the name is the function's in camelCase
    (`_read_text_file` is readTextFile), the input model is its first parameter's type, and the description
    offered to the model is its docstring, on one line."""
    name = to_camel(fn.__name__.lstrip("_"))
    args = next(iter(inspect.signature(fn, eval_str=True).parameters.values()))
    _TOOLS[name] = _BaseTool(name, " ".join((fn.__doc__ or "").split()), args.annotation, run)


def _tool(fn: AsyncImpl[In]) -> AsyncImpl[In]:
    """Register a tool that runs on the event loop (todo state, exec)."""
    _declared(fn, fn)
    return fn


def _file_tool(fn: SyncImpl[In]) -> SyncImpl[In]:
    """Register a tool of blocking file-system calls; it runs in a thread so the worker's loop keeps going."""

    async def run(args: In, ctx: ToolContext) -> ToolOutput:
        return await asyncio.to_thread(fn, args, ctx)

    _declared(fn, run)
    return fn


async def call_base_tool(name: str, args: dict[str, Any], ctx: ToolContext) -> list[ContentPart]:
    """Run base tool `name`. Raises KeyError for an unknown name; every other failure is an answer."""
    tool = _TOOLS[name]
    output: ToolOutput
    try:
        parsed = tool.input_model.model_validate(args if args is not None else {})
        output = await tool.run(parsed, ctx)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {err['msg']}"
            for err in e.errors(include_url=False)
        )
        output = _error("InvalidArguments", f"Invalid arguments for {name}: {problems}")
    except ToolError as e:
        output = _error(e.name, e.message, **e.details)
    except Exception as e:  # a tool failure of any kind goes back to the model; cancellation still propagates
        output = _error(type(e).__name__, str(e))
    if isinstance(output, dict):
        return [TextPart(text=json.dumps(output, ensure_ascii=False, separators=(",", ":")))]
    return [output]


def _error(name: str, message: str, **details: Any) -> dict[str, Any]:
    return {"error": name, "message": message, **details}


class _Input(BaseModel):
    """Arguments of a tool: camelCase on the wire, unknown keys ignored (as zod strips them)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


def _input_schema(model: type[BaseModel]) -> dict[str, Any]:
    return _tidy_schema(model.model_json_schema(by_alias=True))


def _tidy_schema(node: Any) -> Any:
    """Drop pydantic's titles and null branches, which only cost the model tokens."""
    if isinstance(node, list):
        return [_tidy_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    variants = node.get("anyOf")
    if isinstance(variants, list) and {"type": "null"} in variants and len(variants) == 2:
        (kept,) = [v for v in variants if v != {"type": "null"}]
        node = {**kept, **{k: v for k, v in node.items() if k != "anyOf"}}
    return {
        key: _tidy_schema(value)
        for key, value in node.items()
        if not (key == "title" and isinstance(value, str)) and not (key == "default" and value is None)
    }


# --- shared file helpers (blocking; called from threads) -----------------------------------------------


def _stat_existing(path: str, ctx: ToolContext, what: str = "File") -> tuple[Path, os.stat_result]:
    real = resolve_in_workspace(path, ctx)
    try:
        return real, real.stat()
    except FileNotFoundError:
        raise ToolError("NotFound", f"{what} {path} does not exist.") from None


def _existing_file(path: str, ctx: ToolContext) -> tuple[Path, os.stat_result]:
    real, st = _stat_existing(path, ctx)
    if stat.S_ISDIR(st.st_mode):
        raise ToolError("IsADirectory", f"Path {path} is a directory.")
    return real, st


def _existing_directory(path: str, ctx: ToolContext) -> Path:
    real, st = _stat_existing(path, ctx, "Directory")
    if not stat.S_ISDIR(st.st_mode):
        raise ToolError("NotADirectory", f"Path {path} is not a directory.")
    return real


def _refuse_symlink(path: str, ctx: ToolContext) -> None:
    # The real path is already checked; refusing the link itself keeps Perstack's rule that content I/O
    # never goes through a link (and that delete/move act on what was named, not on a link's target).
    if is_symlink(path, ctx):
        raise ToolError("SymlinkRefused", f"Path {path} is a symbolic link; use the path it points to.")


def _require_writable(path: str, st: os.stat_result) -> None:
    # The owner write bit, as Perstack checks it: a file marked read-only stays read-only even for root.
    if not st.st_mode & stat.S_IWUSR:
        raise ToolError("NotWritable", f"File {path} is not writable.")


def _readable_file(path: str, ctx: ToolContext) -> tuple[Path, os.stat_result]:
    """An existing file a tool may read: not a link."""
    real, st = _existing_file(path, ctx)
    _refuse_symlink(path, ctx)
    return real, st


def _writable_file(path: str, ctx: ToolContext) -> Path:
    """An existing file a tool may change: not a link, and writable."""
    real, st = _readable_file(path, ctx)
    _require_writable(path, st)
    return real


def _open_regular(real: Path, path: str, flags: int) -> int:
    """Open without following a final symlink and without blocking on a FIFO; refuse non-regular files."""
    try:
        fd = os.open(real, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:  # the path became a symlink after it was checked
            raise ToolError("SymlinkRefused", f"Path {path} is a symbolic link.") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ToolError("NotAFile", f"Path {path} is not a regular file.")
    return fd


def _read_bytes(real: Path, path: str, limit: int | None = None) -> bytes:
    with os.fdopen(_open_regular(real, path, os.O_RDONLY), "rb") as f:
        return f.read() if limit is None else f.read(limit + 1)


def _write_bytes(real: Path, path: str, data: bytes, *, append: bool = False) -> None:
    flags = os.O_WRONLY | (os.O_APPEND if append else os.O_CREAT)
    fd = _open_regular(real, path, flags)
    with os.fdopen(fd, "wb") as f:
        if not append:
            # Truncated only after the regular-file check, so a device or FIFO is never truncated.
            f.truncate(0)
        f.write(data)


def _iso(timestamp: float) -> str:
    """A JavaScript toISOString() timestamp, as Perstack reports times."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def _format_size(size: int) -> str:
    value, unit = float(size), "B"
    for unit in ("B", "KB", "MB", "GB", "TB"):  # the unit the loop stops at is the answer
        if value < 1024 or unit == "TB":
            break
        value /= 1024
    return f"{size} B" if unit == "B" else f"{value:.2f} {unit}"


def _workspace_relative(real: Path, ctx: ToolContext) -> str:
    return real.relative_to(os.path.realpath(ctx.workspace)).as_posix() or "."


def _refuse_protected_tree(real: Path, path: str, ctx: ToolContext) -> None:
    """Deleting or moving the workspace, or a directory holding the job store, is never allowed."""
    workspace = Path(os.path.realpath(ctx.workspace))
    if real == workspace:
        raise PathDenied(f"Access denied: {path} is the workspace itself.")
    if ctx.store_root is not None and Path(os.path.realpath(ctx.store_root)).is_relative_to(real):
        raise PathDenied(f"Access denied: {path} contains the job store.")


# --- completion and todos -----------------------------------------------------------------------------


class _NoInput(_Input):
    pass


class _TodoInput(_Input):
    new_todos: list[str] | None = Field(None, description="Titles of todos to add.")
    completed_todos: list[int] | None = Field(None, description="Ids of todos that are done.")


@_tool
async def _attempt_completion(_args: _NoInput, ctx: ToolContext) -> ToolOutput:
    """Finish the task. If todos are still open, they are returned instead and the task continues."""
    remaining = [todo.to_dict() for todo in ctx.todos if not todo.completed]
    return {"remainingTodos": remaining} if remaining else {}


@_tool
async def _todo(args: _TodoInput, ctx: ToolContext) -> ToolOutput:
    """Manage the todo list: add todos by title (ids are assigned 0, 1, 2, ...) and mark ids completed.
    Returns the whole list."""
    next_id = max((todo.id for todo in ctx.todos), default=-1) + 1
    for offset, title in enumerate(args.new_todos or []):
        ctx.todos.append(Todo(id=next_id + offset, title=title))
    done = set(args.completed_todos or [])
    for todo in ctx.todos:
        if todo.id in done:
            todo.completed = True
    return {"todos": [todo.to_dict() for todo in ctx.todos]}


@_tool
async def _clear_todo(_args: _NoInput, ctx: ToolContext) -> ToolOutput:
    """Empty the todo list; new todos start again at id 0."""
    ctx.todos.clear()
    return {"todos": []}


# --- text files ---------------------------------------------------------------------------------------


class _PathInput(_Input):
    path: str = Field(description="Path, relative to the workspace or absolute inside it.")


class _ReadTextInput(_PathInput):
    from_: int | None = Field(None, alias="from", ge=0, description="First line to return (0-based).")
    to: int | None = Field(None, ge=0, description="Line to stop before (0-based, exclusive).")


class _WriteTextInput(_PathInput):
    text: str = Field(description="UTF-8 text to write.")


class _EditTextInput(_PathInput):
    old_text: str = Field(min_length=1, description="Exact text to find; the first occurrence is replaced.")
    new_text: str = Field(description="Text to put in its place.")


@_file_tool
def _read_text_file(args: _ReadTextInput, ctx: ToolContext) -> ToolOutput:
    """Read a UTF-8 text file, optionally only lines [from, to)."""
    real, _ = _readable_file(args.path, ctx)
    lines = _read_bytes(real, args.path).decode("utf-8", errors="replace").split("\n")
    start = args.from_ or 0
    end = len(lines) if args.to is None else min(args.to, len(lines))
    return {"path": str(real), "content": "\n".join(lines[start:end]), "from": start, "to": end}


@_file_tool
def _write_text_file(args: _WriteTextInput, ctx: ToolContext) -> ToolOutput:
    """Create or overwrite a text file. Its directory must exist (see createDirectory)."""
    real = resolve_in_workspace(args.path, ctx)
    _refuse_symlink(args.path, ctx)
    if real.exists():
        st = real.stat()
        if stat.S_ISDIR(st.st_mode):
            raise ToolError("IsADirectory", f"Path {args.path} is a directory.")
        _require_writable(args.path, st)
    _write_bytes(real, args.path, args.text.encode("utf-8"))
    return {"path": str(real), "text": args.text}


@_file_tool
def _append_text_file(args: _WriteTextInput, ctx: ToolContext) -> ToolOutput:
    """Append text to the end of an existing text file."""
    real = _writable_file(args.path, ctx)
    _write_bytes(real, args.path, args.text.encode("utf-8"), append=True)
    return {"path": str(real), "text": args.text}


@_file_tool
def _edit_text_file(args: _EditTextInput, ctx: ToolContext) -> ToolOutput:
    """Replace the first exact occurrence of oldText with newText in a text file (line endings normalised to
    LF). Use appendTextFile to add text at the end."""
    real = _writable_file(args.path, ctx)
    content = _read_bytes(real, args.path).decode("utf-8", errors="replace").replace("\r\n", "\n")
    old, new = args.old_text.replace("\r\n", "\n"), args.new_text.replace("\r\n", "\n")
    if old not in content:
        raise ToolError("NoMatch", f"Could not find exact match for oldText in file {args.path}.")
    _write_bytes(real, args.path, content.replace(old, new, 1).encode("utf-8"))
    return {"path": str(real), "newText": args.new_text, "oldText": args.old_text}


# --- directories and file management ------------------------------------------------------------------


class _ListInput(_Input):
    path: str = Field(".", description="Directory path; the workspace root by default.")


class _DeleteDirectoryInput(_PathInput):
    recursive: bool = Field(False, description="Also delete everything inside.")


class _MoveInput(_Input):
    source: str = Field(description="Current path.")
    destination: str = Field(description="New path; must not exist yet.")


@_file_tool
def _list_directory(args: _ListInput, ctx: ToolContext) -> ToolOutput:
    """List a directory's entries (name, workspace-relative path, type, size, modified), sorted by name."""
    real = _existing_directory(args.path, ctx)
    hidden = reserved_entries(real, ctx)
    items: list[dict[str, Any]] = []
    with os.scandir(real) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if hidden(entry.name):
                continue
            # lstat: a link is listed as a link, never described by what it points to (maybe outside).
            st = entry.stat(follow_symlinks=False)
            items.append(
                {
                    "name": entry.name,
                    "path": _workspace_relative(real / entry.name, ctx),
                    "type": _kind(st.st_mode),
                    "size": st.st_size,
                    "modified": _iso(st.st_mtime),
                }
            )
    return {"path": str(real), "items": items}


@_file_tool
def _get_file_info(args: _PathInput, ctx: ToolContext) -> ToolOutput:
    """Describe a file or directory: name, directory, extension, type, MIME type, size, times, permissions."""
    real, st = _stat_existing(args.path, ctx)
    is_dir = stat.S_ISDIR(st.st_mode)
    mime = None if is_dir else (mimetypes.guess_type(real.name)[0] or "application/octet-stream")
    created = getattr(st, "st_birthtime", st.st_ctime)  # birth time where the platform records it
    return {
        "exists": True,
        "path": _workspace_relative(real, ctx),
        "absolutePath": str(real),
        "name": real.name,
        "directory": str(real.parent),
        "extension": real.suffix or None,
        "type": _kind(st.st_mode),
        "mimeType": mime,
        "size": st.st_size,
        "sizeFormatted": _format_size(st.st_size),
        "created": _iso(created),
        "modified": _iso(st.st_mtime),
        "accessed": _iso(st.st_atime),
        "permissions": {
            "readable": os.access(real, os.R_OK),
            "writable": os.access(real, os.W_OK),
            "executable": os.access(real, os.X_OK),
        },
    }


@_file_tool
def _create_directory(args: _PathInput, ctx: ToolContext) -> ToolOutput:
    """Create one directory. Its parent must exist; create nested directories one level at a time."""
    real = resolve_in_workspace(args.path, ctx)
    if os.path.lexists(real):
        raise ToolError("AlreadyExists", f"Directory {args.path} already exists.")
    os.mkdir(real)
    return {"path": str(real)}


@_file_tool
def _delete_directory(args: _DeleteDirectoryInput, ctx: ToolContext) -> ToolOutput:
    """Delete a directory. Without recursive it must be empty."""
    real = _existing_directory(args.path, ctx)
    _refuse_symlink(args.path, ctx)
    _refuse_protected_tree(real, args.path, ctx)
    if args.recursive:
        shutil.rmtree(real)  # removes links inside, never what they point to
    else:
        try:
            os.rmdir(real)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise ToolError(
                    "NotEmpty", f"Directory {args.path} is not empty; set recursive to delete its contents."
                ) from None
            raise
    return {"path": str(real)}


@_file_tool
def _delete_file(args: _PathInput, ctx: ToolContext) -> ToolOutput:
    """Delete a file (not a directory; see deleteDirectory)."""
    real = _writable_file(args.path, ctx)
    os.unlink(real)
    return {"path": str(real)}


@_file_tool
def _move_file(args: _MoveInput, ctx: ToolContext) -> ToolOutput:
    """Move or rename a file or directory. The destination must not exist."""
    source = resolve_in_workspace(args.source, ctx)
    destination = resolve_in_workspace(args.destination, ctx)
    if not source.exists():
        raise ToolError("NotFound", f"Source file {args.source} does not exist.")
    _refuse_symlink(args.source, ctx)
    _refuse_protected_tree(source, args.source, ctx)
    _require_writable(args.source, source.stat())
    if os.path.lexists(destination):
        raise ToolError("AlreadyExists", f"Destination {args.destination} already exists.")
    os.rename(source, destination)
    return {"source": str(source), "destination": str(destination)}


# --- images and PDFs ----------------------------------------------------------------------------------


def _inline(
    path: str, ctx: ToolContext, mime_types: Mapping[str, str], limit: int, kind: str
) -> tuple[str, str]:
    """Base64 of a file checked like any other read, with its MIME type from the extension."""
    real, st = _readable_file(path, ctx)
    mime = mime_types.get(real.suffix.lower())
    if mime is None:
        allowed = ", ".join(sorted({ext.lstrip(".") for ext in mime_types}))
        raise ToolError("UnsupportedType", f"File type of {path} is not supported: use {allowed}.")

    def too_large(size: int) -> ToolError:
        message = f"{kind} file too large ({size / MIB:.1f}MB). Maximum supported size is {limit // MIB}MB."
        return ToolError("TooLarge", message)

    if st.st_size > limit:
        raise too_large(st.st_size)
    data = _read_bytes(real, path, limit)
    if len(data) > limit:  # it grew after the size check
        raise too_large(len(data))
    return base64.b64encode(data).decode("ascii"), mime


@_file_tool
def _read_image_file(args: _PathInput, ctx: ToolContext) -> ToolOutput:
    """Read an image (png, jpeg, gif, webp; at most 15 MB) to look at it."""
    data, mime = _inline(args.path, ctx, IMAGE_MIME_TYPES, IMAGE_MAX_BYTES, "Image")
    return InlinePart(type="imageInlinePart", encoded_data=data, mime_type=mime)


@_file_tool
def _read_pdf_file(args: _PathInput, ctx: ToolContext) -> ToolOutput:
    """Read a PDF document (at most 30 MB) to look at it."""
    data, mime = _inline(args.path, ctx, PDF_MIME_TYPES, PDF_MAX_BYTES, "PDF")
    return InlinePart(type="fileInlinePart", encoded_data=data, mime_type=mime)


# --- exec and health ----------------------------------------------------------------------------------


class _ExecInput(_Input):
    command: str = Field(min_length=1, description="Program to run (looked up on PATH). No shell.")
    args: list[str] = Field(default_factory=list, description="Arguments, one per item.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables.")
    cwd: str = Field(".", description="Working directory inside the workspace.")
    stdout: bool = Field(True, description="Include standard output in the result.")
    stderr: bool = Field(True, description="Include standard error in the result.")
    timeout: int = Field(EXEC_DEFAULT_TIMEOUT_MS, gt=0, description="Timeout in milliseconds.")


def _exec_cwd(path: str, ctx: ToolContext) -> Path:
    return _existing_directory(path, ctx)


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    # The command runs in its own session, so this also reaches the children it started.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def _read_capped(stream: asyncio.StreamReader | None, proc: asyncio.subprocess.Process) -> bytes | None:
    """The whole stream, or None when it passed the cap (the command is then killed, as execFile does)."""
    if stream is None:
        return b""
    data = bytearray()
    while chunk := await stream.read(64 * 1024):
        data.extend(chunk)
        if len(data) > EXEC_OUTPUT_MAX_BYTES:
            _kill_group(proc)
            return None
    return bytes(data)


async def _communicate(proc: asyncio.subprocess.Process) -> tuple[bytes, bytes, int]:
    # Both streams are drained together, or a command filling one pipe would block on it forever.
    out, err = await asyncio.gather(_read_capped(proc.stdout, proc), _read_capped(proc.stderr, proc))
    code = await proc.wait()
    if out is None or err is None:
        raise ToolError("OutputTooLarge", f"Command output exceeded {EXEC_OUTPUT_MAX_BYTES // MIB} MiB.")
    return out, err, code


@_tool
async def _exec(args: _ExecInput, ctx: ToolContext) -> ToolOutput:
    """Run a program with arguments (no shell) in a workspace directory and return its output. Only a few
    environment variables are passed through; add others with env."""
    cwd = await asyncio.to_thread(_exec_cwd, args.cwd, ctx)
    try:
        proc = await asyncio.create_subprocess_exec(
            args.command,
            *args.args,
            cwd=cwd,
            env=filtered_env(ctx.env, args.env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except FileNotFoundError:
        raise ToolError("CommandNotFound", f"Command {args.command} was not found.") from None
    try:
        out_bytes, err_bytes, code = await asyncio.wait_for(_communicate(proc), args.timeout / 1000)
    except TimeoutError:
        raise ToolError("TimeoutError", f"Command timed out after {args.timeout} ms.") from None
    finally:
        # Timeout, output cap, or the worker cancelling the step: the command must not outlive the call.
        if proc.returncode is None:
            _kill_group(proc)
            await proc.wait()
    stdout = out_bytes.decode("utf-8", errors="replace")
    stderr = err_bytes.decode("utf-8", errors="replace")
    if code != 0:
        reason = f"exit code {code}" if code > 0 else f"signal {-code}"
        streams = {"stdout": stdout} if args.stdout and stdout else {}
        if args.stderr and stderr:
            streams["stderr"] = stderr
        raise ToolError("CommandFailed", f"Command {args.command} failed with {reason}.", **streams)
    output = (stdout if args.stdout else "") + (stderr if args.stderr else "")
    return {"output": output if output.strip() else NO_OUTPUT}


def _resident_bytes() -> tuple[int, int]:
    """Current and peak resident memory: the nearest Python has to Node's heapUsed / heapTotal."""
    # ru_maxrss is kilobytes on Linux, bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    try:
        with open("/proc/self/statm") as f:
            current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        current = peak
    return current, peak


@_file_tool
def _health_check(_args: _NoInput, ctx: ToolContext) -> ToolOutput:
    """Check that the tools work: status, workspace, uptime, memory, pid."""
    current, peak = _resident_bytes()
    return {
        "status": "ok",
        "workspace": str(ctx.workspace),
        "uptime": round(time.monotonic() - _STARTED, 3),
        "memory": {"heapUsed": current, "heapTotal": peak},
        "pid": os.getpid(),
    }


# --- definitions offered to the model -----------------------------------------------------------------

_ORDER = (
    "attemptCompletion",
    "todo",
    "clearTodo",
    "readTextFile",
    "writeTextFile",
    "appendTextFile",
    "editTextFile",
    "listDirectory",
    "getFileInfo",
    "createDirectory",
    "deleteDirectory",
    "deleteFile",
    "moveFile",
    "exec",
    "healthCheck",
    "readImageFile",
    "readPdfFile",
)

# base tools that change nothing outside the step (todo and clearTodo change the step's own list, which only
# its checkpoint keeps): a step may run them before its model answer is journaled (`SkillSet.changes_nothing`)
CHANGE_NOTHING: frozenset[str] = frozenset(
    {
        "attemptCompletion",
        "todo",
        "clearTodo",
        "readTextFile",
        "listDirectory",
        "getFileInfo",
        "healthCheck",
        "readImageFile",
        "readPdfFile",
    }
)

BASE_TOOL_DEFINITIONS: list[ToolDefinition] = [
    ToolDefinition(
        skill_name=BASE_SKILL,
        name=_TOOLS[name].name,
        description=_TOOLS[name].description,
        input_schema=_input_schema(_TOOLS[name].input_model),
        kind="mcp",
    )
    for name in _ORDER
]
