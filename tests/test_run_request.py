"""A submission's request: its limits over perstack.toml's over perq's defaults, refusals of limits no run
could keep and of fields that do not exist, and the media parts a request may carry."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from producer.api import RequestError, RunRequest, plan_submission
from shared.models import DEFAULT_LIMITS, InlinePart, RunLimits, UrlPart, UserMessage
from tests.conftest import Perq

CONFIG = """
maxRetries = 0
timeout = 1000

[experts.e]
instruction = "Work"
"""


def request(perq: Perq, **fields: object) -> RunRequest:
    return RunRequest.model_validate(
        {"expert_key": "e", "query": "go", "provider": "script", "model": "script.toml", "cwd": perq.root}
        | fields
    )


def test_limits_fall_back_field_by_field() -> None:
    said = RunLimits(max_steps=3)
    assert said.over(RunLimits(max_steps=9, timeout=5)).over(DEFAULT_LIMITS) == RunLimits(
        max_steps=3, max_retries=5, timeout=5
    )
    assert RunLimits(max_retries=0).over(DEFAULT_LIMITS).max_retries == 0  # a 0 is said, not unsaid


def test_request_limits_over_the_config_over_the_defaults(local: Perq) -> None:
    local.write("perstack.toml", CONFIG)
    local.script({"e": [{"text": "done"}]})
    setting = plan_submission(request(local), local.store).setting
    # the config's maxRetries = 0 holds (it once fell back to 5), its timeout too; maxSteps is perq's default
    assert (setting.max_steps, setting.max_retries, setting.timeout) == (100, 0, 1000)
    setting = plan_submission(request(local, max_retries=2, max_steps=7), local.store).setting
    assert (setting.max_steps, setting.max_retries, setting.timeout) == (7, 2, 1000)


@pytest.mark.parametrize(
    ("config", "fields", "message"),
    [
        ("maxSteps = 0\n", {}, "perstack.toml: maxSteps must be a positive number, got 0"),
        ("maxRetries = -1\n", {}, "perstack.toml: maxRetries must be at least 0, got -1"),
        ("", {"timeout": 0}, "--timeout must be a positive number, got 0"),
        ("", {"max_retries": -2}, "--max-retries must be at least 0, got -2"),
    ],
)
def test_limits_no_run_could_keep_are_refused(
    local: Perq, config: str, fields: dict[str, int], message: str
) -> None:
    local.write("perstack.toml", config + '[experts.e]\ninstruction = "Work"\n')
    local.script({"e": [{"text": "done"}]})
    with pytest.raises(RequestError, match=message):
        plan_submission(request(local, **fields), local.store)
    assert local.store.latest_job() is None


def test_a_misspelt_or_mistyped_field_is_refused(local: Perq) -> None:
    with pytest.raises(ValidationError, match="max_step"):
        request(local, max_step=3)
    with pytest.raises(ValidationError, match="max_steps"):
        request(local, max_steps="many")
    done = request(local).replaced(continue_job="j1")
    assert (done.continue_job, done.expert_key) == ("j1", "e")
    with pytest.raises(ValidationError):
        request(local).replaced(interactive="perhaps")


def test_media_parts_keep_their_kind() -> None:
    message = UserMessage.model_validate(
        {
            "type": "userMessage",
            "contents": [
                {"type": "imageUrlPart", "url": "https://example.com/a.png", "mimeType": "image/png"},
                {"type": "fileInlinePart", "encodedData": "JVBERi0=", "mimeType": "application/pdf"},
            ],
        }
    )
    image, pdf = message.contents
    assert isinstance(image, UrlPart) and image.is_image
    assert isinstance(pdf, InlinePart) and not pdf.is_image
    assert [p["type"] for p in message.to_dict()["contents"]] == ["imageUrlPart", "fileInlinePart"]
    with pytest.raises(ValidationError):  # a kind Perstack does not have
        UrlPart.model_validate({"type": "audioUrlPart", "url": "x", "mimeType": "audio/mp3"})
