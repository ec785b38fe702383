"""Tool calling end to end: the official openai client against a real server on loopback, on the
embedded SmolLM2 (no tool section in its template: the generic format) and on Qwen2.5-Coder-0.5B from
the real-model set (its own <tool_call> tokens)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.e2e.conftest import EMBEDDED_NAME
from tests.e2e.openai_schemas import validate
from tests.e2e.server import RunningServer, engine_loader, serve

MODEL = EMBEDDED_NAME  # the conftest's server: the embedded model
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_calls(calls, allow_none: bool = False) -> None:
    assert calls or allow_none
    for call in calls:
        assert call.type == "function" and call.id
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def streamed(client: openai.OpenAI, **kwargs):
    """Content, calls and finish reason rebuilt from a stream, as clients do; the arguments arrive
    in fragments as they are written (more chunks than calls)."""
    content, calls, finish, fragments = "", {}, None, 0
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kwargs):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            entry = calls.setdefault(delta.index, {"name": "", "arguments": "", "id": ""})
            entry["id"] = delta.id or entry["id"]
            entry["name"] += (delta.function.name or "") if delta.function else ""
            entry["arguments"] += (delta.function.arguments or "") if delta.function else ""
            fragments += 1
        finish = choice.finish_reason or finish
    assert fragments > len(calls) or not calls
    return content, [calls[i] for i in sorted(calls)], finish


def exchange(server: RunningServer, client: openai.OpenAI) -> None:
    for choice in ("required", {"type": "function", "function": {"name": "add"}}):
        kwargs = dict(
            messages=ASK, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False, temperature=0, max_tokens=80
        )
        plain = client.chat.completions.create(model=MODEL, **kwargs)
        message = plain.choices[0].message
        assert plain.choices[0].finish_reason == "tool_calls"
        check_calls(message.tool_calls)
        if isinstance(choice, dict):
            assert [c.function.name for c in message.tool_calls] == ["add"]
        content, calls, finish = streamed(client, **kwargs)
        assert finish == "tool_calls" and content == (message.content or "")
        assert [(c["name"], c["arguments"]) for c in calls] == [
            (c.function.name, c.function.arguments) for c in message.tool_calls
        ]
        raw = httpx.post(f"{server.base_url}/v1/chat/completions", json={"model": MODEL, **kwargs}, timeout=60)
        validate(raw.json(), "CreateChatCompletionResponse")
    one = plain
    assert len(one.choices[0].message.tool_calls) == 1
    several = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120
    )
    # parallel calls allowed: one or more, each valid; cut by max_tokens, the last one has the
    # arguments written so far (as OpenAI's API returns them) and the finish reason says so
    calls, finish = several.choices[0].message.tool_calls, several.choices[0].finish_reason
    assert calls and finish in ("tool_calls", "length")
    check_calls(calls[:-1] if finish == "length" else calls, allow_none=True)
    # the call and its result back in the conversation: the template renders them, the model answers
    history = [
        *ASK,
        one.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": one.choices[0].message.tool_calls[0].id, "content": '{"celsius": 21}'},
    ]
    after = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, temperature=0, max_tokens=30)
    assert after.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_forced_calls_parse_validate_and_stream_alike(server: RunningServer, client: openai.OpenAI) -> None:
    exchange(server, client)


def test_auto_and_none(client: openai.OpenAI) -> None:
    for choice in ("auto", "none"):
        out = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=60
        )
        message = out.choices[0].message
        if choice == "none":
            assert not message.tool_calls and out.choices[0].finish_reason in ("stop", "length")
        elif message.tool_calls:
            check_calls(message.tool_calls)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0]"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ],
)
def test_bad_tool_requests_get_a_400(server: RunningServer, extra: dict, param: str) -> None:
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json={"model": MODEL, "messages": ASK, **extra})
    assert response.status_code == 400, response.text
    validate(response.json(), "ErrorResponse")
    assert response.json()["error"]["param"] == param


def test_bad_tool_messages_get_a_400(server: RunningServer) -> None:
    bad = [
        [*ASK, {"role": "assistant", "tool_calls": [{"id": "x", "type": "function", "function": {"name": "f"}}]}],
        [*ASK, {"role": "tool", "content": "42"}],
    ]
    for messages in bad:
        response = httpx.post(f"{server.base_url}/v1/chat/completions", json={"model": MODEL, "messages": messages})
        assert response.status_code == 400, response.text
        validate(response.json(), "ErrorResponse")


@pytest.mark.real_model
@pytest.mark.slow
def test_qwen_calls_with_its_own_tool_tokens_through_every_client() -> None:
    """Qwen2.5-Coder-0.5B from the real-model set (its template's own <tool_call> tokens) behind a real
    server: the same checks the embedded model passes, through the openai, anthropic, Agents SDK,
    LangChain, LiteLLM and instructor clients."""
    import anthropic
    from agents import OpenAIResponsesModel
    from langchain_openai import ChatOpenAI

    from tests.e2e import test_agents_sdk, test_anthropic, test_langchain, test_litellm_instructor, test_responses
    from tests.parity.test_real_models import fetch

    path = fetch("qwen2.5-coder-0.5b")
    with serve(engine_loader(str(path)), served_model_name=(MODEL,)) as qwen:
        client = openai.OpenAI(base_url=f"{qwen.base_url}/v1", api_key="unused", max_retries=0)
        exchange(qwen, client)
        test_responses.test_function_calls_and_outputs(client)
        test_anthropic.test_tool_use_and_tool_result(anthropic.Anthropic(base_url=qwen.base_url, api_key="-"))
        test_agents_sdk.test_agent_calls_a_tool_and_answers(OpenAIResponsesModel, qwen)
        llm = ChatOpenAI(base_url=f"{qwen.base_url}/v1", api_key="-", model=MODEL, temperature=0, max_retries=0)
        test_langchain.test_bind_tools_whole_and_streamed(llm)
        test_langchain.test_with_structured_output(llm, "json_schema")
        test_litellm_instructor.test_litellm_tools_plain_and_streamed_alike(qwen)
        test_litellm_instructor.test_instructor_typed_outputs(qwen, "TOOLS")
