"""The pydantic-ai provider: conversions both ways, reasoning budgets, provider settings, error handling,
and the HTTP path against a fake OpenAI-compatible server on 127.0.0.1 (never the internet)."""

from __future__ import annotations

import base64
import json
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from pydantic_ai import messages as pai
from pydantic_ai.exceptions import ModelConnectionError, ModelHTTPError, UnexpectedModelBehavior
from pydantic_ai.usage import RequestUsage

from shared.models import (
    BinaryPart,
    ExpertMessage,
    InlinePart,
    InstructionMessage,
    Message,
    ProviderConfig,
    TextPart,
    ThinkingPart,
    ToolCallPart,
    ToolDefinition,
    ToolMessage,
    ToolResultPart,
    UrlPart,
    UserMessage,
)
from worker.models import pydantic_ai as prov
from worker.models.contract import GenerationError, GenerationRequest

PNG = b"\x89PNG\r\n\x1a\nfake"
PNG_B64 = base64.b64encode(PNG).decode()


# --- perq → pydantic-ai -------------------------------------------------------------------------------


def _history() -> list[Message]:
    return [
        InstructionMessage(
            contents=[TextPart(text="You are a helper."), TextPart(text="Be brief.")], cache=True
        ),
        UserMessage(contents=[TextPart(text="read the file")]),
        ExpertMessage(
            # stored out of order on purpose: the replay must put thinking → text → tool calls
            contents=[
                ToolCallPart(tool_call_id="call_1", tool_name="readTextFile", args={"path": "a.txt"}),
                TextPart(text="Reading it."),
                ThinkingPart(thinking="I should read a.txt", signature="sig-1"),
            ]
        ),
        ToolMessage(
            contents=[
                ToolResultPart(
                    tool_call_id="call_1",
                    tool_name="readTextFile",
                    contents=[TextPart(text="line 1"), TextPart(text="line 2")],
                )
            ]
        ),
        UserMessage(contents=[TextPart(text='{"error": "X", "message": "retry"}')], retry=True),
    ]


def test_history_groups_request_messages_and_orders_response_parts() -> None:
    out = prov.to_model_messages(_history(), provider_name="anthropic")
    assert [m.kind for m in out] == ["request", "response", "request"]

    first = out[0]
    assert isinstance(first, pai.ModelRequest)
    system, user = first.parts
    assert isinstance(system, pai.SystemPromptPart) and system.content == "You are a helper.\nBe brief."
    assert isinstance(user, pai.UserPromptPart) and user.content == "read the file"

    response = out[1]
    assert isinstance(response, pai.ModelResponse)
    assert [p.part_kind for p in response.parts] == ["thinking", "text", "tool-call"]
    thinking, text, call = response.parts
    assert isinstance(thinking, pai.ThinkingPart)
    assert (thinking.content, thinking.signature, thinking.provider_name) == (
        "I should read a.txt",
        "sig-1",
        "anthropic",
    )
    assert isinstance(text, pai.TextPart) and text.content == "Reading it."
    assert isinstance(call, pai.ToolCallPart)
    assert (call.tool_call_id, call.tool_name, call.args) == ("call_1", "readTextFile", {"path": "a.txt"})

    last = out[2]
    assert isinstance(last, pai.ModelRequest)
    ret, retry_note = last.parts
    assert isinstance(ret, pai.ToolReturnPart)
    assert (ret.tool_call_id, ret.tool_name, ret.content) == ("call_1", "readTextFile", "line 1\nline 2")
    assert isinstance(retry_note, pai.UserPromptPart)


def test_user_media_parts() -> None:
    message = UserMessage(
        contents=[
            TextPart(text="look"),
            UrlPart(type="imageUrlPart", url="https://example.com/a.png", mime_type="image/png"),
            UrlPart(type="fileUrlPart", url="https://example.com/a.pdf", mime_type="application/pdf"),
            InlinePart(type="imageInlinePart", encoded_data=PNG_B64, mime_type="image/png"),
            InlinePart(
                type="fileInlinePart",
                encoded_data=base64.b64encode(b"%PDF-1").decode(),
                mime_type="application/pdf",
            ),
            BinaryPart(
                type="imageBinaryPart", data=f"data:image/png;base64,{PNG_B64}", mime_type="image/png"
            ),
        ]
    )
    (request,) = prov.to_model_messages([message], provider_name="openai")
    assert isinstance(request, pai.ModelRequest)
    (part,) = request.parts
    assert isinstance(part, pai.UserPromptPart) and not isinstance(part.content, str)
    text, image_url, doc_url, image, doc, image_from_uri = part.content
    assert text == "look"
    assert isinstance(image_url, pai.ImageUrl) and image_url.url == "https://example.com/a.png"
    assert isinstance(doc_url, pai.DocumentUrl) and doc_url.media_type == "application/pdf"
    assert isinstance(image, pai.BinaryContent) and image.data == PNG and image.media_type == "image/png"
    assert isinstance(doc, pai.BinaryContent) and doc.data == b"%PDF-1"
    assert isinstance(image_from_uri, pai.BinaryContent) and image_from_uri.data == PNG


