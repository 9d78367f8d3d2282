"""The environment a child process (exec, stdio MCP skill) may see: Perstack's safe list, plus what a skill
declares.

A worker's environment holds provider API keys and other secrets; a child gets only the few variables it
needs to run plus what the caller passes on purpose. The caller cannot override the variables that decide
which binary or library a child loads, so an argument from a model cannot turn exec into code injection.
"""

from __future__ import annotations

from collections.abc import Mapping

# Passed through from the worker's environment when set.
SAFE_VARIABLES: frozenset[str] = frozenset(
    {
        "PATH",
        "HOME",
        "SHELL",
        "TERM",
        "NODE_PATH",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "PERSTACK_PROXY_URL",
        "NPM_CONFIG_PROXY",
        "NPM_CONFIG_HTTPS_PROXY",
    }
)

# Never taken from `extra`: they choose the binaries, libraries and interpreter start-up code a child runs.
PROTECTED_VARIABLES: frozenset[str] = frozenset(
    {
        "PATH",
        "HOME",
        "SHELL",
        "NODE_PATH",
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "NODE_OPTIONS",
        "PYTHONPATH",
        "PERL5LIB",
        "RUBYLIB",
    }
)
PROTECTED_PREFIXES: tuple[str, ...] = ("DYLD_",)


def is_protected(name: str) -> bool:
    # Compared case-insensitively: on a case-insensitive platform `path` is PATH, and refusing `ld_preload`
    # on Linux costs nothing.
    upper = name.upper()
    return upper in PROTECTED_VARIABLES or upper.startswith(PROTECTED_PREFIXES)


def _valid_entry(name: str, value: str) -> bool:
    # A name with "=" or a NUL in either part cannot be put in an environment block (execve would fail).
    return bool(name) and "=" not in name and "\0" not in name and "\0" not in value


def filtered_env(source: Mapping[str, str], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The safe variables of `source`, plus `extra` minus the protected names."""
    env = {name: value for name, value in source.items() if name in SAFE_VARIABLES}
    for name, value in (extra or {}).items():
        if not is_protected(name) and _valid_entry(name, value):
            env[name] = value
    return env
