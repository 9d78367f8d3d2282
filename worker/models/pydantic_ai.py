"""Model calls through pydantic-ai's direct request API: one request in, one classified answer out.

perq keeps Perstack-shaped messages; this module converts them to pydantic-ai messages at the boundary, sends
exactly one request (no agent loop, no tool execution, no SDK retries: the loop owns retrying) and converts
the response back. It is imported only by `worker.models.select.get_model_client`, so the CLI never pays for
pydantic-ai or the provider SDKs, and each SDK (openai, anthropic, google-genai, boto3) is imported only when
a provider that needs it is first used. google-genai and boto3 come with the `google` and `bedrock` extras.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import importlib
import json
import os
import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast
from urllib.parse import urlsplit, urlunsplit

from pydantic_ai import messages as pai
from pydantic_ai.direct import model_request
from pydantic_ai.exceptions import (
    ModelAPIError,
    ModelConnectionError,
    ModelHTTPError,
    ModelRateLimitError,
    ModelRequestTimeout,
    ModelServerError,
    ModelTimeoutError,
    ModelUnavailableError,
)
from pydantic_ai.models import Model, ModelRequestParameters
from pydantic_ai.settings import ModelSettings
from pydantic_ai.tools import ToolDefinition as PaiToolDefinition

from shared.config import PROVIDERS
from shared.models import (
    ExpertMessage,
    InlinePart,
    InstructionMessage,
    Message,
    ProviderConfig,
    ReasoningBudget,
    TextPart,
    ThinkingPart,
    ToolCallPart,
    ToolDefinition,
    ToolMessage,
    UrlPart,
    Usage,
    UserMessage,
    new_id,
)
from worker.models.contract import (
    FinishReason,
    GeneratedToolCall,
    GenerationError,
    GenerationRequest,
    GenerationResult,
    is_retryable,
)

# --- provider settings --------------------------------------------------------------------------------

SUPPORTED_PROVIDERS = tuple(p for p in PROVIDERS if p != "script")  # the script provider is perq's own

# Providers whose SDK is not installed with perq itself: the extra that brings it, and a module it provides
PROVIDER_EXTRAS: dict[str, tuple[str, str]] = {
    "google": ("google", "google.genai"),
    "google-vertex": ("google", "google.genai"),
    "amazon-bedrock": ("bedrock", "boto3"),
}

OLLAMA_DEFAULT_BASE_URL = "http://localhost:11434/v1"
DEEPSEEK_DEFAULT_BASE_URL = "https://api.deepseek.com"
# Azure's v1 API takes "v1" as its version; deployment URLs need a dated one, which the user names
AZURE_DEFAULT_API_VERSION = "v1"


@dataclass(frozen=True)
class ClientSettings:
    """Everything a built client depends on; hashable, so it is also the client cache key.

    Secrets are kept out of repr so that a logged or raised settings object never shows them.
    """

    provider_name: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    base_url: str | None = None
    organization: str | None = None
    project: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    # google, google-vertex: the API version cut from a base URL that names one (…/v1beta)
    api_version: str | None = None
    # azure-openai: …/deployments/{model}/… URLs instead of the v1 API's
    deployment_urls: bool = False
    # google-vertex location, or amazon-bedrock region
    location: str | None = None
    # amazon-bedrock: the secret half of the key pair, and a session token for temporary credentials
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    # amazon-bedrock: boto3 takes its timeout per client, not per request, so it is part of the client's key
    read_timeout: float | None = None


def _env(env: Mapping[str, str], name: str) -> str | None:
    # an empty variable (e.g. `FOO=` in a dotenv file) means "not set", as in Perstack
    return env.get(name) or None


def _required(env: Mapping[str, str], name: str) -> str:
    value = _env(env, name)
    if value is None:
        raise GenerationError(f"{name} is not set", is_retryable=False)
    return value


def _ollama_base_url(url: str) -> str:
    """Ollama's OpenAI-compatible API lives under /v1; a bare host URL (as for Ollama's own API) gets it."""
    parts = urlsplit(url)
    if parts.path in ("", "/"):
        return urlunsplit(parts._replace(path="/v1"))
    return url


_GOOGLE_API_VERSION = re.compile(r"^v\d+((alpha|beta)\d*)?$")


def split_google_base_url(url: str) -> tuple[str, str | None]:
    """A Google base URL as Perstack's users write it (`https://host/v1beta`, or for Vertex the whole
    `https://host/v1/projects/P/locations/L/publishers/google`) → the host part the google-genai SDK takes,
    and the API version it names. The SDK adds the version and, for Vertex, the project path itself."""
    parts = urlsplit(url)
    segments = [s for s in parts.path.split("/") if s]
    for i, segment in enumerate(segments):
        if _GOOGLE_API_VERSION.match(segment):
            prefix = "/" + "/".join(segments[:i]) if i else ""
            return urlunsplit(parts._replace(path=prefix + "/", query="", fragment="")), segment
    return url, None


def resolve_client_settings(
    provider: ProviderConfig, model: str, env: Mapping[str, str] | None = None
) -> ClientSettings:
    """Settings for a provider from its config and the worker's environment; config values win over env.

    Raises GenerationError (never retryable) for a missing key or setting, so that the run stops with a
    readable error instead of looping on retries.
    """
    env = os.environ if env is None else env
    name = provider.provider_name
    headers = tuple(sorted((provider.headers or {}).items()))
    if name == "anthropic":
        key = _required(env, "ANTHROPIC_API_KEY")
        base_url = provider.base_url or _env(env, "ANTHROPIC_BASE_URL")
        return ClientSettings(name, model, key, base_url, headers=headers)
    if name == "openai":
        return ClientSettings(
            name,
            model,
            _required(env, "OPENAI_API_KEY"),
            provider.base_url or _env(env, "OPENAI_BASE_URL"),
            organization=provider.organization or _env(env, "OPENAI_ORGANIZATION"),
            project=provider.project or _env(env, "OPENAI_PROJECT"),
            headers=headers,
        )
    if name == "ollama":
        base_url = provider.base_url or _env(env, "OLLAMA_BASE_URL") or OLLAMA_DEFAULT_BASE_URL
        # a local Ollama needs no key, but the OpenAI SDK refuses an empty one; Ollama Cloud takes a real one
        key = _env(env, "OLLAMA_API_KEY") or "ollama"
        return ClientSettings(name, model, key, _ollama_base_url(base_url), headers=headers)
    if name == "deepseek":
        key = _required(env, "DEEPSEEK_API_KEY")
        base_url = provider.base_url or _env(env, "DEEPSEEK_BASE_URL") or DEEPSEEK_DEFAULT_BASE_URL
        return ClientSettings(name, model, key, base_url, headers=headers)
    if name == "google":
        key = _required(env, "GOOGLE_GENERATIVE_AI_API_KEY")
        base_url, version = None, None
        if raw := provider.base_url or _env(env, "GOOGLE_GENERATIVE_AI_BASE_URL"):
            base_url, version = split_google_base_url(raw)
        return ClientSettings(name, model, key, base_url, headers=headers, api_version=version)
    if name == "google-vertex":
        # no key: Google's application default credentials (GOOGLE_APPLICATION_CREDENTIALS, gcloud, metadata)
        project = provider.project or _required(env, "GOOGLE_VERTEX_PROJECT")
        location = provider.location or _required(env, "GOOGLE_VERTEX_LOCATION")
        base_url, version = None, None
        if raw := provider.base_url or _env(env, "GOOGLE_VERTEX_BASE_URL"):
            base_url, version = split_google_base_url(raw)
        return ClientSettings(
            name,
            model,
            None,
            base_url,
            project=project,
            location=location,
            headers=headers,
            api_version=version,
        )
    if name == "azure-openai":
        key = _required(env, "AZURE_API_KEY")
        base_url = provider.base_url or _env(env, "AZURE_BASE_URL")
        if base_url is None:
            resource = provider.resource_name or _env(env, "AZURE_RESOURCE_NAME")
            if resource is None:
                raise GenerationError(
                    "AZURE_RESOURCE_NAME is not set (nor a baseUrl or AZURE_BASE_URL)", is_retryable=False
                )
            base_url = f"https://{resource}.openai.azure.com/openai"
        return ClientSettings(
            name,
            model,
            key,
            base_url.rstrip("/"),
            headers=headers,
            api_version=provider.api_version or _env(env, "AZURE_API_VERSION") or AZURE_DEFAULT_API_VERSION,
            deployment_urls=bool(provider.use_deployment_based_urls),
        )
    if name == "amazon-bedrock":
        region = provider.region or _env(env, "AWS_REGION") or _env(env, "AWS_DEFAULT_REGION")
        if region is None:
            raise GenerationError("AWS_REGION is not set", is_retryable=False)
        return ClientSettings(
            name,
            model,
            # the key pair when the environment names one; else boto3's own chain (profile, role)
            _env(env, "AWS_ACCESS_KEY_ID"),
            location=region,
            secret_key=_env(env, "AWS_SECRET_ACCESS_KEY"),
            session_token=_env(env, "AWS_SESSION_TOKEN"),
        )
    raise GenerationError(
        f"unknown provider {name!r} (supported: {', '.join(SUPPORTED_PROVIDERS)})",
        name="UnsupportedProviderError",
        is_retryable=False,
    )


def require_extra(provider_name: str) -> None:
    """Stop a run at once, with the line to type, when its provider's SDK is not installed on this worker."""
    needed = PROVIDER_EXTRAS.get(provider_name)
    if needed is None:
        return
    extra, module = needed
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise GenerationError(
            f"provider {provider_name!r} needs the {extra} extra on the worker: pip install 'perq[{extra}]'",
            name="MissingExtraError",
            is_retryable=False,
        ) from e


