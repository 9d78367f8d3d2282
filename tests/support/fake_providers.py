"""A local stand-in for every provider's HTTP API, on 127.0.0.1, for end-to-end tests through the real SDKs.

One server answers the wire formats of OpenAI Chat Completions (openai, ollama, deepseek, and Azure's v1 and
deployment URLs) and Responses (openai's reasoning models), Anthropic Messages (streamed), Gemini
`generateContent` (Gemini API and Vertex AI, with an OAuth token endpoint for service-account credentials) and
Bedrock's Converse API (SigV4 signatures checked against the test's key pair). It plays a two-turn
conversation: a request without a tool result gets a call of `readTextFile` on notes.md; a request that
carries the result gets a final text quoting it. Every request is recorded (path, query, headers, JSON body)
for the test to inspect.

Model names change the answer: `always-429` answers 429 with `retry-after: 0` forever, `hang` never answers
in time, `auth` answers 401.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

FIRST_USAGE = (100, 20)  # input, output tokens of the tool-call answer
SECOND_USAGE = (150, 10)  # ... and of the final answer
TOOL_NAME = "readTextFile"
TOOL_ARGS = {"path": "notes.md"}
NOTE = "the magic word is PERQ-42"
FINAL_TEXT = "The note says PERQ-42."
ACCESS_TOKEN = "ya29.fake-access-token"
GEMINI_SIGNATURE = "c2lnbmF0dXJlLW9mLXRoZS10aG91Z2h0"  # base64, as Gemini sends thoughtSignature


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any
    raw: bytes


@dataclass
class FakeProviders:
    """The running server: its base URL and what it received."""

    url: str
    requests: list[Recorded] = field(default_factory=list)
    # Bedrock: the key pair requests must be signed with
    aws_keys: tuple[str, str] = ("AKIDSECRET0000000000", "aws-SECRET-access-key")
    signature_failures: list[str] = field(default_factory=list)
    # hold_second_turn: the first request that carries a tool result gets no answer (its worker is to be
    # killed); `held` is set when it has arrived. Later ones are answered as usual.
    hold_second_turn: bool = False
    held: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def model_requests(self) -> list[Recorded]:
        """Requests to a model (the token endpoint left out)."""
        return [r for r in self.requests if r.path != "/token"]


def _sse(events: list[dict[str, Any]]) -> bytes:
    return "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events).encode()


def _anthropic_stream(tool_call: bool) -> bytes:
    usage_in, usage_out = FIRST_USAGE if tool_call else SECOND_USAGE
    events: list[dict[str, Any]] = [
        {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": "claude-fake",
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": usage_in, "output_tokens": 1},
            },
        }
    ]
    if tool_call:
        blocks: list[tuple[dict[str, Any], list[dict[str, Any]]]] = [
            (
                {"type": "thinking", "thinking": "", "signature": ""},
                [
                    {"type": "thinking_delta", "thinking": "read the note"},
                    {"type": "signature_delta", "signature": "SIG-ANTHROPIC"},
                ],
            ),
            (
                {"type": "tool_use", "id": "toolu_1", "name": TOOL_NAME, "input": {}},
                [{"type": "input_json_delta", "partial_json": json.dumps(TOOL_ARGS)}],
            ),
        ]
    else:
        blocks = [({"type": "text", "text": ""}, [{"type": "text_delta", "text": FINAL_TEXT}])]
    for index, (block, deltas) in enumerate(blocks):
        events.append({"type": "content_block_start", "index": index, "content_block": block})
        events.extend({"type": "content_block_delta", "index": index, "delta": d} for d in deltas)
        events.append({"type": "content_block_stop", "index": index})
    events.append(
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use" if tool_call else "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": usage_out},
        }
    )
    events.append({"type": "message_stop"})
    return _sse(events)


def _openai_completion(model: str, tool_call: bool) -> dict[str, Any]:
    usage_in, usage_out = FIRST_USAGE if tool_call else SECOND_USAGE
    message: dict[str, Any] = {"role": "assistant", "content": None if tool_call else FINAL_TEXT}
    if tool_call:
        message["tool_calls"] = [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": TOOL_NAME, "arguments": json.dumps(TOOL_ARGS)},
            }
        ]
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "finish_reason": "tool_calls" if tool_call else "stop", "message": message}],
        "usage": {
            "prompt_tokens": usage_in,
            "completion_tokens": usage_out,
            "total_tokens": usage_in + usage_out,
        },
    }


OPENAI_REASONING = ("rs_1", "ENCRYPTED-REASONING")  # the reasoning item's id and encrypted content


def _openai_response(model: str, tool_call: bool) -> dict[str, Any]:
    """The Responses API's answer: a reasoning item (encrypted, as with store=false), then a call or text."""
    usage_in, usage_out = FIRST_USAGE if tool_call else SECOND_USAGE
    output: list[dict[str, Any]] = []
    if tool_call:
        output.append(
            {
                "type": "reasoning",
                "id": OPENAI_REASONING[0],
                "summary": [{"type": "summary_text", "text": "read the note"}],
                "encrypted_content": OPENAI_REASONING[1],
            }
        )
        output.append(
            {
                "type": "function_call",
                "id": "fc_1",
                "call_id": "call_1",
                "name": TOOL_NAME,
                "arguments": json.dumps(TOOL_ARGS),
                "status": "completed",
            }
        )
    else:
        output.append(
            {
                "type": "message",
                "id": "msg_1",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": FINAL_TEXT, "annotations": []}],
            }
        )
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1700000000,
        "status": "completed",
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": usage_in,
            "output_tokens": usage_out,
            "total_tokens": usage_in + usage_out,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 3},
        },
    }


