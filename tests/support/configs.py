"""perstack.toml pieces several tests share, written as data (tomli-w) so that each test can add its own
experts beside them."""

from __future__ import annotations

from typing import Any

import tomli_w

BASE_SKILL = {"type": "mcpStdioSkill", "command": "npx", "packageName": "@perstack/base"}
ASK_USER = {
    "description": "Ask the user a question",
    "inputJsonSchema": '{"type": "object", "properties": {"question": {"type": "string"}}}',
}


def asker_toml(**fields: Any) -> str:
    """The `asker` expert: the base skill and an interactive `askUser` tool; `fields` adds to its table
    (`delegates`, `description`)."""
    user_input = {"type": "interactiveSkill", "tools": {"askUser": ASK_USER}}
    skills = {"@perstack/base": BASE_SKILL, "user-input": user_input}
    asker = {"instruction": "Ask the user", **fields, "skills": skills}
    return "\n" + tomli_w.dumps({"experts": {"asker": asker}})


# an asker that can also delegate to `helper`
ASKER_WITH_HELPER = (
    asker_toml(delegates=["helper"]) + '\n[experts.helper]\ndescription = "Helps"\ninstruction = "Help"\n'
)