# --- building and caching clients ---------------------------------------------------------------------


def build_model(settings: ClientSettings) -> Model:
    """A pydantic-ai model over an SDK client we build ourselves.

    We build the SDK client rather than letting pydantic-ai's providers do it because only the SDK
    constructors take organization, project and default headers, and because retries are turned off here:
    every provider makes exactly one attempt per generation, and the loop owns retrying. The HTTP client is
    pydantic-ai's (same pool limits and connect-timeout cap as its own providers).
    """
    name = settings.provider_name
    if name in ("google", "google-vertex"):
        return _google_model(settings)
    if name == "amazon-bedrock":
        return _bedrock_model(settings)

    headers = dict(settings.headers) or None
    if name == "anthropic":
        from anthropic import AsyncAnthropic
        from pydantic_ai.models.anthropic import AnthropicModel
        from pydantic_ai.providers.anthropic import AnthropicProvider

        anthropic_client = AsyncAnthropic(
            api_key=settings.api_key,
            base_url=settings.base_url,
            default_headers=headers,
            **_sdk_options(),
        )
        return AnthropicModel(settings.model, provider=AnthropicProvider(anthropic_client=anthropic_client))

    from openai import AsyncAzureOpenAI, AsyncOpenAI
    from pydantic_ai.models.openai import OpenAIChatModel

    if name == "azure-openai":
        from pydantic_ai.providers.azure import AzureProvider

        if settings.deployment_urls:
            # the SDK turns /chat/completions into /deployments/{model}/chat/completions?api-version=...
            # and sends the key as `api-key`
            azure_client = AsyncAzureOpenAI(
                base_url=settings.base_url or "",
                api_key=settings.api_key,
                api_version=settings.api_version,
                default_headers=headers,
                **_sdk_options(),
            )
            return OpenAIChatModel(settings.model, provider=AzureProvider(openai_client=azure_client))
        # Azure's v1 API: {base}/v1/chat/completions?api-version=v1, the same `api-key` header, no deployment
        # in the path; the Azure client would add one, so a plain client speaks it
        v1_client = AsyncOpenAI(
            base_url=f"{settings.base_url}/v1",
            api_key=settings.api_key,
            default_headers={**(headers or {}), "api-key": settings.api_key or ""},
            default_query={"api-version": settings.api_version},
            **_sdk_options(),
        )
        from pydantic_ai.providers.openai import OpenAIProvider

        return OpenAIChatModel(settings.model, provider=OpenAIProvider(openai_client=v1_client))

    openai_client = AsyncOpenAI(
        api_key=settings.api_key,
        base_url=settings.base_url,
        organization=settings.organization,
        project=settings.project,
        default_headers=headers,
        **_sdk_options(),
    )
    if name == "ollama":
        from pydantic_ai.models.ollama import OllamaModel
        from pydantic_ai.providers.ollama import OllamaProvider

        return OllamaModel(settings.model, provider=OllamaProvider(openai_client=openai_client))
    if name == "deepseek":
        # DeepSeekProvider carries DeepSeek's model profiles (reasoning_content sent back, thinking defaults)
        from pydantic_ai.providers.deepseek import DeepSeekProvider

        return OpenAIChatModel(settings.model, provider=DeepSeekProvider(openai_client=openai_client))
    from pydantic_ai.providers.openai import OpenAIProvider

    if is_openai_reasoning_model(settings.model):
        # OpenAI's reasoning models keep their reasoning between turns only through the Responses API,
        # which returns it as encrypted items to send back (Chat Completions drops it)
        from pydantic_ai.models.openai import OpenAIResponsesModel

        return OpenAIResponsesModel(settings.model, provider=OpenAIProvider(openai_client=openai_client))
    # Chat Completions for the rest: it is what every OpenAI-compatible base_url speaks
    return OpenAIChatModel(settings.model, provider=OpenAIProvider(openai_client=openai_client))