def test_cache_hint_becomes_cache_point_only_for_anthropic() -> None:
    message = UserMessage(contents=[TextPart(text="hi")], cache=True)
    (anthropic,) = prov.to_model_messages([message], provider_name="anthropic")
    (openai,) = prov.to_model_messages([message], provider_name="openai")
    assert isinstance(anthropic, pai.ModelRequest) and isinstance(openai, pai.ModelRequest)
    a_part, o_part = anthropic.parts[0], openai.parts[0]
    assert isinstance(a_part, pai.UserPromptPart) and isinstance(o_part, pai.UserPromptPart)
    assert isinstance(a_part.content[-1], pai.CachePoint)
    assert o_part.content == "hi"


def test_tool_result_with_image_and_error_flag() -> None:
    message = ToolMessage(
        contents=[
            ToolResultPart(
                tool_call_id="c1",
                tool_name="screenshot",
                contents=[
                    TextPart(text="here"),
                    InlinePart(type="imageInlinePart", encoded_data=PNG_B64, mime_type="image/png"),
                ],
            ),
            ToolResultPart(
                tool_call_id="c2", tool_name="fail", contents=[TextPart(text="boom")], is_error=True
            ),
        ]
    )
    (anthropic,) = prov.to_model_messages([message], provider_name="anthropic")
    assert isinstance(anthropic, pai.ModelRequest)
    shot, failed = anthropic.parts
    assert isinstance(shot, pai.ToolReturnPart) and isinstance(failed, pai.ToolReturnPart)
    assert isinstance(shot.content, list)
    text, image = shot.content
    assert text == "here" and isinstance(image, pai.BinaryContent) and image.data == PNG
    assert failed.outcome == "failed"  # Anthropic's is_error
    (openai,) = prov.to_model_messages([message], provider_name="openai")
    assert isinstance(openai, pai.ModelRequest)
    openai_failed = openai.parts[1]
    # no native error channel: the text goes out exactly as the tool wrote it
    assert isinstance(openai_failed, pai.ToolReturnPart) and openai_failed.outcome == "success"


def test_unsigned_thinking_is_not_attributed_and_string_args_pass_through() -> None:
    message = ExpertMessage(
        contents=[
            ThinkingPart(thinking="hmm"),
            ToolCallPart(tool_call_id="c", tool_name="t", args='{"a": 1}'),
        ]
    )
    (response,) = prov.to_model_messages([message], provider_name="deepseek", system="deepseek")
    assert isinstance(response, pai.ModelResponse)
    thinking, call = response.parts
    assert isinstance(thinking, pai.ThinkingPart) and thinking.provider_name is None
    assert isinstance(call, pai.ToolCallPart) and call.args_as_dict() == {"a": 1}


