"""Messages and their parts, tool calls and tool results, in Perstack's shapes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import Field

from shared.models.core import PerqModel, new_id

# --- message parts ------------------------------------------------------------------------------------------


class _Part(PerqModel):
    id: str = Field(default_factory=new_id)


class _MediaPart(_Part):
    """An image or a file. Perstack names a type per kind and carrier (`imageUrlPart`, `fileInlinePart`, …);
    the two kinds have the same fields, so perq has one model per carrier, and its `type` says the kind."""

    type: str
    mime_type: str

    @property
    def is_image(self) -> bool:
        return self.type.startswith("image")


class UrlPart(_MediaPart):
    """An image or a file given by its URL."""

    type: Literal["imageUrlPart", "fileUrlPart"]
    url: str


class InlinePart(_MediaPart):
    """An image or a file carried in the message, base64-encoded."""

    type: Literal["imageInlinePart", "fileInlinePart"]
    encoded_data: str  # base64


class BinaryPart(_MediaPart):
    """An image or a file carried in the message as Perstack's binary data."""

    type: Literal["imageBinaryPart", "fileBinaryPart"]
    data: str


class TextPart(_Part):
    type: Literal["textPart"] = "textPart"
    text: str


class ToolCallPart(_Part):
    type: Literal["toolCallPart"] = "toolCallPart"
    tool_call_id: str
    tool_name: str
    args: Any = Field(default_factory=dict)


class ThinkingPart(_Part):
    type: Literal["thinkingPart"] = "thinkingPart"
    thinking: str
    signature: str | None = None


def first_text(parts: Sequence[object], default: str = "") -> str:
    """The text of the first text part among a message's or a tool result's parts, or `default`."""
    return next((p.text for p in parts if isinstance(p, TextPart)), default)


ToolResultContent = Annotated[TextPart | InlinePart, Field(discriminator="type")]


class ToolResultPart(_Part):
    type: Literal["toolResultPart"] = "toolResultPart"
    tool_call_id: str
    tool_name: str
    contents: list[ToolResultContent]
    is_error: bool | None = None


MessagePart = Annotated[
    TextPart | UrlPart | InlinePart | BinaryPart | ToolCallPart | ThinkingPart | ToolResultPart,
    Field(discriminator="type"),
]
UserContent = Annotated[TextPart | UrlPart | InlinePart | BinaryPart, Field(discriminator="type")]
ExpertContent = Annotated[TextPart | ToolCallPart | ThinkingPart, Field(discriminator="type")]


# --- messages -----------------------------------------------------------------------------------------------


class _Message(PerqModel):
    id: str = Field(default_factory=new_id)
    cache: bool | None = None  # a prompt-caching hint (Anthropic's ephemeral cache control)


class InstructionMessage(_Message):
    type: Literal["instructionMessage"] = "instructionMessage"
    contents: list[TextPart]


class UserMessage(_Message):
    type: Literal["userMessage"] = "userMessage"
    contents: list[UserContent]
    # perq: marks the note a failed generation leaves behind, so that "answers so far" can be counted
    # (the script provider's turn index, spec-compatible because Perstack ignores unknown keys)
    retry: bool | None = None


class ExpertMessage(_Message):
    type: Literal["expertMessage"] = "expertMessage"
    contents: list[ExpertContent]

    @property
    def text(self) -> str:
        """The first text part's text, or "" (what a delegate returns to its parent)."""
        return first_text(self.contents)

    @property
    def tool_calls(self) -> list[ToolCallPart]:
        return [p for p in self.contents if isinstance(p, ToolCallPart)]


class ToolMessage(_Message):
    type: Literal["toolMessage"] = "toolMessage"
    contents: list[ToolResultPart]


Message = Annotated[
    InstructionMessage | UserMessage | ExpertMessage | ToolMessage, Field(discriminator="type")
]


# --- tools --------------------------------------------------------------------------------------------------


class ToolCall(PerqModel):
    id: str = Field(min_length=1, max_length=255)
    skill_name: str = Field(max_length=255)
    tool_name: str = Field(max_length=255)
    args: dict[str, Any] = Field(default_factory=dict)


class ToolResult(PerqModel):
    id: str
    skill_name: str
    tool_name: str
    result: list[MessagePart]


# the parts of a tool result that a tool message carries to the model
MESSAGE_PART_TYPES = ("textPart", "imageInlinePart", "fileInlinePart")


def tool_message(results: list[ToolResult]) -> ToolMessage:
    """One tool message answering every result; only text / inline image / inline file contents pass."""
    return ToolMessage(
        contents=[
            ToolResultPart(
                tool_call_id=r.id,
                tool_name=r.tool_name,
                contents=[p for p in r.result if p.type in MESSAGE_PART_TYPES],
            )
            for r in results
        ]
    )


class ToolDefinition(PerqModel):
    """A tool as offered to the model: its bare name, description and JSON schema of its arguments."""

    skill_name: str
    name: str
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    kind: Literal["mcp", "delegate", "interactive"] = "mcp"


class Todo(PerqModel):
    id: int
    title: str
    completed: bool = False