def _google_model(settings: ClientSettings) -> Model:
    """Gemini through the google-genai SDK: the Gemini API with a key, or Vertex AI with Google's
    credentials."""
    from google.genai import Client
    from google.genai.types import HttpOptions, HttpRetryOptions
    from pydantic_ai.models.google import GoogleModel
    from pydantic_ai.providers.google import GoogleProvider

    options = HttpOptions(
        base_url=settings.base_url,
        api_version=settings.api_version,
        headers=dict(settings.headers) or None,
        retry_options=HttpRetryOptions(attempts=1),
    )
    if settings.provider_name == "google-vertex":
        client = Client(
            vertexai=True, project=settings.project, location=settings.location, http_options=options
        )
    else:
        client = Client(api_key=settings.api_key, http_options=options)
    return GoogleModel(settings.model, provider=GoogleProvider(client=client))


def _sdk_options() -> dict[str, Any]:
    """What every SDK client is built with: no SDK retries (a generation is one request; the loop owns
    retrying, so a run's retry budget counts requests) and pydantic-ai's HTTP client."""
    from pydantic_ai.models import create_async_httpx2_client

    return {"max_retries": 0, "http_client": create_async_httpx2_client()}


def _bedrock_model(settings: ClientSettings) -> Model:
    """Bedrock's Converse API through boto3. The endpoint is boto3's own choice for the region, or
    AWS_ENDPOINT_URL_BEDROCK_RUNTIME / AWS_ENDPOINT_URL, which boto3 reads itself."""
    import boto3
    from botocore.config import Config
    from pydantic_ai.models.bedrock import BedrockConverseModel
    from pydantic_ai.providers.bedrock import BedrockProvider

    session = boto3.session.Session(
        aws_access_key_id=settings.api_key,
        aws_secret_access_key=settings.secret_key,
        aws_session_token=settings.session_token,
        region_name=settings.location,
    )
    # one attempt per generation (the loop retries), limited to the generation's timeout (boto3's own default
    # of 60 s would cut long generations short)
    timeout = settings.read_timeout or 300.0
    config = Config(
        retries={"total_max_attempts": 1, "mode": "standard"},
        read_timeout=timeout,
        connect_timeout=min(timeout, 60.0),
    )
    client = session.client("bedrock-runtime", config=config)
    return BedrockConverseModel(settings.model, provider=BedrockProvider(bedrock_client=client))