def test_tool_definitions_and_tool_less_parameters() -> None:
    tool = ToolDefinition(
        skill_name="@perstack/base",
        name="readTextFile",
        description="Read a file",
        input_schema={"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
    )
    params = prov.request_parameters([tool])
    (definition,) = params.function_tools
    assert definition.name == "readTextFile"
    assert definition.description == "Read a file"
    assert definition.parameters_json_schema["required"] == ["path"]
    assert params.allow_text_output is True
    assert prov.request_parameters([]).function_tools == []


# --- pydantic-ai → perq -------------------------------------------------------------------------------


def _response(
    *parts: pai.ModelResponsePart, finish_reason: Any = None, usage: RequestUsage | None = None
) -> pai.ModelResponse:
    return pai.ModelResponse(
        parts=list(parts),
        usage=usage or RequestUsage(),
        finish_reason=finish_reason,
        timestamp=datetime.now(UTC),
    )


def test_response_with_thinking_text_and_tool_calls() -> None:
    response = _response(
        pai.ThinkingPart("let me think", signature="sig", provider_name="anthropic"),
        pai.TextPart("Calling "),
        pai.TextPart("tools."),
        pai.ToolCallPart("readTextFile", '{"path": "a.txt"}', "call_a"),
        pai.ToolCallPart("listDirectory", {"path": "."}, "call_b"),
        pai.ToolCallPart("noArgs", None, "call_c"),
        finish_reason="tool_call",
        usage=RequestUsage(
            input_tokens=100, output_tokens=20, cache_read_tokens=60, output_reasoning_tokens=7
        ),
    )
    result = prov.to_generation_result(response)
    assert result.text == "Calling tools."
    assert [(t.thinking, t.signature) for t in result.thinking] == [("let me think", "sig")]
    assert [(c.id, c.tool_name, c.args) for c in result.tool_calls] == [
        ("call_a", "readTextFile", {"path": "a.txt"}),
        ("call_b", "listDirectory", {"path": "."}),
        ("call_c", "noArgs", {}),
    ]
    assert result.finish_reason == "tool-calls"
    assert result.usage.input_tokens == 100
    assert result.usage.output_tokens == 20
    assert result.usage.total_tokens == 120
    assert result.usage.cached_input_tokens == 60
    assert result.usage.reasoning_tokens == 7


def test_reasoning_tokens_from_details() -> None:
    response = _response(pai.TextPart("x"), usage=RequestUsage(input_tokens=1, output_tokens=2))
    response.usage.details["reasoning_tokens"] = 5
    assert prov.to_generation_result(response).usage.reasoning_tokens == 5


@pytest.mark.parametrize(
    ("reason", "has_calls", "expected"),
    [
        ("stop", False, "stop"),
        (None, False, "stop"),
        ("stop", True, "tool-calls"),
        (None, True, "tool-calls"),
        ("tool_call", True, "tool-calls"),
        ("length", False, "length"),
        ("length", True, "length"),
        ("content_filter", False, "other"),
        ("error", False, "other"),
    ],
)
def test_finish_reason(reason: Any, has_calls: bool, expected: str) -> None:
    parts: list[pai.ModelResponsePart] = [pai.TextPart("t")]
    if has_calls:
        parts.append(pai.ToolCallPart("t", {}, "c"))
    assert prov.to_generation_result(_response(*parts, finish_reason=reason)).finish_reason == expected


def test_empty_response_has_no_text() -> None:
    result = prov.to_generation_result(_response(pai.TextPart(""), finish_reason="stop"))
    assert result.text is None and result.tool_calls == [] and result.finish_reason == "stop"


def test_malformed_tool_args_are_a_retryable_error() -> None:
    with pytest.raises(GenerationError) as info:
        prov.to_generation_result(_response(pai.ToolCallPart("t", "{not json", "c")))
    assert info.value.is_retryable and info.value.name == "InvalidToolArgumentsError"
    with pytest.raises(GenerationError):
        prov.to_generation_result(_response(pai.ToolCallPart("t", "[1, 2]", "c")))


def test_redacted_thinking_round_trips() -> None:
    redacted = pai.ThinkingPart("", id="redacted_thinking", signature="opaque", provider_name="anthropic")
    result = prov.to_generation_result(_response(redacted, pai.TextPart("ok")))
    (part,) = result.thinking
    assert part.thinking == "" and part.signature == "opaque"
    (replayed,) = prov.to_model_messages([ExpertMessage(contents=[part])], provider_name="anthropic")
    assert isinstance(replayed, pai.ModelResponse)
    (thinking,) = replayed.parts
    assert isinstance(thinking, pai.ThinkingPart)
    assert (thinking.id, thinking.signature, thinking.provider_name) == (
        "redacted_thinking",
        "opaque",
        "anthropic",
    )


# --- reasoning budget (spec §7.2) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "tokens"),
    [("minimal", 1024), ("low", 2048), ("medium", 5000), ("high", 10000), (3000, 3000), (100, 1024)],
)
def test_anthropic_budget(budget: Any, tokens: int) -> None:
    assert prov.reasoning_settings("anthropic", "claude-sonnet-4-5", budget) == {
        "anthropic_thinking": {"type": "enabled", "budget_tokens": tokens}
    }


@pytest.mark.parametrize("budget", ["none", 0])
def test_anthropic_budget_off(budget: Any) -> None:
    assert prov.reasoning_settings("anthropic", "claude-sonnet-4-5", budget) == {"thinking": False}


def test_anthropic_adaptive_only_models_get_unified_thinking() -> None:
    settings = prov.reasoning_settings("anthropic", "claude-opus-4-7", 6000, budget_thinking_allowed=False)
    assert settings == {"thinking": "high"}


@pytest.mark.parametrize(
    ("budget", "effort"),
    [
        ("minimal", "low"),
        ("low", "low"),
        ("medium", "medium"),
        ("high", "high"),
        (2048, "low"),
        (2049, "medium"),
        (5000, "medium"),
        (5001, "high"),
    ],
)
def test_openai_effort(budget: Any, effort: str) -> None:
    assert prov.reasoning_settings("openai", "o4-mini", budget) == {"openai_reasoning_effort": effort}
    assert prov.reasoning_settings("openai", "gpt-5-mini", budget) == {"openai_reasoning_effort": effort}


def test_openai_effort_only_for_reasoning_models() -> None:
    assert prov.reasoning_settings("openai", "gpt-4o", "high") == {}
    assert prov.reasoning_settings("openai", "o3", "none") == {}
    assert prov.is_openai_reasoning_model("o1")
    assert prov.is_openai_reasoning_model("gpt-5.1")
    assert not prov.is_openai_reasoning_model("gpt-4.1")


