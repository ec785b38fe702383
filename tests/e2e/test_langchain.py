"""LangChain's OpenAI chat model, unmodified, against the conftest's server: plain invoke,
with_structured_output by each of its methods (json_schema, function_calling, json_mode) and
bind_tools, whole and streamed (LangChain merges the streamed tool-call chunks itself)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

langchain_openai = pytest.importorskip("langchain_openai")
from langchain_core.tools import tool  # noqa: E402

from tests.e2e.conftest import EMBEDDED_NAME  # noqa: E402


class Person(BaseModel):
    name: str
    age: int


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


@pytest.fixture(scope="module")
def llm(server):
    return langchain_openai.ChatOpenAI(
        base_url=f"{server.base_url}/v1", api_key="unused", model=EMBEDDED_NAME, temperature=0, max_retries=0
    )


def test_invoke(llm) -> None:
    assert llm.invoke("Hi!").content


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_with_structured_output(llm, method: str) -> None:
    person = llm.with_structured_output(Person, method=method).invoke("Describe a person as JSON with name and age.")
    assert isinstance(person, Person)


def test_bind_tools_whole_and_streamed(llm) -> None:
    bound = llm.bind_tools([get_weather], tool_choice="get_weather", parallel_tool_calls=False)
    message = bound.invoke("What is the weather in Rome?")
    assert [call["name"] for call in message.tool_calls] == ["get_weather"]
    assert isinstance(message.tool_calls[0]["args"]["city"], str)
    chunks = list(bound.stream("What is the weather in Rome?"))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged = merged + chunk
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [(c["name"], c["args"]) for c in message.tool_calls]
