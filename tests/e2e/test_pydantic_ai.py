"""pydantic-ai, unmodified, against the conftest's server: a typed output (which pydantic-ai asks for
as a required tool call, then validates) and a plain answer from an agent that has a tool."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

pydantic_ai = pytest.importorskip("pydantic_ai")
from pydantic_ai.models.openai import OpenAIChatModel  # noqa: E402
from pydantic_ai.providers.openai import OpenAIProvider  # noqa: E402
from pydantic_ai.settings import ModelSettings  # noqa: E402

from tests.e2e.conftest import EMBEDDED_NAME  # noqa: E402


class City(BaseModel):
    name: str
    country: str


def test_typed_output_and_a_tool_agent(server) -> None:
    model = OpenAIChatModel(EMBEDDED_NAME, provider=OpenAIProvider(base_url=f"{server.base_url}/v1", api_key="unused"))
    typed = pydantic_ai.Agent(model, output_type=City, model_settings=ModelSettings(temperature=0, max_tokens=80))
    assert isinstance(typed.run_sync("What is the capital of France?").output, City)
    talker = pydantic_ai.Agent(model, model_settings=ModelSettings(temperature=0, max_tokens=30))

    @talker.tool_plain
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    assert isinstance(talker.run_sync("Hi!").output, str)