def test_other_providers_take_no_reasoning_options() -> None:
    assert prov.reasoning_settings("ollama", "qwen3", "high") == {}
    assert prov.reasoning_settings("deepseek", "deepseek-reasoner", "high") == {}


# --- provider settings (spec §7.1) --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "var"),
    [("anthropic", "ANTHROPIC_API_KEY"), ("openai", "OPENAI_API_KEY"), ("deepseek", "DEEPSEEK_API_KEY")],
)
def test_missing_key(provider: str, var: str) -> None:
    with pytest.raises(GenerationError) as info:
        prov.resolve_client_settings(ProviderConfig(provider_name=provider), "m", env={var: ""})
    assert info.value.message == f"{var} is not set"
    assert not info.value.is_retryable


async def test_missing_key_surfaces_from_generate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    client = prov.PydanticAIModel(ProviderConfig(provider_name="anthropic"), "claude-sonnet-4-5")
    with pytest.raises(GenerationError, match="ANTHROPIC_API_KEY is not set") as info:
        await client.generate(GenerationRequest(expert_key="e", messages=[], tools=[]))
    assert not info.value.is_retryable


def test_config_overrides_env() -> None:
    env = {
        "OPENAI_API_KEY": "k",
        "OPENAI_BASE_URL": "https://env.example/v1",
        "OPENAI_ORGANIZATION": "org-env",
        "OPENAI_PROJECT": "proj-env",
    }
    from_env = prov.resolve_client_settings(ProviderConfig(provider_name="openai"), "gpt-4o", env=env)
    assert (from_env.base_url, from_env.organization, from_env.project) == (
        "https://env.example/v1",
        "org-env",
        "proj-env",
    )
    config = ProviderConfig(
        provider_name="openai",
        base_url="https://cfg.example/v1",
        organization="org-cfg",
        headers={"X-A": "1"},
    )
    from_cfg = prov.resolve_client_settings(config, "gpt-4o", env=env)
    assert (from_cfg.base_url, from_cfg.organization, from_cfg.project) == (
        "https://cfg.example/v1",
        "org-cfg",
        "proj-env",
    )
    assert from_cfg.headers == (("X-A", "1"),)


def test_ollama_and_deepseek_defaults() -> None:
    ollama = prov.resolve_client_settings(ProviderConfig(provider_name="ollama"), "llama3", env={})
    assert ollama.base_url == "http://localhost:11434/v1" and ollama.api_key
    bare = prov.resolve_client_settings(
        ProviderConfig(provider_name="ollama"), "llama3", env={"OLLAMA_BASE_URL": "http://gpu:11434"}
    )
    assert bare.base_url == "http://gpu:11434/v1"
    deepseek = prov.resolve_client_settings(
        ProviderConfig(provider_name="deepseek"), "deepseek-chat", env={"DEEPSEEK_API_KEY": "k"}
    )
    assert deepseek.base_url == "https://api.deepseek.com"


@pytest.mark.parametrize(
    ("provider", "env", "missing"),
    [
        ("google", {}, "GOOGLE_GENERATIVE_AI_API_KEY"),
        ("azure-openai", {"AZURE_RESOURCE_NAME": "r"}, "AZURE_API_KEY"),
        ("azure-openai", {"AZURE_API_KEY": "k"}, "AZURE_RESOURCE_NAME"),
        ("amazon-bedrock", {"AWS_ACCESS_KEY_ID": "a"}, "AWS_REGION"),
        ("google-vertex", {"GOOGLE_VERTEX_LOCATION": "l"}, "GOOGLE_VERTEX_PROJECT"),
        ("google-vertex", {"GOOGLE_VERTEX_PROJECT": "p"}, "GOOGLE_VERTEX_LOCATION"),
    ],
)
def test_missing_setting_of_the_newer_providers(provider: str, env: dict[str, str], missing: str) -> None:
    with pytest.raises(GenerationError, match=f"^{missing} is not set") as info:
        prov.resolve_client_settings(ProviderConfig(provider_name=provider), "m", env=env)
    assert not info.value.is_retryable


