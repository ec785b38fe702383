"""LiteLLM and instructor, unmodified, against the conftest's server (the embedded model): LiteLLM's
completion with tools (plain and streamed, its own stream assembly) and a JSON schema; instructor's
typed outputs in its JSON-schema and tools modes (both enforced by grammar), validated by pydantic."""

from __future__ import annotations

import json
import os

import jsonschema
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch at import
litellm = pytest.importorskip("litellm")
instructor = pytest.importorskip("instructor")

from tests.e2e.conftest import EMBEDDED_NAME  # noqa: E402
from tests.e2e.test_tools import TOOLS, WEATHER  # noqa: E402

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class City(BaseModel):
    # closed and bounded, as a typed output should be: in an open object (JSON schema's default, without
    # `strict`) or an unbounded string the 135M model's greedy answer can go on until max_tokens, adding
    # keys or characters (which of them numerics changes elsewhere decide)
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=40)
    country: str = Field(max_length=40)


def _litellm(server, **kwargs):
    return litellm.completion(
        model=f"openai/{EMBEDDED_NAME}", api_base=f"{server.base_url}/v1", api_key="unused", **kwargs
    )


def test_litellm_tools_plain_and_streamed_alike(server) -> None:
    kwargs = dict(messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=0)
    plain = _litellm(server, max_tokens=80, **kwargs)
    [call] = plain.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    chunks = list(_litellm(server, max_tokens=80, stream=True, **kwargs))
    rebuilt = litellm.stream_chunk_builder(chunks, messages=ASK)
    [streamed] = rebuilt.choices[0].message.tool_calls
    assert (streamed.function.name, streamed.function.arguments) == (call.function.name, call.function.arguments)
    assert rebuilt.choices[0].finish_reason == plain.choices[0].finish_reason == "tool_calls"


def test_litellm_json_schema(server) -> None:
    schema = City.model_json_schema()
    response = _litellm(
        server,
        messages=[{"role": "user", "content": "The capital of France, as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}},
        max_tokens=60,
        temperature=0,
    )
    City.model_validate_json(response.choices[0].message.content)


# (instructor's JSON mode asks for json_object and describes the schema in the prompt: any JSON object
# is a correct answer to that request, and the 135M model does not reliably write the schema's one)
@pytest.mark.parametrize("mode", ["JSON_SCHEMA", "TOOLS"])
def test_instructor_typed_outputs(server, mode: str) -> None:
    client = instructor.from_openai(
        openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0),
        mode=getattr(instructor.Mode, mode),
    )
    city = client.chat.completions.create(
        model=EMBEDDED_NAME,
        response_model=City,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=80,
        temperature=0,
        max_retries=0,  # the first answer must validate: no second try hides a failure
    )
    assert isinstance(city, City) and city.name
