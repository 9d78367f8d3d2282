"""filtered_env: what a child process may see of the worker's environment (spec §6.5)."""

from __future__ import annotations

from worker.skills.envfilter import filtered_env

WORKER_ENV = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/home/worker",
    "SHELL": "/bin/bash",
    "TERM": "xterm",
    "NODE_PATH": "/opt/node",
    "HTTP_PROXY": "http://proxy:3128",
    "https_proxy": "http://proxy:3128",
    "no_proxy": "localhost",
    "PERSTACK_PROXY_URL": "http://proxy:8080",
    "NPM_CONFIG_PROXY": "http://proxy:3128",
    "NPM_CONFIG_HTTPS_PROXY": "http://proxy:3128",
    "ANTHROPIC_API_KEY": "sk-ant-secret",
    "OPENAI_API_KEY": "sk-openai-secret",
    "REDIS_URL": "redis://:password@redis:6379",
    "LD_PRELOAD": "/tmp/evil.so",
    "PYTHONPATH": "/srv/app",
}


def test_passes_only_safe_variables() -> None:
    env = filtered_env(WORKER_ENV)
    assert env == {
        "PATH": "/usr/bin:/bin",
        "HOME": "/home/worker",
        "SHELL": "/bin/bash",
        "TERM": "xterm",
        "NODE_PATH": "/opt/node",
        "HTTP_PROXY": "http://proxy:3128",
        "https_proxy": "http://proxy:3128",
        "no_proxy": "localhost",
        "PERSTACK_PROXY_URL": "http://proxy:8080",
        "NPM_CONFIG_PROXY": "http://proxy:3128",
        "NPM_CONFIG_HTTPS_PROXY": "http://proxy:3128",
    }


def test_provider_keys_never_pass() -> None:
    env = filtered_env(WORKER_ENV, {"FOO": "bar"})
    assert "ANTHROPIC_API_KEY" not in env
    assert "OPENAI_API_KEY" not in env
    assert "REDIS_URL" not in env
    assert "sk-ant-secret" not in env.values()


def test_missing_safe_variables_are_simply_absent() -> None:
    assert filtered_env({"ANTHROPIC_API_KEY": "x"}) == {}
    assert filtered_env({}) == {}


def test_extra_variables_are_added() -> None:
    env = filtered_env(WORKER_ENV, {"FOO": "bar", "TERM": "dumb", "ANTHROPIC_API_KEY": "given-on-purpose"})
    assert env["FOO"] == "bar"
    assert env["TERM"] == "dumb"  # TERM is safe but not protected: a caller may set it
    assert env["ANTHROPIC_API_KEY"] == "given-on-purpose"  # only an explicitly given value passes


def test_protected_variables_cannot_be_overridden() -> None:
    extra = {
        "PATH": "/evil",
        "HOME": "/evil",
        "SHELL": "/evil/sh",
        "NODE_PATH": "/evil",
        "LD_PRELOAD": "/evil.so",
        "LD_LIBRARY_PATH": "/evil",
        "DYLD_INSERT_LIBRARIES": "/evil.dylib",
        "DYLD_LIBRARY_PATH": "/evil",
        "NODE_OPTIONS": "--require /evil.js",
        "PYTHONPATH": "/evil",
        "PERL5LIB": "/evil",
        "RUBYLIB": "/evil",
    }
    env = filtered_env(WORKER_ENV, extra)
    assert env["PATH"] == "/usr/bin:/bin"
    assert env["HOME"] == "/home/worker"
    assert env["SHELL"] == "/bin/bash"
    assert env["NODE_PATH"] == "/opt/node"
    for name in ("LD_PRELOAD", "LD_LIBRARY_PATH", "DYLD_INSERT_LIBRARIES", "DYLD_LIBRARY_PATH"):
        assert name not in env
    for name in ("NODE_OPTIONS", "PYTHONPATH", "PERL5LIB", "RUBYLIB"):
        assert name not in env


def test_protected_names_are_matched_case_insensitively() -> None:
    env = filtered_env({}, {"ld_preload": "/evil.so", "Path": "/evil", "dyld_foo": "x"})
    assert env == {}


def test_protected_variable_absent_from_source_stays_absent() -> None:
    assert "PATH" not in filtered_env({}, {"PATH": "/evil"})


def test_entries_that_cannot_be_in_an_environment_are_dropped() -> None:
    env = filtered_env({}, {"A=B": "x", "": "x", "NUL": "a\0b", "OK": "fine"})
    assert env == {"OK": "fine"}


def test_source_is_not_modified() -> None:
    source = dict(WORKER_ENV)
    filtered_env(source, {"FOO": "bar"})
    assert source == WORKER_ENV