def test_settings_of_the_newer_providers() -> None:
    google = prov.resolve_client_settings(
        ProviderConfig(provider_name="google"),
        "gemini-2.5-flash",
        env={
            "GOOGLE_GENERATIVE_AI_API_KEY": "k",
            "GOOGLE_GENERATIVE_AI_BASE_URL": "https://gw.example/g/v1beta",
        },
    )
    assert (google.base_url, google.api_version) == ("https://gw.example/g/", "v1beta")
    vertex = prov.resolve_client_settings(
        ProviderConfig(provider_name="google-vertex", project="cfg-project"),
        "gemini-2.5-pro",
        env={
            "GOOGLE_VERTEX_PROJECT": "env-project",
            "GOOGLE_VERTEX_LOCATION": "us-east5",
            "GOOGLE_VERTEX_BASE_URL": "https://h.example/v1/projects/p/locations/l/publishers/google",
        },
    )
    assert (vertex.project, vertex.location, vertex.api_key) == ("cfg-project", "us-east5", None)
    assert (vertex.base_url, vertex.api_version) == ("https://h.example/", "v1")
    azure = prov.resolve_client_settings(
        ProviderConfig(provider_name="azure-openai"),
        "dep",
        env={"AZURE_API_KEY": "k", "AZURE_RESOURCE_NAME": "r"},
    )
    assert (azure.base_url, azure.api_version, azure.deployment_urls) == (
        "https://r.openai.azure.com/openai",
        "v1",
        False,
    )
    bedrock = prov.resolve_client_settings(
        ProviderConfig(provider_name="amazon-bedrock", region="eu-west-3"),
        "amazon.nova-pro-v1:0",
        env={"AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "S"},
    )
    assert (bedrock.location, bedrock.api_key, bedrock.secret_key) == ("eu-west-3", "AKID", "S")
    # secrets never show in a settings object's repr (logs, tracebacks)
    assert "AKID" not in repr(bedrock) and "'S'" not in repr(bedrock) and "'k'" not in repr(azure)


@pytest.mark.parametrize(("provider", "module"), [("google", "google.genai"), ("amazon-bedrock", "boto3")])
async def test_a_worker_without_the_extra_says_which_to_install(
    monkeypatch: pytest.MonkeyPatch, provider: str, module: str
) -> None:
    # None in sys.modules makes the import fail as it does where the package is not installed
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setenv("GOOGLE_GENERATIVE_AI_API_KEY", "k")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    client = prov.PydanticAIModel(ProviderConfig(provider_name=provider), "m")
    with pytest.raises(GenerationError) as info:
        await client.generate(GenerationRequest(expert_key="e", messages=[], tools=[]))
    extra = "google" if provider == "google" else "bedrock"
    assert info.value.message == (
        f"provider {provider!r} needs the {extra} extra on the worker: pip install 'perq[{extra}]'"
    )
    assert not info.value.is_retryable


def test_unknown_provider() -> None:
    with pytest.raises(GenerationError, match="unknown provider") as info:
        prov.resolve_client_settings(ProviderConfig(provider_name="nope"), "m", env={})
    assert not info.value.is_retryable


async def test_models_are_cached_per_settings() -> None:
    prov.clear_model_cache()
    a = prov.resolve_client_settings(
        ProviderConfig(provider_name="openai"), "gpt-4o", env={"OPENAI_API_KEY": "k"}
    )
    b = prov.resolve_client_settings(
        ProviderConfig(provider_name="openai"), "gpt-4o-mini", env={"OPENAI_API_KEY": "k"}
    )
    assert prov.get_cached_model(a) is prov.get_cached_model(a)
    assert prov.get_cached_model(a) is not prov.get_cached_model(b)
    anthropic = prov.resolve_client_settings(
        ProviderConfig(provider_name="anthropic"), "claude-sonnet-4-5", env={"ANTHROPIC_API_KEY": "k"}
    )
    assert prov.get_cached_model(anthropic).system == "anthropic"


# --- error classification (spec §2.6) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "retryable"), [(401, False), (400, False), (429, True), (500, True), (503, True)]
)
def test_http_errors(status: int, retryable: bool) -> None:
    error = prov.to_generation_error(
        ModelHTTPError(status, "m", body={"error": "x"}, headers={"retry-after": "7"})
    )
    assert error.status_code == status and error.is_retryable is retryable
    assert error.retry_after == 7


def test_retry_delay_honours_retry_after_else_backs_off_exponentially() -> None:
    from worker.models.contract import RETRY_AFTER_MAX_SECONDS, retry_delay

    def error(retry_after: float | None) -> GenerationError:
        return GenerationError("busy", is_retryable=True, retry_after=retry_after)

    assert retry_delay(error(2.5), 0) == 2.5 and retry_delay(error(0), 4) == 0
    assert retry_delay(error(3600), 0) == RETRY_AFTER_MAX_SECONDS
    assert [retry_delay(error(None), n) for n in range(4)] == [1, 2, 4, 8]
    assert retry_delay(error(None), 20) == 30


def test_other_errors() -> None:
    assert prov.to_generation_error(ModelConnectionError("m", "connection refused")).is_retryable
    overloaded = prov.to_generation_error(UnexpectedModelBehavior("Model is overloaded"))
    assert overloaded.is_retryable
    weird = prov.to_generation_error(UnexpectedModelBehavior("Received empty model response"))
    assert not weird.is_retryable and weird.name == "UnexpectedModelBehavior"
    timeout = prov.to_generation_error(TimeoutError())
    assert timeout.is_retryable and timeout.name == "TimeoutError"
    assert prov.to_generation_error(ConnectionResetError("reset")).is_retryable


