"""POST /v1/messages driven by the unmodified anthropic SDK against a real server on loopback:
text, streaming (the SDK assembles the events), tools with tool_use / tool_result, x-api-key auth,
errors in Anthropic's shape."""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import pytest

from tests.e2e.server import RunningServer, engine_loader, serve

MODEL = "m"
GREEDY = {"temperature": 0}  # the SDK no longer takes temperature; the API does
ASK = [{"role": "user", "content": "Hi! Who are you?"}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER}]


@pytest.fixture(scope="module")
def server() -> RunningServer:
    with serve(engine_loader(None), served_model_name=(MODEL,), api_key=("key",)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: RunningServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key="key", max_retries=0)


def test_text_plain_and_streamed_alike(client: anthropic.Anthropic) -> None:
    kwargs = dict(model=MODEL, max_tokens=40, system="Be brief.", messages=ASK, extra_body=GREEDY)
    message = client.messages.create(**kwargs)
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0 and 0 < message.usage.output_tokens <= 40
    with client.messages.stream(**kwargs) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == message.content[0].text
    assert final.stop_reason == message.stop_reason and final.usage.output_tokens == message.usage.output_tokens


def test_tool_use_and_tool_result(client: anthropic.Anthropic) -> None:
    ask = [{"role": "user", "content": "What is the weather in Rome?"}]
    choice = {"type": "any", "disable_parallel_tool_use": True}
    kwargs = dict(model=MODEL, max_tokens=60, messages=ask, tools=TOOLS, tool_choice=choice, extra_body=GREEDY)
    message = client.messages.create(**kwargs)
    assert message.stop_reason == "tool_use"
    [use] = [block for block in message.content if block.type == "tool_use"]
    assert use.name == "get_weather" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, WEATHER)
    with client.messages.stream(**kwargs) as stream:
        fragments = [
            e.delta.partial_json
            for e in stream
            if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
        ]
        final = stream.get_final_message()
    [streamed] = [block for block in final.content if block.type == "tool_use"]
    assert len(fragments) > 1 and json.loads("".join(fragments)) == streamed.input  # streamed as written
    assert (streamed.name, streamed.input) == (use.name, use.input) and final.stop_reason == "tool_use"
    history = [
        *ask,
        {"role": "assistant", "content": message.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 25 C"}]},
    ]
    after = client.messages.create(model=MODEL, max_tokens=20, messages=history, tools=TOOLS, extra_body=GREEDY)
    assert after.stop_reason in ("end_turn", "max_tokens", "tool_use")


@pytest.mark.parametrize(
    "body",
    [
        {"model": MODEL, "max_tokens": 5, "messages": [{"role": "wizard", "content": "x"}]},
        {"model": MODEL, "messages": ASK},  # max_tokens is required
        {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]},
        {"model": MODEL, "max_tokens": 5, "messages": ASK, "tool_choice": {"type": "sometimes"}},
        {"model": MODEL, "max_tokens": 5, "messages": ASK, "thinking": {"type": "enabled", "budget_tokens": 10}},
    ],
)
def test_bad_requests_get_anthropic_errors(server: RunningServer, body: dict) -> None:
    response = httpx.post(f"{server.base_url}/v1/messages", json=body, headers={"x-api-key": "key"})
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error" and error["error"]["message"]


def test_x_api_key(server: RunningServer) -> None:
    with pytest.raises(anthropic.AuthenticationError) as raised:
        anthropic.Anthropic(base_url=server.base_url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=5, messages=ASK
        )
    assert raised.value.body["error"]["type"] == "authentication_error"
