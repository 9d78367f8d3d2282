"""Every provider end to end: `perq run` → Redis → a real worker → the provider's SDK → a local server
speaking that provider's HTTP API (tests/support/fake_providers.py). Each run makes a tool call, sends its
result back in the provider's format, adds up exact usage and ends with the model's text; no key, token or
credential reaches the store or Redis. Also: one retry budget (a provider that always answers 429 gets exactly
max_retries + 1 requests), a timeout per attempt, a 401 that stops at once, and a missing key."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from tests.conftest import PERQ, Perq
from tests.support.fake_providers import (
    ACCESS_TOKEN,
    FINAL_TEXT,
    FIRST_USAGE,
    GEMINI_SIGNATURE,
    NOTE,
    OPENAI_REASONING,
    SECOND_USAGE,
    TOOL_ARGS,
    TOOL_NAME,
    FakeProviders,
    Recorded,
    fake_providers,
)

VERTEX_PATH = "/v1/projects/perq-test/locations/europe-west4/publishers/google"

EXPERT = """
[experts.reader]
instruction = "Read notes.md and say what it says."
"""


@pytest.fixture
def fake() -> Iterator[FakeProviders]:
    with fake_providers() as server:
        yield server


@dataclass
class Case:
    """How one provider is configured, and what its wire format must show."""

    provider: str
    model: str
    setting: Callable[[FakeProviders, Path], dict[str, Any]]  # the [provider.setting] table
    env: Callable[[FakeProviders, Path], dict[str, str]]  # the worker's environment
    check: Callable[[FakeProviders, list[Recorded]], None]  # the requests the provider's SDK sent


def _config(provider: str, setting: dict[str, Any]) -> str:
    table: dict[str, Any] = {"providerName": provider}
    if setting:
        table["setting"] = setting
    return EXPERT + "\n" + tomli_w.dumps({"provider": table})


# --- what each provider's requests must look like ---------------------------------------------------------


def _tool_result_text(content: Any) -> str:
    return content if isinstance(content, str) else json.dumps(content)


def check_openai_format(first: Recorded, second: Recorded) -> None:
    assert [t["function"]["name"] for t in first.body["tools"]].count(TOOL_NAME) == 1
    call = next(m for m in second.body["messages"] if m["role"] == "assistant")["tool_calls"][0]
    assert (call["id"], call["function"]["name"]) == ("call_1", TOOL_NAME)
    assert json.loads(call["function"]["arguments"]) == TOOL_ARGS
    (result,) = [m for m in second.body["messages"] if m["role"] == "tool"]
    assert result["tool_call_id"] == "call_1" and NOTE in _tool_result_text(result["content"])


def check_openai(fake: FakeProviders, requests: list[Recorded]) -> None:
    first, second = requests
    # a reasoning model goes through the Responses API, stateless: its reasoning comes back encrypted
    assert first.path == "/v1/responses"
    assert first.headers["authorization"] == "Bearer sk-openai-SECRET"
    assert first.body["model"] == "o4-mini"
    assert first.body["reasoning"]["effort"] == "low"  # the default budget
    assert first.body["store"] is False
    assert "reasoning.encrypted_content" in first.body["include"]
    assert [t["name"] for t in first.body["tools"]].count(TOOL_NAME) == 1
    items = second.body["input"]
    # the reasoning item goes back exactly, from the checkpoint, before the call it led to and its output
    (reasoning,) = [i for i in items if i.get("type") == "reasoning"]
    assert (reasoning["id"], reasoning["encrypted_content"]) == OPENAI_REASONING
    kinds = [i.get("type") for i in items]
    assert kinds.index("reasoning") < kinds.index("function_call") < kinds.index("function_call_output")
    (call,) = [i for i in items if i.get("type") == "function_call"]
    assert (call["call_id"], call["name"], json.loads(call["arguments"])) == ("call_1", TOOL_NAME, TOOL_ARGS)
    (output,) = [i for i in items if i.get("type") == "function_call_output"]
    assert output["call_id"] == "call_1" and NOTE in _tool_result_text(output["output"])


def check_ollama(fake: FakeProviders, requests: list[Recorded]) -> None:
    first, second = requests
    assert first.path == "/v1/chat/completions"  # a bare OLLAMA_BASE_URL gets Ollama's /v1
    assert "reasoning_effort" not in first.body
    check_openai_format(first, second)


def check_deepseek(fake: FakeProviders, requests: list[Recorded]) -> None:
    first, second = requests
    assert first.path == "/chat/completions"
    assert first.headers["authorization"] == "Bearer sk-deepseek-SECRET"
    check_openai_format(first, second)


def check_azure(fake: FakeProviders, requests: list[Recorded]) -> None:
    first, second = requests
    for request in requests:
        assert request.path == "/openai/deployments/my-gpt-4o/chat/completions"
        assert request.query == {"api-version": ["2024-10-21"]}
        assert request.headers["api-key"] == "azure-SECRET"
        assert request.headers["x-team"] == "perq"  # the setting's headers
    check_openai_format(first, second)


def check_anthropic(fake: FakeProviders, requests: list[Recorded]) -> None:
    first, second = requests
    assert first.path == "/v1/messages"
    # the key goes as x-api-key or, in newer SDKs, as a bearer token
    assert first.headers.get("x-api-key", first.headers.get("authorization")) in (
        "sk-ant-SECRET",
        "Bearer sk-ant-SECRET",
    )
    assert first.body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert [t["name"] for t in first.body["tools"]].count(TOOL_NAME) == 1
    answer, result = second.body["messages"][-2:]
    # the signed thinking block goes back exactly as it came, before the tool call
    assert answer["content"][0] == {
        "type": "thinking",
        "thinking": "read the note",
        "signature": "SIG-ANTHROPIC",
    }
    use = answer["content"][1]
    assert (use["type"], use["id"], use["name"], use["input"]) == (
        "tool_use",
        "toolu_1",
        TOOL_NAME,
        TOOL_ARGS,
    )
    (block,) = [b for b in result["content"] if b["type"] == "tool_result"]
    assert block["tool_use_id"] == "toolu_1" and NOTE in _tool_result_text(block["content"])


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", lambda m: "_" + m.group(1).lower(), name)


def check_gemini_format(first: Recorded, second: Recorded) -> None:
    declarations = [d["name"] for t in first.body["tools"] for d in t.get("functionDeclarations", [])]
    assert declarations.count(TOOL_NAME) == 1
    # the SDK passes this dict's keys as written; the API reads both spellings of a field name
    thinking = {_snake(k): v for k, v in first.body["generationConfig"]["thinkingConfig"].items()}
    assert thinking == {"thinking_budget": 2048, "include_thoughts": True}
    model_turn = next(c for c in second.body["contents"] if c["role"] == "model")
    (call,) = [p for p in model_turn["parts"] if "functionCall" in p]
    assert call["functionCall"]["name"] == TOOL_NAME and call["functionCall"]["args"] == TOOL_ARGS
    # the thought signature goes back on the part it came with, from a checkpoint written by the step before
    assert call.get("thoughtSignature") == GEMINI_SIGNATURE
    assert len([p for c in second.body["contents"] for p in c["parts"] if "thoughtSignature" in p]) == 1
    (response,) = [
        p["functionResponse"] for c in second.body["contents"] for p in c["parts"] if "functionResponse" in p
    ]
    assert response["name"] == TOOL_NAME and NOTE in json.dumps(response["response"])


def check_google(fake: FakeProviders, requests: list[Recorded]) -> None:
    first, second = requests
    assert first.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert first.headers["x-goog-api-key"] == "google-SECRET"
    check_gemini_format(first, second)


def check_vertex(fake: FakeProviders, requests: list[Recorded]) -> None:
    first, second = requests
    assert first.path == f"{VERTEX_PATH}/models/gemini-2.5-pro:generateContent"
    # the service account's token, fetched from the credential file's token endpoint
    assert first.headers["authorization"] == f"Bearer {ACCESS_TOKEN}"
    assert any(r.path == "/token" for r in fake.requests)
    check_gemini_format(first, second)


def check_bedrock(fake: FakeProviders, requests: list[Recorded]) -> None:
    first, second = requests
    assert first.path == "/model/amazon.nova-pro-v1%3A0/converse"
    assert "/eu-west-1/bedrock/aws4_request" in first.headers["authorization"]
    assert fake.signature_failures == []  # every request was signed with the test's key pair
    assert [t["toolSpec"]["name"] for t in first.body["toolConfig"]["tools"]].count(TOOL_NAME) == 1
    answer, result = second.body["messages"][-2:]
    (use,) = [c["toolUse"] for c in answer["content"] if "toolUse" in c]
    assert (use["toolUseId"], use["name"], use["input"]) == ("tooluse_1", TOOL_NAME, TOOL_ARGS)
    (tool_result,) = [c["toolResult"] for c in result["content"] if "toolResult" in c]
    assert tool_result["toolUseId"] == "tooluse_1" and NOTE in json.dumps(tool_result["content"])


def _service_account(fake: FakeProviders, root: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    path = root / "credentials" / "service-account.json"
    path.parent.mkdir()
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "perq-test",
                "private_key_id": "key-1",
                "private_key": pem,
                "client_email": "perq@perq-test.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": f"{fake.url}/token",
            }
        )
    )
    return path


CASES = {
    "openai": Case(
        "openai",
        "o4-mini",
        lambda fake, root: {},
        lambda fake, root: {"OPENAI_API_KEY": "sk-openai-SECRET", "OPENAI_BASE_URL": f"{fake.url}/v1"},
        check_openai,
    ),
    "anthropic": Case(
        "anthropic",
        "claude-sonnet-4-5",
        lambda fake, root: {},
        lambda fake, root: {"ANTHROPIC_API_KEY": "sk-ant-SECRET", "ANTHROPIC_BASE_URL": fake.url},
        check_anthropic,
    ),
    "ollama": Case(
        "ollama", "llama3.2", lambda fake, root: {"baseUrl": fake.url}, lambda fake, root: {}, check_ollama
    ),
    "deepseek": Case(
        "deepseek",
        "deepseek-chat",
        lambda fake, root: {},
        lambda fake, root: {"DEEPSEEK_API_KEY": "sk-deepseek-SECRET", "DEEPSEEK_BASE_URL": fake.url},
        check_deepseek,
    ),
    "google": Case(
        "google",
        "gemini-2.5-flash",
        lambda fake, root: {},
        lambda fake, root: {
            "GOOGLE_GENERATIVE_AI_API_KEY": "google-SECRET",
            "GOOGLE_GENERATIVE_AI_BASE_URL": f"{fake.url}/v1beta",
        },
        check_google,
    ),
    "azure-openai": Case(
        "azure-openai",
        "my-gpt-4o",
        lambda fake, root: {
            "baseUrl": f"{fake.url}/openai",
            "apiVersion": "2024-10-21",
            "useDeploymentBasedUrls": True,
            "headers": {"X-Team": "perq"},
        },
        lambda fake, root: {"AZURE_API_KEY": "azure-SECRET"},
        check_azure,
    ),
    "amazon-bedrock": Case(
        "amazon-bedrock",
        "amazon.nova-pro-v1:0",
        lambda fake, root: {"region": "eu-west-1"},
        lambda fake, root: {
            "AWS_ACCESS_KEY_ID": fake.aws_keys[0],
            "AWS_SECRET_ACCESS_KEY": fake.aws_keys[1],
            "AWS_ENDPOINT_URL_BEDROCK_RUNTIME": fake.url,
        },
        check_bedrock,
    ),
    "google-vertex": Case(
        "google-vertex",
        "gemini-2.5-pro",
        lambda fake, root: {"project": "perq-test", "location": "europe-west4"},
        lambda fake, root: {
            "GOOGLE_APPLICATION_CREDENTIALS": str(_service_account(fake, root)),
            "GOOGLE_VERTEX_BASE_URL": f"{fake.url}{VERTEX_PATH}",
        },
        check_vertex,
    ),
}


def _worker_env(perq: Perq, extra: dict[str, str]) -> dict[str, str]:
    env = perq.env(**extra)
    # the fake is on 127.0.0.1: never through a proxy the machine may set; no AWS profile of the machine's
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        env.pop(name, None)
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = "/nonexistent"
    return env


def _burst(perq: Perq, env: dict[str, str]) -> None:
    result = perq.run("worker", "--burst", timeout=120, env=env)
    assert result.returncode == 0, result.stderr


def _secrets(env: dict[str, str], credential_files: list[Path]) -> list[str]:
    """The values that must never be stored: keys from the environment, and credential file contents."""
    # every key the cases set is marked SECRET in its value (the AWS key id too)
    values = [v for v in env.values() if "SECRET" in v]
    values.append(ACCESS_TOKEN)
    for path in credential_files:
        private_key = json.loads(path.read_text())["private_key"]
        values.append(private_key.splitlines()[1])  # a line of the key itself
    return values


@pytest.mark.parametrize("name", list(CASES))
def test_provider_end_to_end(perq: Perq, fake: FakeProviders, name: str) -> None:
    case = CASES[name]
    setting = case.setting(fake, perq.root)
    # as users do: a provider with settings is named in perstack.toml, one without on the command line
    choice = ["--provider", case.provider] if not setting else []
    perq.write("perstack.toml", _config(case.provider, setting) if setting else EXPERT)
    perq.write("notes.md", NOTE + "\n")
    env = _worker_env(perq, case.env(fake, perq.root))
    result = perq.run("run", "reader", "What does the note say?", *choice, "--model", case.model, env=env)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().splitlines()[-1]
    _burst(perq, env)

    job = perq.job(job_id)
    last = perq.checkpoints(job_id)[-1]
    assert job.status == "completed", last.error
    assert last.messages[-1].contents[-1].text == FINAL_TEXT  # type: ignore[union-attr]
    usage_in, usage_out = FIRST_USAGE[0] + SECOND_USAGE[0], FIRST_USAGE[1] + SECOND_USAGE[1]
    assert (job.usage.input_tokens, job.usage.output_tokens, job.usage.total_tokens) == (
        usage_in,
        usage_out,
        usage_in + usage_out,
    )
    case.check(fake, fake.model_requests())

    credential_files = [Path(env["GOOGLE_APPLICATION_CREDENTIALS"])] if name == "google-vertex" else []
    perq.assert_never_stored(_secrets(env, credential_files))


# --- one retry budget ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["openai", "anthropic", "google", "amazon-bedrock"])
def test_a_provider_that_always_answers_429_gets_max_retries_plus_one_requests(
    perq: Perq, fake: FakeProviders, name: str
) -> None:
    case = CASES[name]
    perq.write("perstack.toml", _config(case.provider, case.setting(fake, perq.root)))
    env = _worker_env(perq, case.env(fake, perq.root))
    result = perq.run("run", "reader", "hi", "--model", "always-429", "--max-retries", "3", env=env)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().splitlines()[-1]
    _burst(perq, env)

    assert len(fake.model_requests()) == 3 + 1
    job = perq.job(job_id)
    assert job.status == "stoppedByError"
    error = perq.checkpoints(job_id)[-1].error
    assert error is not None and error.message.startswith("Max retries (3) exceeded")
    assert error.status_code == 429
    assert [e.type for e in perq.events(job_id)].count("retry") == 3


@pytest.mark.parametrize("name", ["openai", "amazon-bedrock"])
def test_the_timeout_applies_to_each_attempt(perq: Perq, fake: FakeProviders, name: str) -> None:
    case = CASES[name]
    perq.write("perstack.toml", _config(case.provider, case.setting(fake, perq.root)))
    env = _worker_env(perq, case.env(fake, perq.root))
    # 2 s: long enough for a cold worker to import the SDK inside the first attempt's limit
    args = ("--model", "hang", "--max-retries", "2", "--timeout", "2000")
    result = perq.run("run", "reader", "hi", *args, env=env)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().splitlines()[-1]
    _burst(perq, env)

    # every attempt was cut at the timeout and retried, until the budget ran out
    assert len(fake.model_requests()) == 2 + 1
    error = perq.checkpoints(job_id)[-1].error
    assert error is not None and error.message.startswith("Max retries (2) exceeded")
    assert "timeout" in error.message.lower()


def test_a_401_stops_at_once(perq: Perq, fake: FakeProviders) -> None:
    case = CASES["azure-openai"]
    perq.write("perstack.toml", _config(case.provider, case.setting(fake, perq.root)))
    env = _worker_env(perq, case.env(fake, perq.root))
    result = perq.run("run", "reader", "hi", "--model", "auth-deployment", env=env)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().splitlines()[-1]
    _burst(perq, env)

    assert len(fake.model_requests()) == 1
    assert perq.job(job_id).status == "stoppedByError"
    error = perq.checkpoints(job_id)[-1].error
    assert error is not None and error.status_code == 401


@pytest.mark.parametrize(
    ("name", "missing"),
    [
        ("google", "GOOGLE_GENERATIVE_AI_API_KEY is not set"),
        ("azure-openai", "AZURE_API_KEY is not set"),
        ("google-vertex", "Google credentials not found"),
    ],
)
def test_a_missing_key_or_credential_stops_the_job_with_one_line(
    perq: Perq, fake: FakeProviders, name: str, missing: str
) -> None:
    case = CASES[name]
    perq.write("perstack.toml", _config(case.provider, case.setting(fake, perq.root)))
    env = _worker_env(perq, case.env(fake, perq.root))
    for var in ("GOOGLE_GENERATIVE_AI_API_KEY", "AZURE_API_KEY", "GOOGLE_APPLICATION_CREDENTIALS"):
        env.pop(var, None)
    # no gcloud configuration either: application default credentials find nothing
    env["CLOUDSDK_CONFIG"] = str(perq.root / "no-gcloud")
    env["GCE_METADATA_HOST"] = env["GCE_METADATA_IP"] = "127.0.0.1:9"
    result = perq.run("run", "reader", "hi", "--model", case.model, env=env)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().splitlines()[-1]
    _burst(perq, env)

    assert perq.job(job_id).status == "stoppedByError"
    error = perq.checkpoints(job_id)[-1].error
    assert error is not None and error.message.startswith(missing)
    assert fake.model_requests() == []


@pytest.mark.parametrize(("name", "package", "extra"), [("amazon-bedrock", "boto3", "bedrock")])
def test_a_worker_without_the_extra_stops_the_job_naming_it(
    perq: Perq, fake: FakeProviders, name: str, package: str, extra: str
) -> None:
    case = CASES[name]
    perq.write("perstack.toml", _config(case.provider, case.setting(fake, perq.root)))
    # a package that fails to import as an absent one does, first on the worker's path
    perq.write(f"shadow/{package}/__init__.py", f'raise ImportError("No module named {package}")\n')
    env = _worker_env(perq, case.env(fake, perq.root))
    env["PYTHONPATH"] = str(perq.root / "shadow")
    result = perq.run("run", "reader", "hi", "--model", case.model, env=env)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().splitlines()[-1]
    _burst(perq, env)

    assert perq.job(job_id).status == "stoppedByError"
    error = perq.checkpoints(job_id)[-1].error
    assert error is not None
    assert (
        error.message
        == f"provider {name!r} needs the {extra} extra on the worker: pip install 'perq[{extra}]'"
    )
    assert fake.model_requests() == []


@pytest.mark.parametrize("name", ["anthropic", "openai", "google"])
def test_thinking_goes_back_from_the_store_when_another_worker_takes_the_step_over(
    perq: Perq, fake: FakeProviders, name: str
) -> None:
    """The worker that made the first request is killed while it waits for the second answer; another worker
    takes the step over from the store and sends the signed thinking / reasoning item / thought signature
    exactly as the first one would have."""
    case = CASES[name]
    fake.hold_second_turn = True
    perq.write("perstack.toml", _config(case.provider, case.setting(fake, perq.root)))
    perq.write("notes.md", NOTE + "\n")
    env = _worker_env(perq, case.env(fake, perq.root))
    result = perq.run("run", "reader", "What does the note say?", "--model", case.model, env=env)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().splitlines()[-1]
    first = subprocess.Popen(
        [*PERQ, "worker"], cwd=perq.root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        assert fake.held.wait(120), "the first worker never sent the second request"
    finally:
        first.kill()
        first.wait()
    _burst(perq, env)  # takes the step over once the dead worker's lease has run out

    assert perq.job(job_id).status == "completed"
    requests = fake.model_requests()
    assert len(requests) == 3  # the first answer, the request that was held, and the one that took over
    assert requests[1].body == requests[2].body  # what the second worker sent is what the first would have
    case.check(fake, [requests[0], requests[2]])