# --- the HTTP path, against a fake OpenAI-compatible server -------------------------------------------

TOOL_COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "tool-model",
    "choices": [
        {
            "index": 0,
            "finish_reason": "tool_calls",
            "message": {
                "role": "assistant",
                "content": "Let me look.",
                "tool_calls": [
                    {
                        "id": "call_abc",
                        "type": "function",
                        "function": {"name": "readTextFile", "arguments": '{"path": "notes.md"}'},
                    }
                ],
            },
        }
    ],
    "usage": {
        "prompt_tokens": 42,
        "completion_tokens": 9,
        "total_tokens": 51,
        "prompt_tokens_details": {"cached_tokens": 10},
        "completion_tokens_details": {"reasoning_tokens": 3},
    },
}


class _FakeOpenAI(BaseHTTPRequestHandler):
    """Answers by the requested model name: tool-model → a tool call, auth-model → 401, busy-model → 503,
    slow-model → a reply after 2 s."""

    requests: list[dict[str, Any]]

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(
            {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}
        )
        model = body.get("model")
        if model == "auth-model":
            self._send(
                401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}
            )
        elif model == "busy-model":
            self._send(503, {"error": {"message": "The server is busy", "type": "server_error"}})
        elif model == "slow-model":
            time.sleep(2)
            self._send(200, TOOL_COMPLETION)
        else:
            self._send(200, TOOL_COMPLETION)

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        # keeps SDK retries in the test fast: the SDK honours the server's requested delay
        self.send_header("retry-after-ms", "10")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def fake_openai(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    requests: list[dict[str, Any]] = []
    handler = type("Handler", (_FakeOpenAI,), {"requests": requests})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    prov.clear_model_cache()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", requests
    finally:
        server.shutdown()
        server.server_close()
        prov.clear_model_cache()


def _request(**kwargs: Any) -> GenerationRequest:
    tool = ToolDefinition(
        skill_name="@perstack/base",
        name="readTextFile",
        description="Read a text file",
        input_schema={"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
    )
    defaults: dict[str, Any] = {
        "expert_key": "e",
        "messages": _history(),
        "tools": [tool],
        "max_retries": 0,
        "timeout_ms": 10_000,
    }
    return GenerationRequest(**{**defaults, **kwargs})


async def test_http_tool_call(fake_openai: tuple[str, list[dict[str, Any]]]) -> None:
    base_url, requests = fake_openai
    config = ProviderConfig(provider_name="openai", base_url=base_url, headers={"X-Perq": "yes"})
    result = await prov.PydanticAIModel(config, "tool-model").generate(_request())
    assert result.text == "Let me look."
    assert [(c.id, c.tool_name, c.args) for c in result.tool_calls] == [
        ("call_abc", "readTextFile", {"path": "notes.md"})
    ]
    assert result.finish_reason == "tool-calls"
    assert (result.usage.input_tokens, result.usage.output_tokens, result.usage.total_tokens) == (42, 9, 51)
    assert result.usage.cached_input_tokens == 10
    assert result.usage.reasoning_tokens == 3

    (sent,) = requests
    assert sent["path"] == "/v1/chat/completions"
    assert sent["headers"]["authorization"] == "Bearer sk-test"
    assert sent["headers"]["x-perq"] == "yes"
    body = sent["body"]
    assert [t["function"]["name"] for t in body["tools"]] == ["readTextFile"]
    assert "reasoning_effort" not in body  # not a reasoning model
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "user"]
    assistant = body["messages"][2]
    assert assistant["tool_calls"][0]["id"] == "call_1"
    assert body["messages"][3] == {"role": "tool", "tool_call_id": "call_1", "content": "line 1\nline 2"}


async def test_http_reasoning_effort_and_no_tools(fake_openai: tuple[str, list[dict[str, Any]]]) -> None:
    base_url, requests = fake_openai
    config = ProviderConfig(provider_name="azure-openai", base_url=base_url)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AZURE_API_KEY", "k")
        await prov.PydanticAIModel(config, "gpt-5-mini").generate(_request(tools=[], reasoning_budget=8000))
    body = requests[0]["body"]
    assert requests[0]["path"] == "/v1/v1/chat/completions?api-version=v1"  # Azure's v1 API under baseUrl
    assert requests[0]["headers"]["api-key"] == "k"
    assert body["reasoning_effort"] == "high"
    assert "tools" not in body


def test_openai_reasoning_items_go_back_to_openai_only() -> None:
    response = _response(
        pai.ThinkingPart("summary 1", id="rs_9", signature="ENC", provider_name="openai"),
        pai.ThinkingPart("summary 2", id="rs_9", provider_name="openai"),
        pai.ToolCallPart("readTextFile", {"path": "a"}, "call_9"),
    )
    result = prov.to_generation_result(response)
    message = ExpertMessage(
        contents=[
            *result.thinking,
            *(ToolCallPart(tool_call_id=c.id, tool_name=c.tool_name, args=c.args) for c in result.tool_calls),
        ]
    )
    message = ExpertMessage.model_validate_json(message.model_dump_json(by_alias=True))
    (openai,) = prov.to_model_messages([message], provider_name="openai", system="openai")
    assert isinstance(openai, pai.ModelResponse)
    first, second, _call = openai.parts
    assert isinstance(first, pai.ThinkingPart) and isinstance(second, pai.ThinkingPart)
    assert (first.id, first.signature, first.content, first.provider_name) == (
        "rs_9",
        "ENC",
        "summary 1",
        "openai",
    )
    assert (second.id, second.signature) == ("rs_9", None)
    (anthropic,) = prov.to_model_messages([message], provider_name="anthropic")
    assert isinstance(anthropic, pai.ModelResponse)
    assert [(p.part_kind, getattr(p, "signature", None)) for p in anthropic.parts] == [
        ("thinking", None),
        ("thinking", None),
        ("tool-call", None),
    ]


async def test_http_401_is_not_retryable(fake_openai: tuple[str, list[dict[str, Any]]]) -> None:
    base_url, requests = fake_openai
    client = prov.PydanticAIModel(ProviderConfig(provider_name="openai", base_url=base_url), "auth-model")
    with pytest.raises(GenerationError) as info:
        await client.generate(_request(max_retries=2))
    assert info.value.status_code == 401 and not info.value.is_retryable
    assert len(requests) == 1  # the SDK does not retry a 401 either


async def test_http_503_is_one_attempt_whatever_max_retries_says(
    fake_openai: tuple[str, list[dict[str, Any]]],
) -> None:
    base_url, requests = fake_openai
    client = prov.PydanticAIModel(ProviderConfig(provider_name="openai", base_url=base_url), "busy-model")
    with pytest.raises(GenerationError) as info:
        await client.generate(_request(max_retries=3))
    assert info.value.status_code == 503 and info.value.is_retryable
    assert info.value.retry_after == 0.01  # the server's retry-after-ms, for the loop's backoff
    assert len(requests) == 1  # the loop retries, not the SDK: one generation is one request


async def test_http_timeout(fake_openai: tuple[str, list[dict[str, Any]]]) -> None:
    base_url, _ = fake_openai
    client = prov.PydanticAIModel(ProviderConfig(provider_name="openai", base_url=base_url), "slow-model")
    with pytest.raises(GenerationError) as info:
        await client.generate(_request(timeout_ms=300))
    assert info.value.name == "TimeoutError" and info.value.is_retryable
    assert "timeout" in info.value.message.lower()


async def test_connection_refused_is_retryable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    # a port nothing listens on: bind one, note it, close it
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ProviderConfig(provider_name="openai", base_url=f"http://127.0.0.1:{port}/v1")
    with pytest.raises(GenerationError) as info:
        await prov.PydanticAIModel(config, "tool-model").generate(_request())
    assert info.value.is_retryable and info.value.status_code is None


# --- the HTTP path for Anthropic, against a fake streaming Messages API ---------------------------------
# pydantic-ai streams Anthropic requests whose (default) max_tokens is above the SDK's non-streaming limit,
# so the fake answers with server-sent events.


def _anthropic_events() -> bytes:
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 1, "cache_read_input_tokens": 3},
        },
    }
    blocks: list[tuple[dict[str, Any], list[dict[str, Any]]]] = [
        (
            {"type": "thinking", "thinking": "", "signature": ""},
            [{"type": "thinking_delta", "thinking": "hmm"}, {"type": "signature_delta", "signature": "SIG"}],
        ),
        ({"type": "redacted_thinking", "data": "RED"}, []),
        ({"type": "text", "text": ""}, [{"type": "text_delta", "text": "ok"}]),
        (
            {"type": "tool_use", "id": "toolu_1", "name": "readTextFile", "input": {}},
            [{"type": "input_json_delta", "partial_json": '{"path": "x"}'}],
        ),
    ]
    events: list[dict[str, Any]] = [start]
    for index, (block, deltas) in enumerate(blocks):
        events.append({"type": "content_block_start", "index": index, "content_block": block})
        events.extend({"type": "content_block_delta", "index": index, "delta": d} for d in deltas)
        events.append({"type": "content_block_stop", "index": index})
    events.append(
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": 5},
        }
    )
    events.append({"type": "message_stop"})
    return "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events).encode()