# One cache per event loop: an HTTP connection pool is bound to the loop that opened it, and a process may run
# more than one loop over its life (tests, a CLI calling asyncio.run twice). A worker has one loop, so in
# practice this is one client per (provider config, model) for the worker's lifetime.
_MODEL_CACHE: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[ClientSettings, Model]] = (
    weakref.WeakKeyDictionary()
)


def get_cached_model(settings: ClientSettings) -> Model:
    per_loop = _MODEL_CACHE.setdefault(asyncio.get_running_loop(), {})
    model = per_loop.get(settings)
    if model is None:
        model = per_loop[settings] = build_model(settings)
    return model


def clear_model_cache() -> None:
    _MODEL_CACHE.clear()


# --- reasoning budget -------------------------------------------------------------------------------------

ANTHROPIC_BUDGET_TOKENS: dict[str, int] = {"minimal": 1024, "low": 2048, "medium": 5000, "high": 10000}
ANTHROPIC_MIN_BUDGET_TOKENS = 1024  # the API rejects a smaller budget_tokens

OpenAIEffort = Literal["low", "medium", "high"]
ThinkingEffort = Literal["minimal", "low", "medium", "high"]

_OPENAI_REASONING_MODEL = re.compile(r"^(o\d|gpt-5)")


def _reasoning_disabled(budget: ReasoningBudget) -> bool:
    return budget == "none" or (isinstance(budget, int) and budget <= 0)


def anthropic_budget_tokens(budget: ReasoningBudget) -> int | None:
    """Anthropic thinking.budget_tokens for a reasoning budget, or None when thinking is off."""
    if _reasoning_disabled(budget):
        return None
    if isinstance(budget, int):
        return max(budget, ANTHROPIC_MIN_BUDGET_TOKENS)
    return ANTHROPIC_BUDGET_TOKENS[budget]


def thinking_effort(budget: ReasoningBudget) -> ThinkingEffort | None:
    """The effort level a token budget corresponds to, on the same scale as the Anthropic budgets."""
    if _reasoning_disabled(budget):
        return None
    if isinstance(budget, int):
        if budget <= 1024:
            return "minimal"
        if budget <= 2048:
            return "low"
        return "medium" if budget <= 5000 else "high"
    return cast(ThinkingEffort, budget)


def openai_reasoning_effort(budget: ReasoningBudget) -> OpenAIEffort | None:
    """OpenAI reasoning_effort for a budget: its thinking effort, minimal raised to low (OpenAI's least)."""
    effort = thinking_effort(budget)
    return "low" if effort == "minimal" else cast(OpenAIEffort | None, effort)


def is_openai_reasoning_model(model: str) -> bool:
    """o-series and gpt-5*: the OpenAI models that accept reasoning_effort (others reject it with a 400)."""
    return bool(_OPENAI_REASONING_MODEL.match(model.lower().removeprefix("openai/")))


def reasoning_settings(
    provider_name: str, model: str, budget: ReasoningBudget, *, budget_thinking_allowed: bool = True
) -> dict[str, Any]:
    """Model settings for a reasoning budget; empty where the provider takes no reasoning options.

    `budget_thinking_allowed` is False for the Claude models that reject budget_tokens and only take adaptive
    thinking; for those (and for turning thinking off, which some Claude models do differently) the unified
    `thinking` setting is used, and pydantic-ai picks the form the model accepts.
    """
    if provider_name == "anthropic":
        if _reasoning_disabled(budget):
            return {"thinking": False}
        if not budget_thinking_allowed:
            return {"thinking": thinking_effort(budget)}
        return {"anthropic_thinking": {"type": "enabled", "budget_tokens": anthropic_budget_tokens(budget)}}
    if provider_name in ("google", "google-vertex"):
        # Vertex serves the same Gemini models, so it takes the same thinking config
        if _reasoning_disabled(budget):
            return {"thinking": False}  # pydantic-ai knows which Gemini models cannot turn thinking off
        tokens = anthropic_budget_tokens(budget)  # the same token scale as Anthropic's budgets
        return {"google_thinking_config": {"thinking_budget": tokens, "include_thoughts": True}}
    # Azure serves OpenAI's models under deployment names, so the name decides the same way
    if provider_name in ("openai", "azure-openai") and is_openai_reasoning_model(model):
        effort = openai_reasoning_effort(budget)
        return {} if effort is None else {"openai_reasoning_effort": effort}
    return {}