def _gemini_response(model: str, tool_call: bool) -> dict[str, Any]:
    usage_in, usage_out = FIRST_USAGE if tool_call else SECOND_USAGE
    part: dict[str, Any] = (
        {"functionCall": {"name": TOOL_NAME, "args": TOOL_ARGS}, "thoughtSignature": GEMINI_SIGNATURE}
        if tool_call
        else {"text": FINAL_TEXT}
    )
    return {
        "candidates": [{"content": {"role": "model", "parts": [part]}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {
            "promptTokenCount": usage_in,
            "candidatesTokenCount": usage_out,
            "totalTokenCount": usage_in + usage_out,
        },
        "modelVersion": model,
    }


def _bedrock_response(tool_call: bool) -> dict[str, Any]:
    usage_in, usage_out = FIRST_USAGE if tool_call else SECOND_USAGE
    content: list[dict[str, Any]] = (
        [{"toolUse": {"toolUseId": "tooluse_1", "name": TOOL_NAME, "input": TOOL_ARGS}}]
        if tool_call
        else [{"text": FINAL_TEXT}]
    )
    return {
        "output": {"message": {"role": "assistant", "content": content}},
        "stopReason": "tool_use" if tool_call else "end_turn",
        "usage": {"inputTokens": usage_in, "outputTokens": usage_out, "totalTokens": usage_in + usage_out},
        "metrics": {"latencyMs": 5},
    }


def _has_tool_result(body: Any) -> bool:
    """Whether a request already carries the tool's result, in any of the five wire formats."""
    text = json.dumps(body)
    markers = (
        '"role": "tool"',
        '"tool_result"',
        '"functionResponse"',
        '"toolResult"',
        '"function_call_output"',
    )
    return any(marker in text for marker in markers)


_GEMINI_PATH = re.compile(r"/models/([^/:]+):generateContent$")
_BEDROCK_PATH = re.compile(r"^/model/([^/]+)/converse$")
_AZURE_DEPLOYMENT_PATH = re.compile(r"/deployments/([^/]+)/chat/completions$")


def _model_of(path: str, body: Any) -> str:
    for pattern in (_GEMINI_PATH, _BEDROCK_PATH, _AZURE_DEPLOYMENT_PATH):
        if match := pattern.search(path):
            return unquote(match.group(1))
    return str(body.get("model", "")) if isinstance(body, dict) else ""


class _Handler(BaseHTTPRequestHandler):
    fake: FakeProviders
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = urlsplit(self.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            body: Any = json.loads(raw) if raw and not parts.path.endswith("/token") else None
        except json.JSONDecodeError:
            body = None
        self.fake.requests.append(Recorded("POST", parts.path, parse_qs(parts.query), headers, body, raw))
        if parts.path == "/token":  # Google's OAuth token endpoint, for a service-account credential
            self._json(200, {"access_token": ACCESS_TOKEN, "expires_in": 3600, "token_type": "Bearer"})
            return
        model = _model_of(parts.path, body)
        if model.startswith("always-429"):
            self._json(429, _error_body(parts.path, "Rate limit reached"), {"retry-after": "0"})
            return
        if model.startswith("auth"):
            self._json(401, _error_body(parts.path, "Incorrect API key provided"))
            return
        if model.startswith("hang"):
            time.sleep(10)
        tool_call = not _has_tool_result(body)
        if not tool_call and self.fake.hold_second_turn and not self.fake.held.is_set():
            self.fake.held.set()
            self.fake.release.wait(60)
            self._json(503, _error_body(parts.path, "held"))
            return
        if _BEDROCK_PATH.search(parts.path):
            problem = self._check_sigv4(raw)
            if problem:
                self.fake.signature_failures.append(problem)
                self._json(403, {"message": f"The request signature we calculated does not match: {problem}"})
                return
            self._json(200, _bedrock_response(tool_call))
        elif _GEMINI_PATH.search(parts.path):
            self._json(200, _gemini_response(model, tool_call))
        elif parts.path.endswith("/messages"):
            self._send(200, _anthropic_stream(tool_call), "text/event-stream")
        elif parts.path.endswith("/chat/completions"):
            self._json(200, _openai_completion(model, tool_call))
        elif parts.path.endswith("/responses"):
            self._json(200, _openai_response(model, tool_call))
        else:
            self._json(404, {"error": {"message": f"no route {parts.path}"}})

    def _check_sigv4(self, raw: bytes) -> str | None:
        """Recompute the request's SigV4 signature with the known key pair; None when it matches."""
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        auth = self.headers.get("Authorization", "")
        match = re.match(
            r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
            r"SignedHeaders=([^,]+), Signature=([0-9a-f]+)$",
            auth,
        )
        if not match:
            return f"no SigV4 authorization header: {auth[:40]!r}"
        key_id, _day, region, service, signed, signature = match.groups()
        if key_id != self.fake.aws_keys[0]:
            return f"unknown access key {key_id}"
        names = signed.split(";")
        request = AWSRequest(
            method="POST",
            url=f"http://{self.headers['Host']}{self.path}",
            data=raw,
            headers={name: self.headers[name] for name in names if name != "host"},
        )
        request.headers["host"] = self.headers["Host"]
        request.context["timestamp"] = self.headers["X-Amz-Date"]
        signer = SigV4Auth(Credentials(*self.fake.aws_keys), service, region)
        canonical = signer.canonical_request(request)
        expected = signer.signature(signer.string_to_sign(request, canonical), request)
        return None if expected == signature else "signature mismatch"

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", headers)

    def _send(
        self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _error_body(path: str, message: str) -> dict[str, Any]:
    if _GEMINI_PATH.search(path):
        return {"error": {"code": 429, "message": message, "status": "RESOURCE_EXHAUSTED"}}
    if _BEDROCK_PATH.search(path):
        return {"message": message}
    return {"error": {"message": message, "type": "rate_limit_error"}}


@contextmanager
def fake_providers() -> Iterator[FakeProviders]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    fake = FakeProviders(url=f"http://127.0.0.1:{server.server_address[1]}")
    server.RequestHandlerClass = type("Handler", (_Handler,), {"fake": fake})
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.release.set()
        server.shutdown()
        server.server_close()