class _FakeAnthropic(BaseHTTPRequestHandler):
    requests: list[dict[str, Any]]

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        data = _anthropic_events()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


async def test_http_anthropic_thinking_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    requests: list[dict[str, Any]] = []
    handler = type("Handler", (_FakeAnthropic,), {"requests": requests})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    prov.clear_model_cache()
    try:
        config = ProviderConfig(
            provider_name="anthropic", base_url=f"http://127.0.0.1:{server.server_address[1]}"
        )
        client = prov.PydanticAIModel(config, "claude-sonnet-4-6")
        result = await client.generate(_request(reasoning_budget="medium"))
        assert result.text == "ok"
        assert [(t.thinking, t.signature) for t in result.thinking] == [("hmm", "SIG"), ("", "RED")]
        assert [(c.id, c.args) for c in result.tool_calls] == [("toolu_1", {"path": "x"})]
        assert result.finish_reason == "tool-calls"
        assert result.usage.cached_input_tokens == 3 and result.usage.output_tokens == 5

        first = requests[0]
        assert first["thinking"] == {"type": "enabled", "budget_tokens": 5000}
        assert first["system"][0]["text"] == "You are a helper.\nBe brief."
        assert "cache_control" in first["system"][-1]  # the instruction message's cache hint
        assert [b["type"] for b in first["messages"][1]["content"]] == ["thinking", "text", "tool_use"]
        assert first["messages"][1]["content"][0]["signature"] == "sig-1"

        # the answer, stored as perq parts and sent back, replays signed and redacted thinking as such
        answer = ExpertMessage(
            contents=[
                *result.thinking,
                TextPart(text=result.text),
                *(
                    ToolCallPart(tool_call_id=c.id, tool_name=c.tool_name, args=c.args)
                    for c in result.tool_calls
                ),
            ]
        )
        reply = ToolMessage(
            contents=[
                ToolResultPart(
                    tool_call_id="toolu_1",
                    tool_name="readTextFile",
                    contents=[TextPart(text="no")],
                    is_error=True,
                )
            ]
        )
        await client.generate(_request(messages=[*_history(), answer, reply], reasoning_budget="none"))
        second = requests[1]
        assert "thinking" not in second
        replayed = second["messages"][3]["content"]
        assert replayed[0] == {"type": "thinking", "thinking": "hmm", "signature": "SIG"}
        assert replayed[1] == {"type": "redacted_thinking", "data": "RED"}
        assert second["messages"][4]["content"][0]["is_error"] is True
    finally:
        server.shutdown()
        server.server_close()
        prov.clear_model_cache()


