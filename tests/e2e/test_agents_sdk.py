"""The OpenAI Agents SDK, unmodified, against a real server on loopback: an agent that calls a
function tool and one that answers, streamed and not, with both of the SDK's model classes (the
Responses API, its default, and Chat Completions)."""

from __future__ import annotations

import asyncio

import pytest

agents = pytest.importorskip("agents")
from agents import (  # noqa: E402
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI  # noqa: E402

set_tracing_disabled(True)  # no export of traces to OpenAI


@pytest.mark.parametrize("model_class", [OpenAIResponsesModel, OpenAIChatCompletionsModel])
def test_agent_calls_a_tool_and_answers(model_class, server) -> None:
    cities: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        cities.append(city)
        return f"sunny in {city}"

    async def scenario(base_url: str) -> tuple[str, str, str]:
        client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
        model = model_class(model="m", openai_client=client)
        caller = Agent(
            name="caller",
            instructions="Use the tools.",
            model=model,
            tools=[get_weather],
            model_settings=ModelSettings(
                tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=60
            ),
            tool_use_behavior="stop_on_first_tool",
        )
        called = await Runner.run(caller, "What is the weather in Rome?")
        talker = Agent(
            name="talker",
            instructions="Be brief.",
            model=model,
            model_settings=ModelSettings(temperature=0, max_tokens=20),
        )
        said = await Runner.run(talker, "Hi!")
        streamed = Runner.run_streamed(talker, "Hi!")
        async for _ in streamed.stream_events():
            pass
        return called.final_output, said.final_output, streamed.final_output

    called, said, streamed = asyncio.run(scenario(server.base_url))  # the conftest's server
    assert len(cities) == 1 and called == f"sunny in {cities[0]}"
    assert isinstance(said, str) and said and streamed == said