# --- perq messages → pydantic-ai messages -------------------------------------------------------------

# Anthropic redacted thinking has no text, only encrypted data. perq's thinkingPart has no field to say so, so
# the part's id carries the mark: a converted response gives it this prefix, and a replay restores the
# redacted block from it. Any other thinking part with a signature is replayed as ordinary signed thinking.
REDACTED_THINKING_ID_PREFIX = "redacted-"

# Gemini signs parts of its answer (a thought, the text, the first function call) and requires each signature
# back on the same part. perq's text and tool-call parts have no field for it, so a signature travels in a
# thinking part whose id says where it belongs: GEMINI_SIGNATURE_ID_PREFIX + "thought-…" (the thinking part
# itself), + "text-…" (the answer's text), or + "call:" + the tool call id. Other providers never see these.
GEMINI_SIGNATURE_ID_PREFIX = "gemini-signature-"
# OpenAI's reasoning items (Responses API) go back with their item id and encrypted content: the id travels
# in the thinking part's id, OPENAI_REASONING_ID_PREFIX + item id + "/" + a part id of its own (an item with
# several summaries becomes several parts with the same item id).
OPENAI_REASONING_ID_PREFIX = "openai-reasoning/"
_GEMINI_PROVIDERS = ("google", "google-vertex")


def _decode_base64(data: str) -> bytes | None:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


def _media_content(data: str, mime_type: str, *, image: bool) -> pai.UserContent:
    """Inline media as BinaryContent. A binary part's `data` is a string that is usually base64, but may be a
    data: URI or a URL (the AI SDK accepts all three), so those are handled too."""
    if data.startswith("data:"):
        return pai.BinaryContent.from_data_uri(data)
    if data.startswith(("http://", "https://")):
        return (
            pai.ImageUrl(data, media_type=mime_type) if image else pai.DocumentUrl(data, media_type=mime_type)
        )
    raw = _decode_base64(data)
    if raw is None:
        # not base64 after all: the text itself is the content (e.g. a text/plain file part)
        raw = data.encode()
    return pai.BinaryContent(raw, media_type=mime_type)


def _url_content(url: str, mime_type: str, *, image: bool) -> pai.UserContent:
    if image or mime_type.startswith("image/"):
        return pai.ImageUrl(url, media_type=mime_type)
    if mime_type.startswith("audio/"):
        return pai.AudioUrl(url, media_type=mime_type)
    if mime_type.startswith("video/"):
        return pai.VideoUrl(url, media_type=mime_type)
    return pai.DocumentUrl(url, media_type=mime_type)


def _user_prompt(message: UserMessage, *, cache_point: bool) -> pai.UserPromptPart:
    items: list[pai.UserContent] = []
    for part in message.contents:
        if isinstance(part, TextPart):
            items.append(part.text)
        elif isinstance(part, UrlPart):
            items.append(_url_content(part.url, part.mime_type, image=part.is_image))
        elif isinstance(part, InlinePart):
            items.append(_media_content(part.encoded_data, part.mime_type, image=part.is_image))
        else:
            items.append(_media_content(part.data, part.mime_type, image=part.is_image))
    if cache_point:
        items.append(pai.CachePoint())
    if len(items) == 1 and isinstance(items[0], str):
        return pai.UserPromptPart(items[0])
    return pai.UserPromptPart(items)


def _tool_returns(message: ToolMessage, *, native_error_channel: bool) -> list[pai.ToolReturnPart]:
    parts: list[pai.ToolReturnPart] = []
    for result in message.contents:
        texts = [c.text for c in result.contents if isinstance(c, TextPart)]
        files = [
            _media_content(c.encoded_data, c.mime_type, image=c.is_image)
            for c in result.contents
            if isinstance(c, InlinePart)
        ]
        text = "\n".join(texts)
        content: Any = [text, *files] if files else text
        # Only where the API has an error flag (Anthropic's is_error) is a failed result marked as such;
        # elsewhere pydantic-ai would wrap the text in {"error": ...}, changing what the model reads.
        failed = bool(result.is_error) and native_error_channel
        parts.append(
            pai.ToolReturnPart(
                tool_name=result.tool_name,
                content=content,
                tool_call_id=result.tool_call_id,
                outcome="failed" if failed else "success",
            )
        )
    return parts


def _gemini_details(signature: str | None) -> dict[str, Any] | None:
    return {"thought_signature": signature} if signature else None