def test_gemini_thought_signatures_go_back_on_their_parts_and_only_to_gemini() -> None:
    signed = {"thought_signature": "U0lH"}
    response = _response(
        pai.ThinkingPart("plan", provider_details={"thought_signature": "VEhU"}, provider_name="google"),
        pai.TextPart("Reading.", provider_details={"thought_signature": "VFhU"}, provider_name="google"),
        pai.ToolCallPart(
            "readTextFile", {"path": "a"}, "c1", provider_details=signed, provider_name="google"
        ),
        pai.ToolCallPart("readTextFile", {"path": "b"}, "c2"),
    )
    result = prov.to_generation_result(response)
    assert [c.id for c in result.tool_calls] == ["c1", "c2"]
    message = ExpertMessage(
        contents=[
            *result.thinking,
            TextPart(text=result.text or ""),
            *(ToolCallPart(tool_call_id=c.id, tool_name=c.tool_name, args=c.args) for c in result.tool_calls),
        ]
    )
    # through JSON, as a checkpoint read by another worker
    message = ExpertMessage.model_validate_json(message.model_dump_json(by_alias=True))

    (google,) = prov.to_model_messages([message], provider_name="google", system="google")
    assert isinstance(google, pai.ModelResponse)
    thought, text, first, second = google.parts
    assert isinstance(thought, pai.ThinkingPart) and thought.content == "plan"
    assert thought.provider_details == {"thought_signature": "VEhU"}
    assert isinstance(text, pai.TextPart) and text.provider_details == {"thought_signature": "VFhU"}
    assert isinstance(first, pai.ToolCallPart) and first.provider_details == signed
    assert isinstance(second, pai.ToolCallPart) and second.provider_details is None

    (anthropic,) = prov.to_model_messages([message], provider_name="anthropic")
    assert isinstance(anthropic, pai.ModelResponse)
    # the thought text stays, unsigned; the bare carriers and every Gemini signature are gone
    assert [p.part_kind for p in anthropic.parts] == ["thinking", "text", "tool-call", "tool-call"]
    assert all(not p.provider_details for p in anthropic.parts)
    thinking = anthropic.parts[0]
    assert isinstance(thinking, pai.ThinkingPart) and thinking.signature is None
