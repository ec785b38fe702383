"""POST /v1/responses driven by the official openai client (responses.create and responses.stream,
which assembles the stream events itself): text, instructions, previous_response_id, function tools
and their outputs, text.format structured output, errors."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.e2e.conftest import EMBEDDED_NAME

MODEL = EMBEDDED_NAME  # the conftest's server: the embedded model
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": WEATHER,
        "strict": True,
    }
]


def test_text_streamed_equals_plain_and_continues(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, instructions="Be brief.", input="Hi! Who are you?", temperature=0, max_output_tokens=30)
    response = client.responses.create(**kwargs)
    assert response.object == "response" and response.status in ("completed", "incomplete") and response.output_text
    assert response.usage.input_tokens > 0 and 0 < response.usage.output_tokens <= 30
    with client.responses.stream(**kwargs) as stream:
        deltas = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.output_text == deltas == response.output_text and final.status == response.status
    follow = client.responses.create(
        model=MODEL, input="Say it again.", previous_response_id=response.id, temperature=0, max_output_tokens=10
    )
    assert follow.previous_response_id == response.id
    assert follow.usage.input_tokens > response.usage.input_tokens + response.usage.output_tokens  # history included


def test_function_calls_and_outputs(client: openai.OpenAI) -> None:
    kwargs = dict(
        model=MODEL,
        input="Weather in Rome?",
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
    )
    response = client.responses.create(**kwargs)
    [call] = [item for item in response.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    with client.responses.stream(**kwargs) as stream:
        fragments = [event.delta for event in stream if event.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    [streamed] = [item for item in final.output if item.type == "function_call"]
    assert len(fragments) > 1 and "".join(fragments) == streamed.arguments  # streamed as written
    assert (streamed.name, streamed.arguments) == (call.name, call.arguments)
    answer = client.responses.create(
        model=MODEL,
        previous_response_id=response.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 25 C"}],
        tools=TOOLS,
        temperature=0,
        max_output_tokens=20,
    )
    assert answer.status in ("completed", "incomplete")
    # the same conversation sent whole instead of by id
    whole = [
        {"role": "user", "content": "Weather in Rome?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 25 C"},
    ]
    again = client.responses.create(model=MODEL, input=whole, tools=TOOLS, temperature=0, max_output_tokens=20)
    assert again.output_text == answer.output_text


def test_text_format_json_schema(client: openai.OpenAI) -> None:
    # a bounded string: the 135M model's greedy answer can loop inside an unbounded one to the context's end
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 40}},
        "required": ["name"],
        "additionalProperties": False,
    }
    fmt = {"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}}
    response = client.responses.create(model=MODEL, input="A person as JSON", text=fmt, temperature=0)
    jsonschema.validate(json.loads(response.output_text), schema)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"input": "x", "previous_response_id": "resp_nope"}, "previous_response_id"),
        ({"input": [{"type": "image", "url": "x"}]}, "input[0]"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format"),
    ],
)
def test_bad_requests(client: openai.OpenAI, kwargs: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.responses.create(model=MODEL, **kwargs)
    assert raised.value.body["param"] == param