def _response_parts(message: ExpertMessage, system: str, provider_name: str) -> list[pai.ModelResponsePart]:
    gemini = provider_name in _GEMINI_PROVIDERS
    # where each Gemini signature belongs, by the id of its carrier (see GEMINI_SIGNATURE_ID_PREFIX)
    signatures = {
        part.id.removeprefix(GEMINI_SIGNATURE_ID_PREFIX): part.signature
        for part in message.contents
        if isinstance(part, ThinkingPart) and part.id.startswith(GEMINI_SIGNATURE_ID_PREFIX) and gemini
    }
    text_signature = next((sig for where, sig in signatures.items() if where.startswith("text-")), None)
    thinking: list[pai.ModelResponsePart] = []
    texts: list[pai.ModelResponsePart] = []
    calls: list[pai.ModelResponsePart] = []
    for part in message.contents:
        if isinstance(part, ThinkingPart):
            if part.id.startswith(GEMINI_SIGNATURE_ID_PREFIX):
                # a signed thought goes back (signed to Gemini only); a bare carrier never goes back
                if part.thinking:
                    thinking.append(
                        pai.ThinkingPart(
                            part.thinking,
                            provider_details=_gemini_details(part.signature) if gemini else None,
                            provider_name=system if gemini else None,
                        )
                    )
            elif part.id.startswith(OPENAI_REASONING_ID_PREFIX):
                item_id = part.id.removeprefix(OPENAI_REASONING_ID_PREFIX).rsplit("/", 1)[0]
                openai = provider_name == "openai"
                if openai or part.thinking:  # elsewhere a summary is plain thinking, a bare item nothing
                    thinking.append(
                        pai.ThinkingPart(
                            part.thinking,
                            id=item_id if openai else None,
                            signature=part.signature if openai else None,
                            provider_name=system if openai else None,
                        )
                    )
            elif part.id.startswith(REDACTED_THINKING_ID_PREFIX) and part.signature:
                thinking.append(
                    pai.ThinkingPart(
                        "", id="redacted_thinking", signature=part.signature, provider_name=system
                    )
                )
            else:
                # a signature is only sent back to the provider that signed it; pydantic-ai decides that by
                # provider_name, which perq does not store, so the history is attributed to this provider
                thinking.append(
                    pai.ThinkingPart(
                        part.thinking,
                        signature=part.signature,
                        provider_name=system if part.signature else None,
                    )
                )
        elif isinstance(part, TextPart):
            details = _gemini_details(text_signature) if not texts else None
            texts.append(pai.TextPart(part.text, provider_details=details))
        elif isinstance(part, ToolCallPart):
            args = part.args
            if args is not None and not isinstance(args, dict | str):
                args = json.dumps(args)
            details = _gemini_details(signatures.get(f"call:{part.tool_call_id}"))
            calls.append(
                pai.ToolCallPart(
                    part.tool_name,
                    args,
                    part.tool_call_id,
                    provider_details=details,
                    provider_name=system if details else None,
                )
            )
    # thinking → text → tool calls, whatever order the stored message has: Anthropic requires that order
    return [*thinking, *texts, *calls]


def to_model_messages(
    messages: Sequence[Message], *, provider_name: str, system: str | None = None
) -> list[pai.ModelMessage]:
    """perq history → pydantic-ai history.

    Consecutive instruction/user/tool messages become one ModelRequest (pydantic-ai's shape: a request holds
    every part sent between two responses); each expert message becomes one ModelResponse.
    `system` is the pydantic-ai model's system name (`Model.system`), which signed thinking is attributed to.
    """
    system = system or provider_name
    anthropic = provider_name == "anthropic"
    out: list[pai.ModelMessage] = []
    pending: list[pai.ModelRequestPart] = []

    def flush() -> None:
        if pending:
            out.append(pai.ModelRequest(parts=list(pending)))
            pending.clear()

    for message in messages:
        if isinstance(message, InstructionMessage):
            pending.append(pai.SystemPromptPart("\n".join(p.text for p in message.contents)))
        elif isinstance(message, UserMessage):
            pending.append(_user_prompt(message, cache_point=anthropic and bool(message.cache)))
        elif isinstance(message, ToolMessage):
            pending.extend(_tool_returns(message, native_error_channel=anthropic))
        elif isinstance(message, ExpertMessage):
            flush()
            out.append(
                pai.ModelResponse(parts=_response_parts(message, system, provider_name), provider_name=system)
            )
    flush()
    return out


def to_tool_definitions(tools: Sequence[ToolDefinition]) -> list[PaiToolDefinition]:
    return [
        PaiToolDefinition(name=t.name, description=t.description, parameters_json_schema=t.input_schema)
        for t in tools
    ]


def request_parameters(tools: Sequence[ToolDefinition]) -> ModelRequestParameters:
    # tool choice stays "auto" (Perstack's toolChoice); text output is always allowed, and no tools at all is
    # the tool-less run-result generation
    return ModelRequestParameters(function_tools=to_tool_definitions(tools), allow_text_output=True)


# --- pydantic-ai response → GenerationResult ----------------------------------------------------------


