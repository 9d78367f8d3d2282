"""perstack.toml: read as leniently as Perstack reads it, with errors that name the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import ConfigError, build_experts, find_config, load_config


def test_config_is_lenient_like_perstack(tmp_path: Path) -> None:
    path = tmp_path / "perstack.toml"
    path.write_text(
        """
        model = "m"
        unknownTop = 1
        [provider]
        providerName = "openai"
        envPath = [".env"]        # misplaced in Perstack's own e2e files: must not break loading
        [experts."a"]
        instruction = "x"
        futureKey = true
        delegates = ["b"]
        [experts."b"]
        instruction = "y"
        [experts."b".skills."@perstack/base"]
        type = "mcpStdioSkill"
        command = "npx"
        packageName = "@perstack/base"
        pick = ["todo"]
    """.replace("\n        ", "\n")
    )
    config = load_config(path)
    experts = build_experts(config)
    assert config.provider is not None and config.provider.provider_name == "openai"
    assert experts["a"].delegates == ["b"]
    assert list(experts["a"].skills) == ["@perstack/base"]  # the default skills
    assert experts["b"].skills["@perstack/base"].pick == ["todo"]
    nested = tmp_path / "x" / "y"
    nested.mkdir(parents=True)
    assert find_config(None, nested) == path


def test_config_errors_name_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "perstack.toml"
    path.write_text('[experts.a]\ninstruction = "x"\ndelegates = ["ghost"]\n')
    with pytest.raises(ConfigError, match='delegate expert "ghost" of "a" not found'):
        build_experts(load_config(path))
    path.write_text("[experts.a]\n")
    with pytest.raises(ConfigError, match="instruction"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        find_config(str(tmp_path / "none.toml"))
