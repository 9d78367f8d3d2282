"""MCP's shapes to perq's: tool listings to ToolDefinitions, tool results to message parts."""

from __future__ import annotations

import json
from typing import Any

from mcp import types

from shared.models import InlinePart, TextPart, ToolDefinition, ToolResultContent
from worker.skills.toolset import call_error_text


def tool_definitions(skill_name: str, tools: list[types.Tool]) -> list[ToolDefinition]:
    return [
        ToolDefinition(
            skill_name=skill_name,
            name=tool.name,
            description=tool.description,
            input_schema=dict(tool.input_schema or {"type": "object", "properties": {}}),
        )
        for tool in tools
    ]


def _content_part(block: Any) -> ToolResultContent | None:
    """text, image and embedded resources pass; audio and resource links are dropped, as in Perstack."""
    if isinstance(block, types.TextContent):
        return TextPart(text=block.text)
    if isinstance(block, types.ImageContent):
        return InlinePart(type="imageInlinePart", encoded_data=block.data, mime_type=block.mime_type)
    if isinstance(block, types.EmbeddedResource):
        resource = block.resource
        if isinstance(resource, types.TextResourceContents):
            return TextPart(text=resource.text)
        if isinstance(resource, types.BlobResourceContents):
            return InlinePart(
                type="fileInlinePart",
                encoded_data=resource.blob,
                mime_type=resource.mime_type or "application/octet-stream",
            )
    return None


def _texts(blocks: list[Any]) -> str:
    return "\n".join(b.text for b in blocks if isinstance(b, types.TextContent))


def result_contents(
    tool_name: str, args: dict[str, Any], result: types.CallToolResult
) -> list[ToolResultContent]:
    """What the model reads: the converted parts, or a sentence saying what failed or that nothing came."""
    if result.is_error:
        return call_error_text(tool_name, _texts(result.content) or "the tool reported an error")
    parts = [p for p in (_content_part(b) for b in result.content) if p is not None]
    if not parts:
        shown = json.dumps(args, ensure_ascii=False, default=str)
        return [TextPart(text=f"Tool {tool_name} returned nothing with arguments: {shown}")]
    return parts