def _tool_call_args(part: pai.ToolCallPart) -> dict[str, Any]:
    args = part.args
    if args is None or args == "":
        return {}
    if isinstance(args, dict):
        return args
    try:
        parsed = json.loads(args)
    except json.JSONDecodeError as exc:
        parsed = exc
    if not isinstance(parsed, dict):
        # a malformed call is the model's slip, not a broken request: another attempt usually fixes it
        raise GenerationError(
            f"Invalid JSON arguments for tool {part.tool_name!r}: {args[:200]}",
            name="InvalidToolArgumentsError",
            is_retryable=True,
        )
    return parsed


def _finish_reason(reason: str | None, has_tool_calls: bool) -> FinishReason:
    if reason == "length":
        return "length"
    if reason in ("content_filter", "error"):
        return "other"
    if has_tool_calls:
        return "tool-calls"
    return "stop"


def to_usage(usage: Any) -> Usage:
    """pydantic-ai RequestUsage → perq Usage. Reasoning tokens are a subset of output tokens (not added)."""
    details = getattr(usage, "details", None) or {}
    input_tokens = int(getattr(usage, "input_tokens", 0) or 0)
    output_tokens = int(getattr(usage, "output_tokens", 0) or 0)
    reasoning = int(getattr(usage, "output_reasoning_tokens", 0) or 0) or int(
        details.get("reasoning_tokens", 0)
    )
    return Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        reasoning_tokens=reasoning,
        total_tokens=input_tokens + output_tokens,
        cached_input_tokens=int(getattr(usage, "cache_read_tokens", 0) or 0),
    )


def _gemini_signature(part: pai.ModelResponsePart) -> str | None:
    details = part.provider_details or {}
    signature = details.get("thought_signature")
    return signature if isinstance(signature, str) and signature else None


def to_generation_result(response: pai.ModelResponse) -> GenerationResult:
    texts: list[str] = []
    thinking: list[ThinkingPart] = []
    tool_calls: list[GeneratedToolCall] = []
    for part in response.parts:
        gemini_signature = _gemini_signature(part)
        if isinstance(part, pai.TextPart):
            texts.append(part.content)
            if gemini_signature:
                carrier = f"{GEMINI_SIGNATURE_ID_PREFIX}text-{new_id()}"
                thinking.append(ThinkingPart(id=carrier, thinking="", signature=gemini_signature))
        elif isinstance(part, pai.ThinkingPart):
            if part.id in ("redacted_thinking", "redacted_content"):
                thinking.append(
                    ThinkingPart(
                        id=REDACTED_THINKING_ID_PREFIX + new_id(), thinking="", signature=part.signature
                    )
                )
            elif part.provider_name == "openai" and part.id and part.id.startswith("rs_"):
                carrier = f"{OPENAI_REASONING_ID_PREFIX}{part.id}/{new_id()}"
                thinking.append(ThinkingPart(id=carrier, thinking=part.content, signature=part.signature))
            elif gemini_signature:
                carrier = f"{GEMINI_SIGNATURE_ID_PREFIX}thought-{new_id()}"
                thinking.append(ThinkingPart(id=carrier, thinking=part.content, signature=gemini_signature))
            else:
                thinking.append(ThinkingPart(thinking=part.content, signature=part.signature))
        elif isinstance(part, pai.ToolCallPart):
            tool_calls.append(GeneratedToolCall(part.tool_call_id, part.tool_name, _tool_call_args(part)))
            if gemini_signature:
                carrier = f"{GEMINI_SIGNATURE_ID_PREFIX}call:{part.tool_call_id}"
                thinking.append(ThinkingPart(id=carrier, thinking="", signature=gemini_signature))
        # provider-side (native) tools, files and the like are never requested by perq, so are ignored
    return GenerationResult(
        text="".join(texts) or None,
        thinking=thinking,
        tool_calls=tool_calls,
        finish_reason=_finish_reason(response.finish_reason, bool(tool_calls)),
        usage=to_usage(response.usage),
    )


# --- errors -----------------------------------------------------------------------------------------------


def _is_transport_error(exc: BaseException) -> bool:
    """A connection-level failure that escaped pydantic-ai's own mapping (SDK or HTTP library exception)."""
    import httpx2

    if isinstance(exc, httpx2.TransportError | ConnectionError):
        return True
    # openai.APIConnectionError / anthropic.APIConnectionError, matched by name to avoid importing both SDKs
    return any(cls.__name__ in ("APIConnectionError", "APITimeoutError") for cls in type(exc).__mro__)


# Credential failures of the Google and AWS SDKs, by class name so that neither SDK is imported to test them.
# They are not transient: the run stops with a line saying what to set.
_CREDENTIAL_ERRORS = {
    "DefaultCredentialsError": "Google credentials not found: set GOOGLE_APPLICATION_CREDENTIALS",
    "NoCredentialsError": "AWS credentials not found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    "PartialCredentialsError": "AWS credentials incomplete: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
}


