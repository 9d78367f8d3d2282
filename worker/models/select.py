"""Which client answers a run's model: the script provider, or pydantic-ai for every real provider.

Kept apart from the contract (`contract.py`) so that the providers import the contract and only this
module imports the providers: no cycle, and the SDKs are imported on a worker's first model call, never
by the CLI.
"""

from __future__ import annotations

from shared.models import ProviderConfig
from worker.models.contract import ModelClient


def get_model_client(provider: ProviderConfig, model: str) -> ModelClient:
    """The client for a provider; SDK modules are imported here, on first use, never at import time."""
    name = provider.provider_name
    if name == "script":
        from worker.models.script import ScriptModel

        return ScriptModel(model)
    from worker.models.pydantic_ai import PydanticAIModel

    return PydanticAIModel(provider, model)