def to_generation_error(exc: BaseException) -> GenerationError:
    """Classify any failure of a generation: retryable when transient (429, 5xx, timeouts, lost connections,
    messages naming an overload), else not; with the wait the provider asked for, when it asked."""
    if isinstance(exc, GenerationError):
        return exc
    message = str(exc) or type(exc).__name__
    retry_after = exc.retry_after if isinstance(exc, ModelAPIError) else None
    if isinstance(exc, ModelHTTPError):
        return GenerationError(
            message,
            status_code=exc.status_code,
            is_retryable=is_retryable(exc.status_code, message),
            retry_after=retry_after,
        )
    if isinstance(exc, ModelRequestTimeout | ModelTimeoutError):
        return GenerationError(f"Request timeout: {message}", name="TimeoutError", is_retryable=True)
    if isinstance(exc, ModelConnectionError | ModelRateLimitError | ModelUnavailableError | ModelServerError):
        # transient by category even without an HTTP status (e.g. an overload reported inside a stream)
        return GenerationError(message, is_retryable=True, retry_after=retry_after)
    if isinstance(exc, ModelAPIError):
        return GenerationError(message, is_retryable=is_retryable(None, message), retry_after=retry_after)
    if isinstance(exc, TimeoutError):
        return GenerationError(f"Request timeout: {message}", name="TimeoutError", is_retryable=True)
    for cls in type(exc).__mro__:
        if cls.__name__ in _CREDENTIAL_ERRORS:
            return GenerationError(_CREDENTIAL_ERRORS[cls.__name__], name=cls.__name__, is_retryable=False)
    if _is_transport_error(exc):
        return GenerationError(message, is_retryable=True)
    return GenerationError(message, name=type(exc).__name__, is_retryable=is_retryable(None, message))


# --- the client ---------------------------------------------------------------------------------------


_OPENAI_MODULES = ("openai", "pydantic_ai.models.openai")
_GOOGLE_MODULES = ("google.genai", "pydantic_ai.models.google")
_SDK_MODULES: dict[str, tuple[str, ...]] = {
    "anthropic": ("anthropic", "pydantic_ai.models.anthropic"),
    "openai": _OPENAI_MODULES,
    "ollama": (*_OPENAI_MODULES, "pydantic_ai.models.ollama"),
    "deepseek": _OPENAI_MODULES,
    "azure-openai": _OPENAI_MODULES,
    "google": _GOOGLE_MODULES,
    "google-vertex": _GOOGLE_MODULES,
    "amazon-bedrock": ("boto3", "pydantic_ai.models.bedrock"),
}


class PydanticAIModel:
    """A ModelClient (worker.models.contract) for every provider Perstack has, through pydantic-ai."""

    def __init__(self, provider: ProviderConfig, model: str) -> None:
        self.provider = provider
        self.model = model
        # Import the SDK now, once per worker, so that its seconds of import time on a cold worker are not
        # taken from the first generation's timeout. A missing one is reported by generate().
        for module in _SDK_MODULES.get(provider.provider_name, ()):
            with contextlib.suppress(ImportError):
                importlib.import_module(module)

    def model_settings(self, request: GenerationRequest, model: Model) -> ModelSettings:
        name = self.provider.provider_name
        settings: dict[str, Any] = {}
        if name != "amazon-bedrock":  # boto3 takes neither per request; its client makes one attempt
            # exactly one attempt per generation, limited to the generation's timeout: the loop retries
            settings.update(max_retries=0, timeout=request.timeout_ms / 1000)
        profile = cast(Mapping[str, Any], model.profile)
        allowed = not profile.get("anthropic_disallows_budget_thinking", False)
        settings.update(
            reasoning_settings(name, self.model, request.reasoning_budget, budget_thinking_allowed=allowed)
        )
        if name == "openai" and is_openai_reasoning_model(self.model):
            # the Responses API, stateless: reasoning items come back encrypted and perq keeps them in the
            # checkpoint, so any worker can send them with the next request and OpenAI keeps nothing
            settings["openai_store"] = False
        if name == "anthropic" and any(
            isinstance(m, InstructionMessage) and m.cache for m in request.messages
        ):
            settings["anthropic_cache_instructions"] = True
        return cast(ModelSettings, settings)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        timeout_s = request.timeout_ms / 1000
        try:
            settings = resolve_client_settings(self.provider, self.model)
            if settings.provider_name == "amazon-bedrock":
                settings = dataclasses.replace(settings, read_timeout=timeout_s)
            require_extra(settings.provider_name)
            model = get_cached_model(settings)
            messages = to_model_messages(
                request.messages, provider_name=self.provider.provider_name, system=model.system
            )
            response = await asyncio.wait_for(
                model_request(
                    model,
                    messages,
                    model_settings=self.model_settings(request, model),
                    model_request_parameters=request_parameters(request.tools),
                    instrument=False,
                ),
                timeout=timeout_s,
            )
            return to_generation_result(response)
        except GenerationError:
            raise
        except TimeoutError as exc:
            # wait_for's own timeout (the SDK's timeouts arrive as ModelTimeoutError)
            raise GenerationError(
                f"Generation timeout: no answer within {request.timeout_ms} ms",
                name="TimeoutError",
                is_retryable=True,
            ) from exc
        except Exception as exc:
            raise to_generation_error(exc) from exc
